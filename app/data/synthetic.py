"""Synthetic backend: one random batch made on the device and served every step.

For throughput benchmarks: the input pipeline costs nothing, so the numbers measure the model,
K-FAC and communication alone (like the usual synthetic ImageNet benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from app.data.common import DataError, check_start


class SyntheticLoader:
    """``len`` = synthetic_samples // (ranks * batch) on every rank; the data never changes, so a
    resumed epoch trivially equals an uninterrupted one. Do not modify the yielded tensors."""

    def __init__(self, samples: int, classes: int, image_size: int, batch_size: int, size: int,
                 device: torch.device, seed: int) -> None:
        self.batch_size, self._batches = batch_size, samples // (size * batch_size)
        if self._batches == 0:
            raise DataError(f"data: synthetic_samples={samples} cannot fill one global batch of "
                            f"{size} ranks x {batch_size}")
        gen = torch.Generator(device=device).manual_seed(seed)
        self._images = torch.randn(batch_size, 3, image_size, image_size, generator=gen, device=device)
        self._labels = torch.randint(0, classes, (batch_size,), generator=gen, device=device)

    def __len__(self) -> int:
        return self._batches

    @property
    def skipped(self) -> int:
        return 0

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_start(start_batch, self._batches)
        return iter([(self._images, self._labels)] * (self._batches - start_batch))
