"""Optimisers (SGD, LARS, Adam, AdamW), per-step lr schedules and the training loss."""

from app.optim.builder import build_criterion, build_optimizer, build_schedule, param_groups, peak_lr
from app.optim.lars import LARS
from app.optim.schedule import LRSchedule

__all__ = ["LARS", "LRSchedule", "build_criterion", "build_optimizer", "build_schedule",
           "param_groups", "peak_lr"]
