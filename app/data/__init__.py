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

from app.config import Config, DataConfig
from app.data import bundled
from app.data.common import PAD, DataError, DatasetInfo, Loader, ShardPlan, Split, scan

__all__ = ["PAD", "DataError", "DatasetInfo", "Loader", "build_loaders"]

BUNDLED_PARENT = Path("data")
"""Where the embedded dataset is exported when ``data.path`` is empty (relative to the working dir)."""


def build_loaders(cfg: Config, rank: int, size: int, device: torch.device,
                  seed: int, eval_train: bool = False) -> tuple[Loader, Loader, DatasetInfo]:
    """Train and val loaders of this rank. ``seed`` must be the same on every rank (the base seed,
    not a per-rank one): the shuffle of every epoch is derived from it. ``eval_train``: the train
    split in file order with the validation transform (resize, centre crop; no augmentation), the
    training set as a measurement sees it (``spngd analyze``)."""
    d = cfg.data
    if d.backend == "synthetic":
        from app.data.synthetic import SyntheticLoader

        rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
        loader = SyntheticLoader(d.synthetic_samples, d.synthetic_classes, d.image_size, d.batch_size, size,
                                 device, rank_seed)  # stateless, so it serves as val too
        info = DatasetInfo(d.synthetic_classes, tuple(map(str, range(d.synthetic_classes))),
                           d.synthetic_samples, d.synthetic_samples, 3, None)
        return loader, loader, info

    root = Path(d.path) if d.path else bundled.export(d.bundled, BUNDLED_PARENT)
    classes, train, val = scan(root)
    make: Callable[[Split, ShardPlan, DataConfig, torch.device, int], Loader]
    if d.backend == "dali":
        from app.data.dali import DaliLoader as make
    else:
        from app.data.folder import FolderLoader as make
    train_plan = ShardPlan(len(train), d.batch_size, rank, size, seed, train=not eval_train)
    val_plan = ShardPlan(len(val), d.batch_size, rank, size, seed, train=False)
    info = DatasetInfo(len(classes), classes, len(train), len(val), 3, root)
    return make(train, train_plan, d, device, seed), make(val, val_plan, d, device, seed), info
