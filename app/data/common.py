"""Pieces every real backend shares: the dataset scan, the sharding plan and bad-image accounting.

The plan, not the backend, decides which rank reads which image in which order, so the torch and
DALI loaders shard, shuffle, pad and resume identically and only differ in how they decode.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

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
    channels: int
    root: Path | None  # None for synthetic data


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

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.names[index]))


def _listdir(path: Path, dirs: bool) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and
                      (e.is_dir() if dirs else e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)))


def scan(root: Path) -> tuple[tuple[str, ...], Split, Split]:
    """Read and check ``root/{train,val}/<class>/<image>``; class index = position in sorted names."""
    if not root.is_dir():
        raise DataError(f"data: dataset path '{root}' does not exist or is not a folder")
    found: dict[str, list[str]] = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data: '{root}' has no {split}/ folder "
                            f"(expected {root}/{split}/<class>/<image>)")
        found[split] = _listdir(root / split, dirs=True)
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
        for index, cls in enumerate(classes):
            files = _listdir(root / split / cls, dirs=False)
            if not files:
                raise DataError(f"data: class folder '{root / split / cls}' holds no "
                                f"{'/'.join(IMAGE_EXTENSIONS)} images")
            names += [os.fsencode(f"{cls}/{f}") for f in files]
            labels += [index] * len(files)
        splits.append(Split(root / split, np.array(names, dtype=np.bytes_), np.array(labels, dtype=np.int64)))
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


class PlannedLoader(ABC):
    """What the folder-backed loaders share: batch count from the shard plan, the skip count and
    the ``epoch`` entry point; a backend supplies only ``_iterate``."""

    def __init__(self, plan: ShardPlan, device: torch.device) -> None:
        self.batch_size, self.device = plan.batch_size, device
        self._plan, self._skips = plan, SkipLog()

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def skipped(self) -> int:
        return self._skips.count

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch..len-1`` of ``epoch`` (``len`` = nothing left of that epoch)."""
        check_start(start_batch, len(self))
        return self._iterate(epoch, start_batch)

    @abstractmethod
    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def candidates(index: int, n: int) -> Iterator[int]:
    """Where to look for a replacement of an unreadable image: itself, then the next files in
    sorted order (usually the same class), wrapping once around the split."""
    return ((index + k) % n for k in range(n))


class SkipLog:
    """Counts the batch slots whose image was unreadable and warns once per file, not per epoch."""

    def __init__(self) -> None:
        self.count = 0
        self._warned: set[str] = set()

    def record(self, failures: Sequence[tuple[str, str]]) -> None:
        """One replaced slot: (path, reason) of its own file, then of any met while replacing it."""
        self.count += 1
        for path, reason in failures:
            if path not in self._warned:
                self._warned.add(path)
                log.warning("data: skipping unreadable image %s (%s)", path, reason)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float32 normalised, done on the device to keep host copies 4x smaller."""
    mean = torch.tensor(MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_255, device=images.device).view(1, 3, 1, 1)
    return images.float().sub_(mean).div_(std)
