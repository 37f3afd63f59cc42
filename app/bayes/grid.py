"""The data x Monte-Carlo-sample rank grid (``bayes.mc_groups``, ``bayes.samples``).

The world of W ranks is M sample groups of D = W / M data ranks: rank r reads data shard
``r % D`` and belongs to sample group ``r // D``. The D ranks of a group each read a different
shard; the M ranks sharing a shard each draw different weights. With K samples per rank, rank r's
samples are ``j = group * K + k`` (k < K), J = M * K in all, and sample j of step t comes from
``generator_for(device, seed, t, j)``: the same weights wherever j runs. Hence N ranks x 1 sample
and 1 rank x N samples (same global batch, same seeds) compute the same average over the same
(example, sample) pairs, differing only by summation order.

Gradients and curvature are averaged over all W ranks in one world collective: every rank holds
the mean over its examples and samples, and every rank weighs the same, so the world average is
the average over all (example, sample) pairs. No sub-communicator is needed for that; the grid
only decides which shard and which samples a rank takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.bayes.posterior import generator_for
from app.errors import ConfigError


@dataclass(frozen=True)
class SampleGrid:
    world: int
    rank: int
    groups: int = 1  # M
    samples: int = 1  # K per rank

    def __post_init__(self) -> None:
        if self.groups < 1 or self.samples < 1:
            raise ConfigError(f"config: bayes.mc_groups={self.groups} and bayes.samples={self.samples} must be >= 1")
        if self.world % self.groups:
            raise ConfigError(f"config: bayes.mc_groups={self.groups} must divide the {self.world} ranks "
                              f"(sample groups x data ranks)")

    @property
    def data_size(self) -> int:
        """D: the data ranks of one sample group, i.e. the number of distinct shards."""
        return self.world // self.groups

    @property
    def data_rank(self) -> int:
        return self.rank % self.data_size

    @property
    def group(self) -> int:
        return self.rank // self.data_size

    @property
    def total_samples(self) -> int:
        """J = M x K weight samples per step, over all ranks."""
        return self.groups * self.samples

    def sample_ids(self) -> range:
        return range(self.group * self.samples, (self.group + 1) * self.samples)

    def generators(self, device: torch.device, seed: int, step: int) -> list[torch.Generator]:
        """This rank's K generators of step ``step``, in sample order."""
        return [generator_for(device, seed, step, j) for j in self.sample_ids()]
