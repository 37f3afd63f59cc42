"""Optimisers (SGD, LARS, Adam, AdamW), per-step lr and momentum schedules and the training loss."""

from app.optim.builder import build_criterion, build_momentum, build_optimizer, build_schedule, param_groups, peak_lr
from app.optim.lars import LARS
from app.optim.momentum import MomentumSchedule
from app.optim.schedule import LRSchedule

__all__ = ["LARS", "LRSchedule", "MomentumSchedule", "build_criterion", "build_momentum", "build_optimizer",
           "build_schedule", "param_groups", "peak_lr"]
