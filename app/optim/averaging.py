"""Averaged SGD (``optim.tail_average``): the run ends with the mean of its last weights.

Tail averaging (Polyak-Ruppert over the tail of the run, as in SWA with a per-step average) keeps
the running mean of the parameters after each of the last ``n = max(1, round(f * total_steps))``
optimiser steps and puts it into the model when training ends, so the final validation, the
checkpoint, ``posterior.pt`` (a point estimate) and ``spngd evaluate`` all use the average.

* Every step of the loop counts, also one the fp16 loss scaler skipped (its weights are the
  previous ones): the average is over step indices, so it depends only on the step count and a
  resume continues it exactly.
* Data-parallel ranks hold equal parameters after each step, so each rank averages alone; no
  collective.
* The mean is a running one in the parameters' dtype, ``avg += (w - avg) / k`` (``lerp``): one extra
  copy of the parameters, no float64 sum.
* Only parameters: BatchNorm's running statistics stay those of the last steps (SWA's extra pass
  over the data to recompute them for the averaged weights is not done).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TailAverage:
    """The running mean of ``model``'s parameters after each of the last ``fraction`` of ``total_steps``."""

    def __init__(self, model: nn.Module, fraction: float, total_steps: int) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"TailAverage: fraction={fraction} must be in (0, 1]")
        self.params = dict(model.named_parameters())
        self.first = total_steps - max(1, round(fraction * total_steps)) + 1  # 1-based count of the first step averaged
        self.count = 0
        self.average: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, steps_done: int) -> None:
        """Called after every optimiser step with the number of steps done so far (1 after the first)."""
        if steps_done < self.first:
            return
        self.count += 1
        if not self.average:
            self.average = {k: p.detach().clone() for k, p in self.params.items()}
            return
        for k, p in self.params.items():
            self.average[k].lerp_(p, 1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        """Put the average into the model (nothing before the tail starts)."""
        for k, value in self.average.items():
            self.params[k].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.average = {k: v.to(device=self.params[k].device, dtype=self.params[k].dtype).clone()
                        for k, v in state["average"].items()}
