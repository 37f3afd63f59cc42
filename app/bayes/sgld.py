"""SGLD (``optim.name: sgld``): stochastic-gradient Langevin dynamics on the tempered posterior.

The target is p_tau(theta) ~ exp(-U(theta) / tau) with

    U(theta) = N * L(theta) + |theta|^2 / (2 * prior_variance),

L the mean training loss (what the trainer's criterion averages, the NLL per example), N the
effective dataset size (``dataset_size``: images x ``bayes.augmentation``), tau ``bayes.tempering``.
The overdamped Langevin diffusion d theta = -grad U dt + sqrt(2 tau) dW has p_tau as its stationary
law; its Euler-Maruyama step of length h is theta <- theta - h grad U + sqrt(2 h tau) xi, xi ~ N(0, I).
Taking h = lr / N makes the drift the usual SGD step on the mean loss, and the noise follows from it:

    theta <- theta - lr * (g + theta / (N * prior_variance)) + noise_scale * sqrt(2 * lr * tau / N) * xi

with g the (rank-averaged) minibatch gradient of L, an unbiased estimate of grad L. So the noise is
scaled to the learning rate: its variance 2 lr tau / N per step is what keeps p_tau stationary at any
lr (the LR schedule included), up to the discretisation: on a quadratic U with Hessian A the chain's
stationary covariance is tau (A (I - h A / 2))^-1, the posterior's tau A^-1 as lr -> 0 (and the
minibatch gradient's own noise, of order lr^2 against the injected 2 lr / N, is neglected as in
Welling and Teh 2011). ``bayes.noise_scale`` = 1 is that chain, 0 plain SGD with the prior as weight
decay; ``optim.weight_decay`` is not used (the prior is the decay) and there is no momentum.

The noise of step t comes from ``generator_for(device, seed, t)``, never from torch's global
stream: every rank draws the same noise, so the data-parallel replicas stay equal, and a resume at
step t continues on the same numbers.

``posterior()`` is an ``Ensemble`` of the weights after ``bayes.ensemble_size`` steps spread evenly
over the last half of the run (the last step included). The snapshots live in the optimiser state
(``state[p]["snapshots"]``), so a checkpoint holds them and a resume is exact; cost:
``ensemble_size`` copies of the parameters on their device (ResNet-50 in float32 at 16: 1.6 GB), and
as much in each checkpoint (the posterior export shares their storage, torch.save writes it once).
Before the first snapshot the posterior is the current weights alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from app.bayes.posterior import Ensemble, generator_for
from app.config import BayesConfig


def snapshot_steps(total_steps: int, size: int) -> list[int]:
    """The step counts (1-based) after which SGLD keeps the weights: ``size`` of them (fewer when the
    last half is shorter) evenly over the last half of ``total_steps``, the last step included."""
    half = total_steps - total_steps // 2
    return sorted({total_steps - (k * half) // size for k in range(size)})


class SGLD(torch.optim.Optimizer):
    """Langevin dynamics on ``model``'s trainable parameters (the module docstring has the update)."""

    def __init__(self, model: nn.Module, *, lr: float, bayes: BayesConfig, dataset_size: float, seed: int,
                 total_steps: int) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], {"lr": lr, "step": 0})
        self.names = [n for n, _ in named]
        self.dataset_size, self.seed = dataset_size, seed
        self.prior_variance, self.tempering, self.noise_scale = bayes.prior_variance, bayes.tempering, bayes.noise_scale
        self.keep = set(snapshot_steps(total_steps, bayes.ensemble_size))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay = 1.0 / (self.dataset_size * self.prior_variance)
        for group in self.param_groups:
            lr, t = group["lr"], group["step"]
            std = self.noise_scale * math.sqrt(2.0 * lr * self.tempering / self.dataset_size)
            generator = generator_for(group["params"][0].device, self.seed, t)
            for p in group["params"]:
                # every parameter draws, with or without a gradient: the stream is the same on every rank
                noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                p.mul_(1.0 - lr * decay)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                p.add_(noise, alpha=std)
                if t + 1 in self.keep:
                    self.state[p].setdefault("snapshots", []).append(p.detach().clone())
            group["step"] = t + 1
        return loss

    def posterior(self) -> Ensemble:
        """The snapshots so far (sharing their storage), or the current weights before the first."""
        params = [p for group in self.param_groups for p in group["params"]]
        taken: list[list[Tensor]] = [self.state[p].get("snapshots", []) for p in params]
        if not taken[0]:
            return Ensemble([{n: p.detach().clone() for n, p in zip(self.names, params, strict=True)}])
        return Ensemble([dict(zip(self.names, member, strict=True)) for member in zip(*taken, strict=True)])
