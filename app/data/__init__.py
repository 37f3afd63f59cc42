"""Sharded input pipelines: ``build_loaders`` returns (train, val, info) for one rank.

Contract for the training loop (every backend):
- ``len(loader)`` is the number of batches per epoch, the same on every rank.
- ``loader.epoch(epoch, start_batch=0)`` yields (images float32 NCHW normalised, labels int64),
  both on ``device``. Starting at ``start_batch`` continues an interrupted epoch (see each backend
  for how exactly). Train batches are always full; val labels of -1 mark padding or unreadable
  images and must be left out of loss and accuracy.
- ``loader.skipped`` counts unreadable images replaced so far on this rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.config import Config, DataConfig, in_memory
from app.data import bundled, tensor
from app.data.common import PAD, DataError, DatasetInfo, Loader, ShardPlan, Split, scan

__all__ = ["PAD", "DataError", "DatasetInfo", "Loader", "build_loaders", "in_memory", "input_shape"]

BUNDLED_PARENT = Path("data")
"""Where the embedded dataset is exported when ``data.path`` is empty (relative to the working dir)."""


def input_shape(d: DataConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the images ``build_loaders`` yields for ``d``, without reading data."""
    return tensor.shape(d) if in_memory(d) else (3, d.image_size, d.image_size)


def build_loaders(cfg: Config, rank: int, size: int, device: torch.device,
                  seed: int, eval_train: bool = False) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and val loaders of this rank. ``seed`` must be the same on every rank (the base seed,
    not a per-rank one): the shuffle of every epoch is derived from it. ``eval_train``: the train
    split in file order with the validation transform (resize, centre crop; no augmentation), the
    training set as a measurement sees it (``spngd analyze``); for the in-memory sets, which have no
    transform, the train split in its stored order."""
    d = cfg.data
    if d.backend == "synthetic":
        from app.data.synthetic import SyntheticLoader

        rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        loader = SyntheticLoader(d.synthetic_samples, d.synthetic_classes, d.image_size, d.batch_size, size,
                                 device, rank_seed)  # stateless, so it serves as val too
        info = DatasetInfo(d.synthetic_classes, tuple(map(str, range(d.synthetic_classes))),
                           d.synthetic_samples, d.synthetic_samples, input_shape(d), None)
        return loader, loader, info
    if in_memory(d):
        train_set, val_set = tensor.load(d)
        train_plan, val_plan = _plans(len(train_set), len(val_set), d.batch_size, rank, size, seed, eval_train)
        names = tuple(map(str, range(tensor.classes(d))))
        info = DatasetInfo(len(names), names, len(train_set), len(val_set), input_shape(d), None)
        return tensor.TensorLoader(train_set, train_plan, device), tensor.TensorLoader(val_set, val_plan, device), info

    root = Path(d.path) if d.path else bundled.export(d.bundled, BUNDLED_PARENT)
    classes, train, val = scan(root)
    make: Callable[[Split, ShardPlan, DataConfig, torch.device, int], Loader]
    if d.backend == "dali":
        from app.data.dali import DaliLoader as make
    else:
        from app.data.folder import FolderLoader as make
    train_plan, val_plan = _plans(len(train), len(val), d.batch_size, rank, size, seed, eval_train)
    info = DatasetInfo(len(classes), classes, len(train), len(val), input_shape(d), root)
    return make(train, train_plan, d, device, seed), make(val, val_plan, d, device, seed), info


def _plans(train: int, val: int, batch: int, rank: int, size: int, seed: int,
           eval_train: bool) -> tuple[ShardPlan, ShardPlan]:
    """The train plan (shuffled, unless ``eval_train``: then in order and padded like val) and the val plan."""
    return (ShardPlan(train, batch, rank, size, seed, train=not eval_train),
            ShardPlan(val, batch, rank, size, seed, train=False))
