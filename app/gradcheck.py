"""Central finite-difference check of autograd gradients (the ``spngd check`` oracle).

Runs on a float64 copy of the model (the caller's model is untouched) and perturbs a bounded,
seeded sample of coordinates per parameter tensor, so it stays cheap on real networks. The model
must be deterministic (no dropout); BatchNorm in training mode is fine since its batch statistics
are part of the differentiated function.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from app.config import Config

LossFn = Callable[[Tensor, Tensor], Tensor]


def check_gradients(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, eps: float = 1e-6,
                    max_per_tensor: int = 16, floor: float = 1e-8, seed: int = 0) -> dict[str, float]:
    """Max relative error per parameter tensor between autograd and ``(L(w+eps) - L(w-eps)) / 2eps``.

    The error of one coordinate is ``|fd - ag| / max(|fd|, |ag|, floor)``; ``floor`` keeps
    vanishing gradients (dead ReLUs) from turning round-off into large relative errors.
    """
    model = copy.deepcopy(model).double()
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), targets).backward()
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            worst = 0.0
            picks = torch.randperm(p.numel(), generator=gen)[:max_per_tensor]
            for idx in zip(*(c.tolist() for c in torch.unravel_index(picks, p.shape))):  # any memory layout
                orig = p[idx].item()
                p[idx] = orig + eps
                plus = loss_fn(model(x), targets).item()
                p[idx] = orig - eps
                minus = loss_fn(model(x), targets).item()
                p[idx] = orig
                fd, ag = (plus - minus) / (2 * eps), p.grad[idx].item()
                worst = max(worst, abs(fd - ag) / max(abs(fd), abs(ag), floor))
            errors[name] = worst
    return errors


def check_config(cfg: Config, batch: int, max_per_tensor: int = 8) -> list[tuple[str, float]]:
    """``spngd check``: the configured model (classes from ``model.num_classes``, else 10) on a
    seeded random batch at ``data.image_size``; backprop correctness does not depend on the data,
    and a random probe needs no dataset on the machine that runs the check.

    Zero-init of the residual BN gammas is turned off for the probe: with gamma = beta = 0 a block
    adds exact zeros to ReLU outputs that are exactly 0, which puts the next ReLU on its kink where
    central differences see half the slope (a non-differentiable point, not a backprop bug)."""
    from app.models import build_model
    from app.optim import build_criterion

    torch.manual_seed(cfg.train.seed)
    classes = cfg.model.num_classes or 10
    model = build_model(dataclasses.replace(cfg.model, zero_init_residual=False), classes)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    criterion = build_criterion(cfg.optim)
    errors = check_gradients(model, criterion, x, y, max_per_tensor=max_per_tensor)
    return list(errors.items())
