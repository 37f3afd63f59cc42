"""Per-step learning-rate schedule: linear warmup, then constant / step / cosine / poly decay.

The rate is a pure function of the optimiser-step index, so a resumed run only needs that index
to continue exactly where it stopped (no chained scheduler state to replay).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch

SCHEDULES = ("constant", "step", "cosine", "poly")


class LRSchedule:
    """Sets every parameter group's ``lr`` to ``lr_at(step)``.

    Call ``set_step(s)`` before optimiser step ``s`` (once per step, not per micro-batch). Warmup is
    ``peak * (s + 1) / warmup_steps`` for ``s < warmup_steps``: it starts near 0 but never at 0,
    so the first step is not wasted, and reaches the peak on the last warmup step. Decay then
    runs over steps ``warmup_steps .. total_steps``: cosine and poly reach ``end_lr`` at
    ``total_steps``; step multiplies by ``gamma`` at each milestone step (counted from step 0). A
    warmup longer than ``total_steps`` is allowed: a short smoke run simply ends inside it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, kind: str,
                 warmup_steps: int, total_steps: int, milestones: Sequence[int] = (),
                 gamma: float = 0.1, power: float = 2.0, end_lr: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule: unknown kind {kind!r} (known: {', '.join(SCHEDULES)})")
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"schedule: warmup_steps={warmup_steps} must be >= 0 and "
                             f"total_steps={total_steps} >= 1")
        self.optimizer = optimizer
        self.peak_lr, self.kind, self.end_lr = peak_lr, kind, end_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.milestones, self.gamma, self.power = sorted(milestones), gamma, power
        self.set_step(0)

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimiser step with index ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.peak_lr * self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.kind == "constant":
            return self.peak_lr
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        shape = (0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine"
                 else (1.0 - progress) ** self.power)
        return self.end_lr + (self.peak_lr - self.end_lr) * shape

    def set_step(self, step: int) -> float:
        """Give every parameter group the rate of optimiser step ``step`` and return that rate."""
        self.last_step = step
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_step(int(state["last_step"]))
