"""IVON (``optim.name: ivon``): the ``ivon-opt`` package's optimiser (Shen et al. 2024) as an outside anchor,
behind the Bayesian-optimiser contract (``app.bayes.builder``).

The update, the Hessian estimate and the noise are IVON's own code (``ivon.IVON._sample_params``,
``_restore_param_average``, ``step``); this wrapper changes only where its inputs come from:

* **The noise** of a sample: IVON draws it from torch's global stream; ``sampled_params(generator)``
  seeds that stream from the generator for the draw and restores it after (CPU and the parameters'
  device), so a sample depends only on the generator (seed, step, sample) and not on the rank layout.
* **Data parallelism.** IVON reads ``p.grad`` when its own ``sampled_params`` context exits, but the
  trainer averages gradients over ranks only after the last backward. So ``sampled_params`` here only
  samples and restores the weights and keeps, per block, that block's own gradient g_b times its noise
  e_b (the block starts with ``.grad`` set aside and adds it back at the end, so K samples per rank
  and gradient accumulation are exact, not K-sample sums). ``step()`` then averages the summed
  gradient and the summed e_b * g_b over all ranks in one fused allreduce (``reduces_gradients``:
  the trainer adds no ``GradientAverager``) and hands IVON those averages as its ``avg_grad`` and
  ``avg_nxg`` (the 'price' Hessian estimator's input). Every (rank, micro-batch, sample) block is
  weighed alike, as the trainer's loss divides by micro-batches x samples, so this is IVON's mean
  over all the step's samples, the same at any layout of ranks and sample groups.
  Cost: twice the gradient's bytes in that allreduce, not overlapped with backward, and two
  flat parameter-sized buffers (the noise of the block, the e * g sum).

Bayes keys: ess = N_eff / ``bayes.tempering``; weight_decay = 1 / (``bayes.prior_variance`` * N_eff)
(IVON's prior precision, in its per-example units); hess_init = ``bayes.init_precision`` (> 0);
beta1, beta2 = ``optim.betas`` as given. The default [0.9, 0.999] is Adam's, not IVON's 0.99999: a
Hessian average with a time constant of 1,000 steps moves away from hess_init within the short runs
of the bundled data; for ImageNet-length runs set ``optim.betas=[0.9, 0.99999]`` as IVON's authors
do. IVON's other defaults stay: the 'price' Hessian estimator, debiasing, ``rescale_lr`` (the step is
lr * (hess_init + weight_decay) times the preconditioned momentum) and no clipping. The posterior
is N(mean, 1 / (ess * (hess + weight_decay))) per weight, the std IVON samples with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ivon  # type: ignore[import-untyped]  # ivon-opt ships no type information
import torch
from torch import Tensor, nn

from app.bayes.posterior import Gaussian
from app.comm import Comm
from app.config import BayesConfig
from app.errors import ConfigError


class IVON(ivon.IVON):
    """``ivon.IVON`` on ``model``'s trainable parameters, sampled from generators, averaged over ``comm``."""

    reduces_gradients = True

    def __init__(self, model: nn.Module, comm: Comm, *, lr: float, ess: float, hess_init: float, beta1: float,
                 beta2: float, weight_decay: float) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                         weight_decay=weight_decay)
        self.names = [n for n, _ in named]
        self.comm = comm
        self._nxg: Tensor | None = None  # sum over this step's blocks of noise * the block's gradient

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @contextmanager
    def sampled_params(self, generator: torch.Generator) -> Iterator[None]:
        """The block's forward/backward run at one IVON sample drawn with ``generator``."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        device = self._device
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
            torch.manual_seed(seed)
            average, noise = self._sample_params()
        params = self._params()
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            self._restore_param_average(False, average, noise)  # train=False: put the mean back, nothing else
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._nxg = noise.mul_(flat) if self._nxg is None else self._nxg.addcmul_(noise, flat)
            for p, old, new in zip(params, kept, grads, strict=True):
                p.grad = new if old is None else old.add_(new)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """IVON's update from the rank-averaged gradient and noise x gradient of this step's samples."""
        if closure is not None:
            raise ValueError("IVON: no closure; run each sample's forward/backward inside sampled_params()")
        if self._nxg is None:
            raise RuntimeError("IVON: step() without a sampled_params() block since the last step")
        grad = torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None
                          else p.grad.reshape(-1) for p in self._params()])
        if self.comm.size > 1:
            self.comm.grouped_allreduce([grad, self._nxg], op="avg", name="ivon")
        self.state.update(count=1, avg_grad=grad, avg_nxg=self._nxg)
        self._nxg = None
        super().step()

    def posterior(self) -> Gaussian:
        """N(mean, 1 / (ess * (hess + weight_decay))) per trained parameter, by name."""
        mean, std, params = {}, {}, iter(zip(self.names, self._params(), strict=True))
        for group in self.param_groups:
            scale = (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt()
            for part in scale.split([p.numel() for p in group["params"]]):
                name, p = next(params)
                mean[name], std[name] = p.detach().clone(), part.view_as(p).clone()
        return Gaussian(mean, std)

    def state_dict(self) -> dict[str, Any]:
        """torch's, plus IVON's step count (an attribute, not state: its debiasing needs it on resume)."""
        return {**super().state_dict(), "current_step": self.current_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.current_step = int(state.pop("current_step"))
        super().load_state_dict(state)
        for group in self.param_groups:  # IVON keeps these in the groups, which torch does not move
            for key in ("momentum", "hess"):
                group[key] = group[key].to(device=self._device, dtype=self._dtype)


def build_ivon(model: nn.Module, comm: Comm, *, lr: float, bayes: BayesConfig, dataset_size: float,
               betas: list[float]) -> IVON:
    """IVON with the bayes section mapped onto its arguments (the module docstring has the mapping)."""
    if bayes.init_precision <= 0:
        raise ConfigError(f"config: optim.name=ivon needs bayes.init_precision > 0 (its hess_init), got "
                          f"{bayes.init_precision}")
    return IVON(model, comm, lr=lr, ess=dataset_size / bayes.tempering, hess_init=bayes.init_precision,
                beta1=betas[0], beta2=betas[1], weight_decay=1.0 / (bayes.prior_variance * dataset_size))
