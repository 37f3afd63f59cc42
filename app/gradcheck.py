"""Central finite-difference check of autograd gradients (the ``spngd check`` oracle).

Runs on a float64 copy of the model (the caller's model is untouched) and perturbs a bounded,
seeded sample of coordinates per parameter tensor, so it stays cheap on real networks. The model
must be deterministic (no dropout); BatchNorm in training mode is fine since its batch statistics
are part of the differentiated function.

A ReLU network is only piecewise smooth, and with train-mode BatchNorm one weight moves every
pre-activation, so ``w + eps`` and ``w - eps`` can land on different sides of a kink; the central
difference then mixes two slopes and disagrees with a correct backward. Such coordinates are
detected, not guessed: forward pre-hooks record the sign of every ``nn.ReLU`` input and the argmax
of every ``nn.MaxPool2d`` window (the only non-smooth modules of ``app.models``), and a coordinate
whose two evaluations record differently is retried at a smaller step, then skipped and counted.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.config import Config

LossFn = Callable[[Tensor, Tensor], Tensor]

SHRINK = (1.0, 0.1, 0.01)
"""Steps tried for a coordinate, as fractions of its tensor's eps: a smaller step crosses fewer
kinks, but its round-off grows as 1/step."""
ROUNDOFF = 1e-14
"""Trusted relative accuracy of a float64 loss evaluation (~45 ulps; the demo's ResNet-20 shows
~2): a difference ``(L+ - L-) / 2h`` is only known to ``ROUNDOFF * |L| / h``, and that much of a
disagreement is not counted, so a small step needed near a kink cannot fail a correct model on
another CPU's rounding."""
TENSOR_FLOOR = 1e-3
"""A coordinate's error is relative to at least this fraction of its tensor's largest sampled
gradient: the round-off of a difference (~1e-16 |L| / step) swamps coordinates a million times
smaller than their neighbours, while a wrong backward shows on the large ones."""
PROBE_IMAGE_SIZE = 64
"""``check_config`` probes at most this image size: the same operators without 224 px float64
forwards, and still 2x2 pixels in the last stage of an ImageNet ResNet (32x down-sampling), so its
BatchNorm normalises more than the 2 values of a 1x1 map (a degenerate, nearly flat function)."""
COORDINATES = 256
"""``check_config`` perturbs about this many coordinates in all (at least one per tensor): two
forwards each, a fixed cost whatever the depth (ResNet-50: 161 tensors, one each)."""


@dataclass(frozen=True)
class TensorCheck:
    """The verdict on one parameter tensor."""

    max_rel_err: float  # over the checked coordinates; 0 when none could be checked
    checked: int
    skipped: int  # sampled coordinates that crossed a kink at every step tried
    step: float  # the smallest step a checked coordinate needed (eps when none crossed a kink)


class _Kinks:
    """Where the model is not differentiable, recorded during one forward: the sign pattern of
    every ReLU input and the argmax of every max-pool window, in call order (a module called
    twice records twice). Two forwards with equal records lie on one smooth piece."""

    def __init__(self, model: nn.Module) -> None:
        self.records: list[Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._relu) for m in model.modules()
                         if isinstance(m, nn.ReLU)]
        self._handles += [m.register_forward_pre_hook(self._pool) for m in model.modules()
                          if isinstance(m, nn.MaxPool2d)]

    def _relu(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.records.append(args[0] > 0)  # a pre-hook: in-place ReLUs have not overwritten it yet

    def _pool(self, module: nn.MaxPool2d, args: tuple[Tensor, ...]) -> None:
        _, argmax = F.max_pool2d(args[0], module.kernel_size, module.stride, module.padding, module.dilation,
                                 ceil_mode=module.ceil_mode, return_indices=True)
        self.records.append(argmax)

    def evaluate(self, fn: Callable[[], float]) -> tuple[float, list[Tensor]]:
        """``fn()`` and what it recorded."""
        self.records = []
        return fn(), self.records

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _same_piece(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_gradients(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, eps: float = 1e-5,
                    max_per_tensor: int = 16, floor: float = 1e-8, seed: int = 0) -> dict[str, TensorCheck]:
    """Per parameter tensor, the max relative error between autograd and ``(L(w+h) - L(w-h)) / 2h``
    over up to ``max_per_tensor`` sampled coordinates that stay on one side of every kink.

    The error of one coordinate is ``max(0, |fd - ag| - roundoff) / max(|fd|, |ag|, floor,
    TENSOR_FLOOR * largest)`` (``roundoff``: see ``ROUNDOFF``; ``largest``: the tensor's largest
    sampled |gradient|); the floors keep vanishing gradients (dead ReLUs, tiny activations) from
    turning round-off into large relative errors. The step is chosen per coordinate: the largest
    of ``eps * SHRINK`` that crosses no kink (the early layers of a ResNet move every unit of the
    network and need the smallest); a coordinate crossing at all of them is skipped and replaced
    by the next sampled one (at most ``4 * max_per_tensor`` are tried per tensor).
    """
    model = copy.deepcopy(model).double()
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), targets).backward()
    gen = torch.Generator().manual_seed(seed)
    kinks = _Kinks(model)

    def loss() -> float:
        return loss_fn(model(x), targets).item()

    def central(p: Tensor, idx: tuple[int, ...]) -> tuple[float, float, float] | None:
        """(central difference, its round-off bound, step) at the largest step that stays on one
        smooth piece."""
        orig = p[idx].item()
        for step in (eps * s for s in SHRINK):
            p[idx] = orig + step
            plus, above = kinks.evaluate(loss)
            p[idx] = orig - step
            minus, below = kinks.evaluate(loss)
            p[idx] = orig
            if _same_piece(above, below):
                return (plus - minus) / (2 * step), ROUNDOFF * max(abs(plus), abs(minus)) / step, step
        return None

    results: dict[str, TensorCheck] = {}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is None:
                    continue
                found: list[tuple[float, float, float]] = []  # (finite difference, round-off, autograd)
                skipped, smallest = 0, eps
                for idx in _sample(p, gen, 4 * max_per_tensor):
                    if len(found) == max_per_tensor:
                        break
                    fd = central(p, idx)
                    if fd is None:
                        skipped += 1
                        continue
                    found.append((fd[0], fd[1], p.grad[idx].item()))
                    smallest = min(smallest, fd[2])
                low = max([floor] + [TENSOR_FLOOR * max(abs(fd), abs(ag)) for fd, _, ag in found])
                worst = max((max(0.0, abs(fd - ag) - noise) / max(abs(fd), abs(ag), low) for fd, noise, ag in found),
                            default=0.0)
                results[name] = TensorCheck(worst, len(found), skipped, smallest)
    finally:
        kinks.close()
    return results


def _sample(p: Tensor, gen: torch.Generator, n: int) -> Iterator[tuple[int, ...]]:
    """Up to ``n`` distinct seeded coordinates of ``p`` (index tuples work in any memory layout)."""
    picks = torch.randperm(p.numel(), generator=gen)[:n]
    return zip(*(c.tolist() for c in torch.unravel_index(picks, p.shape)), strict=True)


@dataclass(frozen=True)
class Probe:
    """What ``check_config`` ran: the image size and the coordinates sampled per tensor."""

    image_size: int
    per_tensor: int


def check_config(cfg: Config, batch: int, max_per_tensor: int = 8) -> tuple[dict[str, TensorCheck], Probe]:
    """``spngd check``: the configured model (classes from ``model.num_classes``, else 10) on a
    seeded random batch at ``data.image_size`` capped at ``PROBE_IMAGE_SIZE``, with up to
    ``max_per_tensor`` coordinates per tensor and about ``COORDINATES`` in all. Backprop
    correctness does not depend on the data, and a random probe needs no dataset on the machine
    that runs the check. The probe is 3-channel square images, and the model is built for them (an
    MLP's first layer fits the probe, whatever data.bundled holds).

    Zero-init of the residual BN gammas is turned off for the probe: with gamma = beta = 0 a block
    adds exact zeros to ReLU outputs that are exactly 0, which puts the next ReLU on its kink for
    every coordinate (a non-differentiable point, not a backprop bug)."""
    from app.models import build_model
    from app.optim import build_criterion

    torch.manual_seed(cfg.train.seed)
    classes = cfg.model.num_classes or 10
    size = min(cfg.data.image_size, PROBE_IMAGE_SIZE)
    model = build_model(dataclasses.replace(cfg.model, zero_init_residual=False), classes, (3, size, size))
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    criterion = build_criterion(cfg.optim)
    per_tensor = max(1, min(max_per_tensor, COORDINATES // sum(1 for _ in model.parameters())))
    return check_gradients(model, criterion, x, y, max_per_tensor=per_tensor), Probe(size, per_tensor)
