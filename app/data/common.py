"""Pieces every real backend shares: the dataset scan, the sharding plan and bad-image accounting.

The plan, not the backend, decides which rank reads which image in which order, so the torch and
DALI loaders shard, shuffle, pad and resume identically and only differ in how they decode.

Unreadable entries are found in two places and then treated alike (replaced, warned once, counted
in ``Loader.skipped`` at every occurrence). The scan finds what the directory listing already tells
for free (the entry type; one stat per symlink): symlink loops, dangling links, directories or
FIFOs named like images. They keep their slot in the split, so the plan and the counts do not
depend on them, but are never opened (a FIFO would block the reader forever). Decoding finds the
rest: corrupt or truncated files, permission errors, anything the decoder raises on.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from app.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# ImageNet channel statistics on the 0..255 scale (RGB order).
MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
PAD = -1
"""Label of a validation slot that holds no image (padding or an unreadable file); never scored."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the metrics need to know about the data."""

    num_classes: int
    classes: tuple[str, ...]
    train_size: int
    val_size: int
    input_shape: tuple[int, int, int]  # (channels, height, width) of every image the loaders yield
    root: Path | None  # None for synthetic and in-memory data

    @property
    def channels(self) -> int:
        return self.input_shape[0]


class Loader(Protocol):
    """One split on one rank; ``len`` is the same on every rank."""

    batch_size: int

    def __len__(self) -> int: ...

    @property
    def skipped(self) -> int:
        """Unreadable images replaced so far on this rank."""
        ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float32 NCHW normalised, labels int64; -1 = not an image) on the device."""
        ...


@dataclass(frozen=True)
class Split:
    """The images of one split in sorted (class, file) order.

    Names are byte strings relative to ``root`` in one numpy array: 1.28 M ImageNet paths then
    cost ~40 MB and no per-object refcounts, so forked loader workers do not slowly copy them.
    """

    root: Path
    names: np.ndarray  # dtype S, "<class>/<file>"
    labels: np.ndarray  # int64 class index
    unreadable: Mapping[int, str] = field(default_factory=dict)
    """index -> why, for the entries the scan found not to be files (never opened)."""

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.names[index]))

    def class_of(self, index: int) -> str:
        return os.fsdecode(self.names[index].split(b"/", 1)[0])

    def class_indices(self, label: int) -> range:
        """The indices of one class: contiguous, since the split is sorted by class."""
        lo, hi = np.searchsorted(self.labels, [label, label + 1])
        return range(int(lo), int(hi))


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "dangling symlink"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _not_a_file(entry: os.DirEntry[str]) -> str | None:
    """Why ``entry`` cannot be an image file, or None for a regular file (or a link to one).
    Plain entries cost no system call (the listing's d_type); a symlink costs one stat."""
    try:
        if entry.is_file():
            return None
        mode = entry.stat().st_mode
    except OSError as exc:
        return _os_reason(exc)
    return "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"


def _listdir(path: Path, dirs: bool) -> tuple[list[str], dict[str, str]]:
    """Sorted visible class folders (``dirs``) or image-named entries of ``path``, and why each
    entry among them is unusable (image entries: not a file; folders: a stat error, warned here)."""
    names, bad = [], {}
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if dirs:
                try:
                    if e.is_dir():
                        names.append(e.name)
                except OSError as exc:
                    log.warning("data: skipping unreadable entry %s (%s)", e.path, _os_reason(exc))
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                names.append(e.name)
                if (reason := _not_a_file(e)) is not None:
                    bad[e.name] = reason
    return sorted(names), bad


def scan(root: Path) -> tuple[tuple[str, ...], Split, Split]:
    """Read and check ``root/{train,val}/<class>/<image>``; class index = position in sorted names."""
    if not root.is_dir():
        raise DataError(f"data: dataset path '{root}' does not exist or is not a folder")
    found: dict[str, list[str]] = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data: '{root}' has no {split}/ folder "
                            f"(expected {root}/{split}/<class>/<image>)")
        found[split] = _listdir(root / split, dirs=True)[0]
        if not found[split]:
            raise DataError(f"data: '{root / split}' holds no class folders")
    classes = found["train"]
    if classes != found["val"]:
        def some(names: set[str]) -> str:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            return ", ".join(sorted(names)[:5]) + more or "-"
        only_train, only_val = set(classes) - set(found["val"]), set(found["val"]) - set(classes)
        raise DataError(f"data: train/ and val/ of '{root}' have different classes: only in train: "
                        f"{some(only_train)}; only in val: {some(only_val)}")
    splits = []
    for split in ("train", "val"):
        names: list[bytes] = []
        labels: list[int] = []
        unreadable: dict[int, str] = {}
        for index, cls in enumerate(classes):
            files, bad = _listdir(root / split / cls, dirs=False)
            if not files:
                raise DataError(f"data: class folder '{root / split / cls}' holds no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} images")
            if len(bad) == len(files):  # known for free here; an all-corrupt class is only warned
                name, reason = min(bad.items())
                raise DataError(f"data: class folder '{root / split / cls}' holds no readable image: all "
                                f"{len(files)} entries are links or non-files (e.g. {name}: {reason})")
            unreadable |= {len(names) + k: bad[f] for k, f in enumerate(files) if f in bad}
            names += [os.fsencode(f"{cls}/{f}") for f in files]
            labels += [index] * len(files)
        splits.append(Split(root / split, np.array(names, dtype=np.bytes_), np.array(labels, dtype=np.int64),
                            unreadable))
    return tuple(classes), splits[0], splits[1]


@dataclass(frozen=True)
class ShardPlan:
    """Which dataset index each rank reads at each slot of an epoch.

    train: one permutation per (seed, epoch), identical on every rank, cut to a whole number of
    global batches (the remainder is dropped, a different random one each epoch) and dealt out
    round-robin. val: every index once in file order, dealt out round-robin, each rank padded with
    PAD up to the same number of full batches. Being a pure function of (seed, epoch, rank) makes
    resuming at any batch exact.
    """

    num_samples: int
    batch_size: int
    rank: int
    size: int
    seed: int
    train: bool

    def __post_init__(self) -> None:
        if self.train and len(self) == 0:
            raise DataError(f"data: {self.num_samples} training images cannot fill one global batch of "
                            f"{self.size} ranks x {self.batch_size}; lower data.batch_size")

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.size * self.batch_size)
        return math.ceil(math.ceil(self.num_samples / self.size) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The global reading order of an epoch (the same on every rank)."""
        if not self.train:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's ``len(self) * batch_size`` dataset indices for the epoch (PAD = no image)."""
        slots = len(self) * self.batch_size
        order = self.order(epoch)
        if self.train:
            return order[: slots * self.size][self.rank :: self.size]
        mine = order[self.rank :: self.size]
        return np.concatenate([mine, np.full(slots - len(mine), PAD, dtype=mine.dtype)])


def check_start(start_batch: int, batches: int) -> None:
    """``Loader.epoch`` accepts 0..len (len = nothing left of that epoch)."""
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch={start_batch} is outside 0..{batches}")


class ShardedLoader(ABC):
    """What every plan-driven loader shares: batch count from the shard plan and the ``epoch`` entry
    point; a backend supplies only ``_iterate``. Nothing is ever skipped unless a subclass reads files
    (``PlannedLoader``); in-memory data (``tensor.TensorLoader``) has none."""

    def __init__(self, plan: ShardPlan, device: torch.device) -> None:
        self.batch_size, self.device = plan.batch_size, device
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def skipped(self) -> int:
        return 0

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch..len-1`` of ``epoch`` (``len`` = nothing left of that epoch)."""
        check_start(start_batch, len(self))
        return self._iterate(epoch, start_batch)

    @abstractmethod
    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class PlannedLoader(ShardedLoader):
    """What the folder-backed loaders share besides the plan: the count of unreadable images replaced."""

    def __init__(self, split: Split, plan: ShardPlan, device: torch.device) -> None:
        super().__init__(plan, device)
        self._skips = SkipLog(split)

    @property
    def skipped(self) -> int:
        return self._skips.count


def candidates(index: int, n: int) -> Iterator[int]:
    """Where to look for a replacement of an unreadable image: itself, then the next files in
    sorted order (usually the same class), wrapping once around the split."""
    return ((index + k) % n for k in range(n))


def why_unreadable(path: str) -> str | None:
    """Why PIL cannot decode ``path`` (None when it can)."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure; the reason is only reported
        return f"{type(exc).__name__}: {exc}"
    return None


class SkipLog:
    """Counts the batch slots whose image was unreadable, warns once per file (not per epoch) and
    once per class that turns out to have no readable image at all.

    The class check decodes the class's files in order up to the first readable one, once per class
    that has a bad file: one extra decode for a healthy class, the whole class (once) for a dead one.
    """

    def __init__(self, split: Split) -> None:
        self.count = 0
        self._split = split
        self._warned: set[int] = set()
        self._checked: set[int] = set()  # labels whose readability is known

    def record(self, failures: Sequence[tuple[int, str]]) -> None:
        """One replaced slot: (index, reason) of its own file, then of any met while replacing it."""
        self.count += 1
        for index, reason in failures:
            if index not in self._warned:
                self._warned.add(index)
                log.warning("data: skipping unreadable image %s (%s)", self._split.path(index), reason)
        for index, _ in failures:
            self._check_class(int(self._split.labels[index]))

    def _check_class(self, label: int) -> None:
        if label in self._checked:
            return
        self._checked.add(label)
        members = self._split.class_indices(label)
        known_bad = self._warned | self._split.unreadable.keys()
        if any(i not in known_bad and why_unreadable(self._split.path(i)) is None for i in members):
            return
        log.warning("data: class '%s' in %s has no readable image (all %d files are unreadable): this split "
                    "has no example of it", self._split.class_of(members[0]), self._split.root, len(members))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float32 normalised, done on the device to keep host copies 4x smaller."""
    mean = torch.tensor(MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_255, device=images.device).view(1, 3, 1, 1)
    return images.float().sub_(mean).div_(std)
