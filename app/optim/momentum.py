"""Per-step momentum: ``optim.momentum`` as a number or a schedule, optionally following the lr's decay."""

from __future__ import annotations

import torch

from app.config import Schedule, value_at
from app.optim.schedule import LRSchedule


class MomentumSchedule:
    """Sets every parameter group's ``momentum`` (read by SGD and LARS at each step) to ``momentum_at(step)``.

    Like ``LRSchedule`` it is a pure function of the optimiser-step index: a resumed run needs no state.
    ``lr`` given (``optim.momentum_follows_lr``): on a step where the lr falls the momentum is multiplied
    by ``lr(step) / lr(step - 1)``, chainerkfac's ``adjust_momentum``, so the velocity built from the
    larger earlier steps fades as fast as the lr does at the end of a steep polynomial decay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, momentum: float | Schedule, steps_per_epoch: int,
                 total_steps: int, lr: LRSchedule | None = None) -> None:
        self.optimizer, self.momentum, self.lr = optimizer, momentum, lr
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def momentum_at(self, step: int) -> float:
        """Momentum of the optimiser step with index ``step`` (0-based)."""
        m = value_at(self.momentum, step, self.steps_per_epoch, self.total_steps)
        if self.lr is not None and step > 0:
            before, now = self.lr.lr_at(step - 1), self.lr.lr_at(step)
            if now < before:
                m *= now / before
        return m

    def set_step(self, step: int) -> float:
        """Give every parameter group the momentum of optimiser step ``step`` and return it."""
        m = self.momentum_at(step)
        for group in self.optimizer.param_groups:
            group["momentum"] = m
        return m
