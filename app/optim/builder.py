"""Optimiser, schedule and loss from ``OptimConfig``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.config import OptimConfig, first_value
from app.optim.lars import LARS
from app.optim.momentum import MomentumSchedule
from app.optim.schedule import LRSchedule


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al.): ``lr * global_batch / base_batch`` when base_batch > 0.

    ``global_batch`` is the number of images per optimiser step: per-rank batch x ranks x grad_accum.
    """
    if global_batch < 1:
        raise ValueError(f"optim: global batch {global_batch} must be >= 1")
    return cfg.lr * global_batch / cfg.base_batch if cfg.base_batch else cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (decayed, LARS-adapted) and every 1-D parameter (BN gamma/beta, biases).

    Decaying BN parameters and biases only fights their scale-free role and costs accuracy at
    large batch; the ``lars`` key is read by LARS and kept, unused, by the torch optimisers.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars": True},
              {"params": no_decay, "weight_decay": 0.0, "lars": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """The configured optimiser at the (scaled) peak lr; the schedule then owns ``lr``.

    Nothing here assumes one backward per step: gradients accumulated over micro-batches are
    consumed as they are. A momentum schedule starts at its ``value``; ``build_momentum`` then owns
    ``momentum``.
    """
    momentum = first_value(cfg.momentum)
    if cfg.nesterov and (cfg.name != "sgd" or momentum == 0.0):
        raise ValueError(f"optim: nesterov needs name=sgd and momentum > 0 (got {cfg.name}, "
                         f"momentum={momentum})")
    lr = peak_lr(cfg, global_batch)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=cfg.lars_eta)
    if cfg.name in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        beta1, beta2 = cfg.betas
        return adam(groups, lr=lr, betas=(beta1, beta2), eps=cfg.eps)
    raise ValueError(f"optim: unknown optimiser {cfg.name!r} (known: sgd, lars, adam, adamw)")


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                   total_steps: int) -> LRSchedule:
    """Warmup and decay in optimiser steps; the peak is the lr ``build_optimizer`` gave the optimiser."""
    if steps_per_epoch < 1:
        raise ValueError(f"schedule: steps_per_epoch={steps_per_epoch} must be >= 1")
    return LRSchedule(optimizer, optimizer.defaults["lr"], cfg.schedule,
                      warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), total_steps=total_steps,
                      milestones=[round(m * steps_per_epoch) for m in cfg.milestones],
                      gamma=cfg.gamma, power=cfg.power, end_lr=cfg.end_lr)


def build_momentum(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: LRSchedule, steps_per_epoch: int,
                   total_steps: int) -> MomentumSchedule | None:
    """The per-step momentum of SGD and LARS; None for Adam(W) and the Bayesian optimisers, whose first-moment
    decay is ``optim.betas[0]`` (config refuses a momentum schedule there)."""
    if cfg.name not in ("sgd", "lars"):
        return None
    return MomentumSchedule(optimizer, cfg.momentum, steps_per_epoch, total_steps,
                            lr if cfg.momentum_follows_lr else None)


def build_criterion(cfg: OptimConfig) -> nn.Module:
    """Cross-entropy with label smoothing; label -1 marks padded validation entries and is ignored."""
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, ignore_index=-1)
