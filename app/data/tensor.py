"""The in-memory bundled datasets (``data.bundled``: digits, gmm) and their loader.

Both are small tensors made when the run starts, never exported as image folders (JPEG would be
lossy and slow for 8x8 images and real-valued vectors); the image keys of the data section (crop,
resize, mirror) do not apply to them. ``TensorLoader`` reads a split through the same ``ShardPlan``
as the folder backends, so it shards, shuffles, pads and resumes exactly as they do.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; in the wheel,
  no download) as 1 x 8 x 8 images: pixel / 16 (0..1), then standardised by the mean and standard
  deviation of all training pixels (one scalar each). Split stratified by class with a fixed seed,
  as the MNIST-5k export: in each class a seeded permutation, every ``DIGITS_VAL_EVERY``-th image to
  val (1,433 train / 364 val).
* ``gmm``: a Gaussian mixture of ``data.gmm_classes`` classes in ``data.gmm_dim`` dimensions. Class
  means are N(0, s^2 / (2 d) I) draws with s = ``data.gmm_separation``, so two means lie s apart on
  average (root mean square); an example is its class mean plus N(0, I) noise (not normalised
  further). Labels cycle through the classes (equal shares). Means, training and validation examples
  come from three streams of ``data.gmm_seed``: the validation set does not change with gmm_train.
  Shape 1 x s x s when d is a square s^2 (the CNN then sees a square map), else 1 x 1 x d.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from app.config import DataConfig
from app.data.common import PAD, ShardedLoader, ShardPlan

DIGITS_VAL_EVERY = 5  # every 5th image of each digit goes to val, as MNIST5K_VAL_EVERY
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


@dataclass(frozen=True)
class TensorSet:
    """One split in memory: float32 images (N, C, H, W) and int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def gmm_shape(dim: int) -> tuple[int, int, int]:
    side = math.isqrt(dim)
    return (1, side, side) if side * side == dim else (1, 1, dim)


def shape(d: DataConfig) -> tuple[int, int, int]:
    """The (channels, height, width) of the in-memory set ``d.bundled``, without making it."""
    return DIGITS_SHAPE if d.bundled == "digits" else gmm_shape(d.gmm_dim)


def digits() -> tuple[TensorSet, TensorSet]:
    """scikit-learn's digits: (train, val), normalised as the module docstring says."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    bunch = load_digits()
    pixels, labels = bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    val = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        val[rng.permutation(np.flatnonzero(labels == digit))[::DIGITS_VAL_EVERY]] = True
    mean, std = pixels[~val].mean(), pixels[~val].std()
    x = torch.from_numpy((pixels - mean) / std).reshape(-1, *DIGITS_SHAPE)
    y = torch.from_numpy(labels)
    return TensorSet(x[~val], y[~val]), TensorSet(x[val], y[val])


def gmm_means(classes: int, dim: int, separation: float, seed: int) -> np.ndarray:
    """The (classes, dim) class means in float64 (the Bayes classifier's parameters)."""
    return np.random.default_rng([seed, 0]).normal(0.0, separation / math.sqrt(2 * dim), (classes, dim))


def gmm(d: DataConfig) -> tuple[TensorSet, TensorSet]:
    """The Gaussian mixture of ``d.gmm_*``: (train, val), labels cycling through the classes."""
    means = gmm_means(d.gmm_classes, d.gmm_dim, d.gmm_separation, d.gmm_seed)
    splits = []
    for stream, n in ((1, d.gmm_train), (2, d.gmm_val)):
        labels = np.arange(n) % d.gmm_classes
        x = means[labels] + np.random.default_rng([d.gmm_seed, stream]).standard_normal((n, d.gmm_dim))
        splits.append(TensorSet(torch.from_numpy(x.astype(np.float32)).reshape(n, *gmm_shape(d.gmm_dim)),
                                torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def classes(d: DataConfig) -> int:
    """The class count of the in-memory set ``d.bundled`` (a split may lack some gmm class when tiny)."""
    return DIGITS_CLASSES if d.bundled == "digits" else d.gmm_classes


def load(d: DataConfig) -> tuple[TensorSet, TensorSet]:
    """(train, val) of the in-memory set ``d.bundled``."""
    return digits() if d.bundled == "digits" else gmm(d)


class TensorLoader(ShardedLoader):
    """One split of an in-memory set on one rank (see ``common.Loader``): the whole split is copied to
    the device once and each batch is one gather; val padding slots hold zeros labelled PAD."""

    def __init__(self, data: TensorSet, plan: ShardPlan, device: torch.device) -> None:
        super().__init__(plan, device)
        self._images, self._labels = data.images.to(device), data.labels.to(device)

    def _iterate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        order = torch.from_numpy(self._plan.indices(epoch)).to(self.device)
        for k in range(start_batch, len(self)):
            index = order[k * b:(k + 1) * b]
            real = index != PAD
            safe = index.clamp(min=0)
            images = self._images[safe] * real.view(-1, 1, 1, 1)
            yield images, torch.where(real, self._labels[safe], PAD)
