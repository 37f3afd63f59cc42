"""VOGN: variational online Gauss-Newton (Khan et al. 2018; Osawa et al. 2019), data x sample parallel.

The posterior is mean-field Gaussian, q(w) = N(mu, sigma^2) per weight; the model's parameters hold mu.
A step (``optim.name: vogn``):

1. each of the rank's weight samples w = mu + sigma * eps (``sampled_params``, eps from the sample's
   generator) runs a forward/backward of the rank's batch; ``SquaredGradients`` adds up the
   per-example squared gradients (the Gauss-Newton diagonal; BatchNorm's per example term is
   ``(sum_t xhat_t delta_t)^2``) while ``.grad`` collects the mean gradient;
2. g (mean gradient) and h (mean per-example squared gradient) over all (example, sample) pairs of
   all ranks: one reduce-scatter hands each layer's to its owner (the greedy-LPT placement K-FAC
   uses, cost = the layer's size);
3. the owner updates its layers, with delta = kl(t) / (prior_variance * N), N = images x
   ``bayes.augmentation`` and kl(t) the KL warm-up weight (rising linearly to 1 over
   ``bayes.kl_warmup_epochs``)::

       m     <- beta1 m + (1 - beta1) (g + delta mu)          beta1 = optim.betas[0]
       s     <- beta2 s + (1 - beta2) h                       beta2 = bayes.precision_decay: it weighs
                                                              the OLD s, (1 - beta2) the new h
       mu    <- mu - lr m / (s + delta + damping)             damping = bayes.damping (step only)
       sigma <- sqrt(tau / (N (s + delta)))                   tau = bayes.tempering

   (no bias correction: m starts at 0, s at ``bayes.init_precision``);
4. one allgather gives every rank every layer's new mu and sigma, so all replicas stay equal and
   every rank can sample.

The reduce-scatter and the allgather move what one ring allreduce of (g, h) would, and the update
between them is done once per layer instead of on every rank; m and s live on their owner only (2/W
of the parameters' size per rank). ``optim.weight_decay`` is not used: the prior precision is VOGN's.
Refused: parameters no squared-gradient hook covers (the model must be Linear/Conv2d/BatchNorm2d),
shared modules (``SquaredGradients`` refuses them). The loss the trainer backpropagates is each
forward's mean loss divided by the number of forwards of the step (as ``Trainer._train_step`` does);
the squared gradients are rescaled by the forwards counted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from app.bayes.posterior import Gaussian, sampled_params
from app.bayes.sqgrad import SquaredGradients
from app.comm import Comm
from app.config import BayesConfig
from app.errors import ConfigError
from app.kfac.placement import lpt


class VOGN(torch.optim.Optimizer):
    reduces_gradients = True  # g and h travel together in step(); the trainer adds no GradientAverager

    def __init__(self, model: nn.Module, comm: Comm, *, lr: float, bayes: BayesConfig, dataset_size: float,
                 momentum: float, kl_warmup_steps: int = 0) -> None:
        if bayes.init_precision <= 0 and kl_warmup_steps > 0:
            raise ConfigError("config: bayes.init_precision=0 with a KL warm-up leaves the first steps' posterior "
                              "variance tau / (N (s + delta)) infinite; set bayes.init_precision > 0")
        if dataset_size <= 0:
            raise ValueError(f"VOGN: dataset_size={dataset_size} must be > 0")
        self.model, self.comm, self.bayes = model, comm, bayes
        self.n, self.beta1, self.kl_warmup_steps = float(dataset_size), momentum, kl_warmup_steps
        self.squares = SquaredGradients(model)
        layers = self.squares.layers()
        covered = {p for layer in layers for p in layer}
        names = {p: n for n, p in model.named_parameters()}
        uncovered = [n for p, n in names.items() if p.requires_grad and p not in covered]
        if uncovered:
            raise ConfigError(f"config: optim.name=vogn needs per-example squared gradients of every parameter; "
                              f"{uncovered[0]} is not in a Linear, Conv2d or BatchNorm2d layer")
        params = [p for layer in layers for p in layer]
        super().__init__(params, {"lr": lr, "step": 0})
        self.names = names
        owners = lpt([float(sum(p.numel() for p in layer)) for layer in layers], comm.size)
        self.segments: list[list[nn.Parameter]] = [
            [p for layer, r in zip(layers, owners) for p in layer if r == rank] for rank in range(comm.size)]
        self.mine = self.segments[comm.rank]
        self.sizes = [2 * sum(p.numel() for p in seg) for seg in self.segments]
        self.std = {p: torch.empty_like(p, requires_grad=False) for p in params}
        for p in self.mine:
            self._init_state(p)
        self._set_std(params, {p: torch.full_like(p, bayes.init_precision) for p in params})
        self._forwards = 0
        self._examples = 0
        self._counting = False
        self._hook = model.register_forward_pre_hook(self._count)

    # -- the prior's weight and the posterior ------------------------------------------------------
    def delta(self, step: int) -> float:
        """The prior precision per example, delta = kl(step) / (prior_variance * N)."""
        weight = min(1.0, (step + 1) / self.kl_warmup_steps) if self.kl_warmup_steps > 0 else 1.0
        return weight / (self.bayes.prior_variance * self.n)

    def _init_state(self, p: Tensor) -> None:
        self.state[p] = {"m": torch.zeros_like(p), "s": torch.full_like(p, self.bayes.init_precision)}

    def _set_std(self, params: list[nn.Parameter], s: dict[nn.Parameter, Tensor]) -> None:
        delta = self.delta(self.param_groups[0]["step"])
        for p in params:
            torch.div(self.bayes.tempering / self.n, s[p] + delta, out=self.std[p]).sqrt_()

    def _gaussian(self, copy: bool) -> Gaussian:
        def take(t: Tensor) -> Tensor:
            return t.detach().clone() if copy else t.detach()
        return Gaussian({self.names[p]: take(p) for p in self.std},
                        {self.names[p]: take(s) for p, s in self.std.items()})

    def posterior(self) -> Gaussian:
        """N(mu, sigma^2) of every parameter, by name; every rank holds all of it (no collective)."""
        return self._gaussian(copy=True)

    # -- sampling ------------------------------------------------------------------------------
    def _count(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self._counting:
            self._forwards += 1
            self._examples += int(inputs[0].shape[0])

    @contextmanager
    def sampled_params(self, generator: torch.Generator) -> Iterator[None]:
        """One weight sample for a forward/backward; its per-example squared gradients are recorded."""
        current = self._gaussian(copy=False)  # drawn before the parameters are overwritten
        self.squares.armed = self._counting = True
        try:
            with sampled_params(self.model, current, generator):
                yield
        finally:
            self.squares.armed = self._counting = False

    # -- the update ----------------------------------------------------------------------------
    def _local(self, seg: list[nn.Parameter], sq: dict[nn.Parameter, Tensor]) -> list[Tensor]:
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in seg]
        return grads + [sq[p].to(p.dtype).reshape(-1) / self._examples for p in seg]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("VOGN: no closure; run the forward/backward inside sampled_params")
        if self._forwards == 0:
            raise RuntimeError("VOGN: step() without a forward/backward inside sampled_params since the last step")
        sq = self.squares.squares(loss_scale=1.0 / self._forwards)
        if self.comm.size > 1:
            flat = torch.cat([t for seg in self.segments for t in self._local(seg, sq)])
            mine = self.comm.reduce_scatter(flat, self.sizes, op="avg", name="vogn_reduce")
        else:
            mine = torch.cat(self._local(self.mine, sq))
        numels = [p.numel() for p in self.mine]
        half = sum(numels)
        g_parts, h_parts = mine[:half].split(numels), mine[half:].split(numels)
        group = self.param_groups[0]
        lr, delta, beta2 = group["lr"], self.delta(group["step"]), self.bayes.precision_decay
        for p, g, h in zip(self.mine, g_parts, h_parts):
            st = self.state[p]
            m, s = st["m"], st["s"]
            m.mul_(self.beta1).add_(g.view_as(p) + delta * p, alpha=1 - self.beta1)
            s.mul_(beta2).add_(h.view_as(p), alpha=1 - beta2)
            p.addcdiv_(m, s + (delta + self.bayes.damping), value=-lr)
        group["step"] += 1
        self._set_std(self.mine, {p: self.state[p]["s"] for p in self.mine})
        if self.comm.size > 1:
            out = torch.cat([p.reshape(-1) for p in self.mine] + [self.std[p].reshape(-1) for p in self.mine])
            parts = self.comm.allgather(out, name="vogn_share", lengths=self.sizes)
            for seg, part in zip(self.segments, parts):
                if seg is self.mine:
                    continue
                sizes = [p.numel() for p in seg]
                n = sum(sizes)
                for p, mu, sd in zip(seg, part[:n].split(sizes), part[n:].split(sizes)):
                    p.copy_(mu.view_as(p))
                    self.std[p].copy_(sd.view_as(p))
        self.squares.clear()
        self._forwards = self._examples = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective: the full m and s, gathered from the owners to rank 0 (the writer); {} elsewhere."""
        base = super().state_dict()
        if self.comm.size == 1:
            return base
        mine = torch.cat([self.state[p][k].reshape(-1) for k in ("m", "s") for p in self.mine]) \
            if self.mine else torch.zeros(0, dtype=next(iter(self.std)).dtype, device=self.comm.device)
        parts = self.comm.gather(mine, 0, name="checkpoint", lengths=self.sizes)
        if parts is None:
            return {}
        index = {p: i for i, p in enumerate(self.param_groups[0]["params"])}
        state: dict[int, dict[str, Tensor]] = {}
        for seg, part in zip(self.segments, parts):
            sizes = [p.numel() for p in seg]
            n = sum(sizes)
            for p, m, s in zip(seg, part[:n].split(sizes), part[n:].split(sizes)):
                state[index[p]] = {"m": m.view_as(p).cpu().clone(), "s": s.view_as(p).cpu().clone()}
        return {"state": state, "param_groups": base["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Every rank reads the full state, recomputes every sigma from s, keeps m and s of its own layers."""
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        missing = [self.names[p] for p in params if p not in self.state]
        if missing:
            raise ValueError(f"VOGN: the optimiser state has no m/s for {missing[0]}")
        self._set_std(params, {p: self.state[p]["s"] for p in params})
        mine = set(self.mine)
        for p in params:
            if p not in mine:
                del self.state[p]
