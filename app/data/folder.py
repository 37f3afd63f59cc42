"""torch backend: PIL decoding in DataLoader worker processes (torchvision cannot be imported here).

Each sample's augmentation draws come from its own generator seeded by (seed, epoch, index), so
the output does not depend on worker count or scheduling and a resumed epoch is bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from app.config import DataConfig
from app.data.common import PAD, DataError, PlannedLoader, ShardPlan, Split, candidates, normalise
from app.preempt import leave_stop_signals_to_the_rank

_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))

Box = tuple[float, float, float, float]
Item = tuple[int, int]  # (dataset index or PAD, epoch)
Failures = tuple[tuple[int, str], ...]  # (index, reason) of unreadable files met filling one slot
Sample = tuple[torch.Tensor, int, Failures]


def random_resized_crop(w: int, h: int, min_area: float, rng: np.random.Generator) -> Box:
    """The crop box of torchvision's RandomResizedCrop (area in (min_area, 1), ratio 3/4..4/3)."""
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(*_LOG_RATIO))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    # Fallback of torchvision: the whole image, trimmed to the nearest allowed aspect ratio.
    cw, ch = w, h
    if w / h < 3 / 4:
        ch = round(w / (3 / 4))
    elif w / h > 4 / 3:
        cw = round(h * (4 / 3))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def centre_crop(w: int, h: int, resize: int, size: int) -> Box:
    """Box in the original image equal to: shorter side -> ``resize``, then centre crop ``size``."""
    side = size * min(w, h) / resize
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class _Transform:
    size: int
    train: bool
    min_area: float
    mirror: bool
    val_resize: int
    seed: int

    def __call__(self, path: str, index: int, epoch: int) -> torch.Tensor:
        """Decode, crop and resize one image to uint8 CHW; raises on an unreadable file."""
        rng = np.random.default_rng([self.seed, epoch, index])
        with Image.open(path) as im:
            w, h = im.size
            box = (random_resized_crop(w, h, self.min_area, rng) if self.train
                   else centre_crop(w, h, self.val_resize, self.size))
            # JPEG draft mode decodes at 1/2..1/8 scale when the crop stays >= size pixels.
            bw, bh = box[2] - box[0], box[3] - box[1]
            im.draft("RGB", (math.ceil(w * self.size / bw), math.ceil(h * self.size / bh)))
            sx, sy = im.size[0] / w, im.size[1] / h
            out = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR,
                                           box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        if self.train and self.mirror and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


class _Images(Dataset[Sample]):
    """Maps (index, epoch) to an image; unreadable files are replaced (train: by the next readable
    file, val: by a blank PAD slot so it is never scored) and reported back with the batch."""

    def __init__(self, split: Split, transform: _Transform) -> None:
        self.split, self.transform = split, transform

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.transform.size, self.transform.size, dtype=torch.uint8)

    def __getitem__(self, item: Item) -> Sample:
        index, epoch = item
        if index == PAD:
            return self._blank(), PAD, ()
        skipped: list[tuple[int, str]] = []
        for j in candidates(index, len(self.split)):
            reason = self.split.unreadable.get(j)  # not a file: never opened (a FIFO would block)
            if reason is None:
                try:
                    image = self.transform(self.split.path(j), index, epoch)
                except Exception as exc:  # noqa: BLE001 - any decoder failure of one file must not end a run
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    return image, int(self.split.labels[j]), tuple(skipped)
            skipped.append((j, reason))
            if not self.transform.train:
                return self._blank(), PAD, tuple(skipped)
        raise DataError(f"data: no readable image in '{self.split.root}'")


def _collate(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[Failures]]:
    images, labels, skipped = zip(*batch, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), [s for s in skipped if s]


class _PlanBatches(Sampler[list[Item]]):
    """Batch sampler reading the plan; ``select`` picks the epoch before each ``iter(DataLoader)``,
    which lets persistent workers serve every epoch."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan, self.epoch, self.start = plan, 0, 0

    def select(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __iter__(self) -> Iterator[list[Item]]:
        order, b = self.plan.indices(self.epoch).tolist(), self.plan.batch_size
        for k in range(self.start, len(self.plan)):
            yield [(i, self.epoch) for i in order[k * b:(k + 1) * b]]


class FolderLoader(PlannedLoader):
    """ImageFolder-style loader of one split on one rank (see ``common.Loader``)."""

    def __init__(self, split: Split, plan: ShardPlan, cfg: DataConfig, device: torch.device,
                 seed: int) -> None:
        super().__init__(split, plan, device)
        self._batches = _PlanBatches(plan)
        transform = _Transform(cfg.image_size, plan.train, cfg.min_crop_area, cfg.random_mirror,
                               cfg.val_resize, seed)
        # Its own generator: every iterator draws a worker base seed (unused: each sample seeds its
        # own draws), which from torch's global RNG would shift the streams training draws from it.
        self._loader = DataLoader(_Images(split, transform), batch_sampler=self._batches,
                                  num_workers=cfg.workers, collate_fn=_collate,
                                  pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                                  generator=torch.Generator().manual_seed(seed),
                                  worker_init_fn=leave_stop_signals_to_the_rank,
                                  # not fork: the rank already runs gloo/NCCL threads, and a child forked
                                  # while one of them holds a lock can hang forever (a CI run hung once)
                                  multiprocessing_context="forkserver" if cfg.workers > 0 else None)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._batches.select(epoch, start_batch)
        for images, labels, skipped in self._loader:
            for failures in skipped:
                self._skips.record(failures)
            yield (normalise(images.to(self.device, non_blocking=True)),
                   labels.to(self.device, non_blocking=True))
