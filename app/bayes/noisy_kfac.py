"""Noisy K-FAC (``optim.name: noisy_kfac``): variational inference with matrix-normal weights whose
precision is the run's distributed K-FAC curvature (Zhang et al. 2018, "Noisy natural gradient as
variational inference", Algorithm 2).

**The posterior.** Per K-FAC layer (``app.kfac.factors``: Linear/Conv2d weight with the bias as the last
column, ``W`` of shape (out, k)), q(W) is matrix normal with mean M (the model's parameters) and precision
``(N/tau) (A_d (x) G_d)`` on the column-stacked vec(W) (``(N/tau) (G_d (x) A_d)`` on PyTorch's row-major
flatten), i.e. covariance ``(tau/N) G_d^-1`` between rows and ``A_d^-1`` between columns. N is the
effective dataset size (``bayes.augmentation`` x images), tau ``bayes.tempering``. Why: with a Gaussian
prior N(0, sigma^2 I) (``bayes.prior_variance``) and the likelihood weighted 1/tau, the natural-gradient
fixed point of the ELBO has precision ``(N/tau) F + sigma^-2 I = (N/tau) (F + gamma_in I)`` with
``gamma_in = tau / (N sigma^2)``, the *intrinsic damping*; K-FAC approximates ``F + gamma I`` by its
damped factors ``A_d = A + pi sqrt(gamma) I``, ``G_d = G + sqrt(gamma)/pi I`` (``app.kfac.inverse``).
Here ``gamma = kfac.damping + gamma_in``: the run's K-FAC inverts once per refresh with this total
(``KFAC.extra_damping``), and that one inverse both preconditions and defines the posterior. The paper
samples with gamma_in alone and preconditions with gamma_in + gamma_ex; one damping for both needs no
second factorisation (nor the raw factors on every rank) and makes the posterior a little tighter in
the directions the extrinsic damping (``kfac.damping``) dominates. BatchNorm layers (``kfac.batchnorm``)
get the unit-wise blocks: per channel, (gamma_c, beta_c) ~ N(mean, (tau/N) (F_c + gamma I)^-1).
Parameters K-FAC does not precondition (``kfac.skip``, BatchNorm with ``kfac.batchnorm: false``) are
point estimates: they stay at their mean in every sample and are trained by the same rule without
preconditioning.

**A sample** is ``W = M + s L_G^-T E L_A^-1`` with ``A_d = L_A L_A^T``, ``G_d = L_G L_G^T``,
E standard normal from the caller's generator only and ``s = bayes.noise_scale * sqrt(tau / N)``:
row-major ``cov = s^2 (L_G^-T L_G^-1) (x) (L_A^-T L_A^-1) = s^2 G_d^-1 (x) A_d^-1``. Every rank must
sample every layer, but with ``kfac.share=inverses`` a rank holds the damped *inverses* of every layer,
not the factors (only owners hold those). So each rank factorises what it holds:
``R = chol(G_d^-1)``, ``C = chol(A_d^-1)^T`` and draws ``s R E C``, whose covariance is
``s^2 (R R^T) (x) (C^T C)``, the same; ``L_G^-T = R U`` for an orthogonal U, so the draws equal the
formula's in distribution, not draw by draw (``tests/test_noisy_kfac.py`` checks the covariance against
``(tau/N) (A_d (x) G_d)^-1`` and the formula). Cost: no extra traffic; one float64 Cholesky per factor
and refresh on every rank (n^3/3 flops, a third of the owner's inversion), done at the first sample
after the inverse changed, and one more dense n x n tensor per factor on every rank (the inverses'
memory again). ``kfac.inverse=eigen`` (factored damping) needs no factorisation:
``R = Q_G diag(l_G)^-1/2``, ``C = diag(l_A)^-1/2 Q_A^T``. ``kfac.share=gradients`` leaves each rank only
its own layers' inverses and ``eigen_damping=kron`` is not a Kronecker product; both are refused.
Before a layer's first inverse (the forward/backward of step 0, whose refresh comes after them) it
stays at its mean: its posterior would be the prior's, whose unit variance would replace the
initialisation.

**The update** (descent on the negative ELBO per example), per step t with the parameters at the mean:
``g = grad + delta_t mu`` with ``delta_t = w_t gamma_in`` the prior's gradient, added *before*
preconditioning (the natural gradient of the ELBO is ``(F + gamma_in)^-1 (grad + gamma_in mu)``), so
it is not K-FAC's decoupled weight decay and ``optim.weight_decay`` is unused: the prior is the weight
decay. ``grad`` is the loss gradient averaged over the step's examples and weight samples (and ranks).
Then ``kfac.step`` preconditions (and KL-clips) it into u, and ``m <- b m + u``, ``mu <- mu - lr m``
(b = ``optim.betas[0]``): SGD's heavy ball, as K-FAC with ``optim.name=sgd`` steps, so with
``bayes.noise_scale=0`` and a flat prior this is that run's update (KL clipping bounds each u, and an
averaging momentum would take 1/(1 - b) times smaller steps under the same ``kfac.kl_clip``). KL warm-up:
``w_t = min(1, t / kl_warmup_steps)`` (1 without warm-up) weighs the prior in both the gradient and
the intrinsic damping; the noise scale s stays. The trainer lets this optimiser call ``kfac.step``
(``calls_kfac``), as the prior term must enter before it.

**State.** ``state_dict`` holds the momentum and the step (hence the warm-up); the factors and inverses
are in ``KFAC.state_dict``, and the samples' Cholesky factors are recomputed from the inverses, so a
resumed run draws exactly the weights the uninterrupted one did.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from app.bayes.posterior import Posterior, sampled_params
from app.config import BayesConfig
from app.errors import ConfigError
from app.kfac import KFAC
from app.kfac.factors import KronLayer, Layer, UnitLayer
from app.kfac.inverse import KronCholesky, KronEigen


def cholesky_factor(M: Tensor) -> Tensor:
    """Lower L with ``L L^T = M`` for a (batch of) symmetric positive definite M, computed in float64.

    A matrix that rounding left not quite positive definite (an inverse computed in float32 from an
    ill-conditioned factor) gets ``V diag(sqrt(max(l, 0)))`` from its eigen decomposition instead,
    which has the same product up to the clamped eigenvalues."""
    M64 = M.double()
    L, info = torch.linalg.cholesky_ex(M64)
    if bool((info != 0).any()):
        values, vectors = torch.linalg.eigh(M64)
        L = vectors * values.clamp(min=0).sqrt()[..., None, :]
    return L.to(M.dtype)


@dataclass(frozen=True)
class Block:
    """One layer's noise: ``names`` its parameters; Kronecker layer: ``s R E C`` with E of shape
    (out, k), the weight its first k - 1 (or k) columns and the bias the last; unit-wise (``col`` None):
    per channel ``s R_c e_c``, e_c of shape 2, (gamma_c, beta_c)."""

    names: tuple[str, ...]
    row: Tensor
    col: Tensor | None

    def noise(self, generator: torch.Generator, scale: float, shapes: list[torch.Size]) -> list[Tensor]:
        """The noise added to each of ``names`` (whose shapes are ``shapes``)."""
        rows = self.row.shape[0]
        cols = self.col.shape[0] if self.col is not None else 2
        e = torch.randn((rows, cols), generator=generator, device=self.row.device, dtype=self.row.dtype)
        if self.col is None:
            x = torch.einsum("cij,cj->ci", self.row, e).mul_(scale)
            return [x[:, 0], x[:, 1]]
        x = (self.row @ e @ self.col).mul_(scale)
        d = shapes[0].numel() // rows
        return [x[:, :d].reshape(shapes[0]), *([x[:, d]] if len(self.names) > 1 else [])]


class MatrixNormal(Posterior):
    """Matrix-normal weights per K-FAC layer (unit-wise 2x2 Gaussians for BatchNorm), see the module
    docstring: ``mean`` by parameter name, the ``blocks`` by layer, one noise ``scale``. A draw visits
    the blocks in order and takes one normal tensor each from the generator; parameters of no block
    keep the model's values."""

    kind = "matrix_normal"

    def __init__(self, mean: Mapping[str, Tensor], blocks: Mapping[str, Block], scale: float) -> None:
        missing = [n for b in blocks.values() for n in b.names if n not in mean]
        if missing:
            raise ValueError(f"posterior: matrix_normal has no mean for {missing[0]}")
        self.mean, self.blocks, self.scale = dict(mean), dict(blocks), float(scale)

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        out = {}
        for block in self.blocks.values():
            means = [self.mean[n] for n in block.names]
            for name, m, x in zip(block.names, means, block.noise(generator, self.scale, [m.shape for m in means])):
                out[name] = (m.to(x.dtype) + x).to(m.dtype)
        return out

    def data(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": self.mean,
                "layers": {k: {"names": list(b.names), "row": b.row, "col": b.col} for k, b in self.blocks.items()}}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Posterior:
        blocks = {k: Block(tuple(b["names"]), b["row"], b["col"]) for k, b in data["layers"].items()}
        return cls(data["mean"], blocks, data["scale"])


class NoisyKFAC(torch.optim.Optimizer):
    """Noisy K-FAC on the run's ``KFAC`` (see the module docstring); one parameter group."""

    calls_kfac = True  # the trainer leaves ``kfac.step`` to ``step``: the prior term goes in first

    def __init__(self, model: nn.Module, kfac: KFAC, *, lr: float, bayes: BayesConfig, dataset_size: float,
                 momentum: float, kl_warmup_steps: int) -> None:
        if kfac.cfg.share != "inverses":
            raise ConfigError(f"config: optim.name=noisy_kfac samples every layer on every rank, which needs the "
                              f"inverses there: set kfac.share=inverses (not {kfac.cfg.share})")
        if kfac.cfg.inverse == "eigen" and kfac.cfg.eigen_damping == "kron":
            raise ConfigError("config: optim.name=noisy_kfac needs Kronecker-factored damping for its matrix-normal "
                              "posterior: kfac.eigen_damping=factored (or kfac.inverse=cholesky), not kron")
        self.model, self.kfac = model, kfac
        names = {p: n for n, p in model.named_parameters()}
        super().__init__([p for p in model.parameters() if p.requires_grad], {"lr": lr, "momentum": momentum})
        self.param_groups[0]["step"] = 0
        self.names = names
        self.prior = bayes.tempering / (dataset_size * bayes.prior_variance)  # gamma_in
        self.scale = bayes.noise_scale * math.sqrt(bayes.tempering / dataset_size)
        self.kl_warmup_steps = kl_warmup_steps
        kfac.extra_damping = self.prior_weight
        self._blocks: dict[str, tuple[weakref.ref[Any], Block]] = {}  # by layer: (its inverse, the block)

    def prior_weight(self, step: int) -> float:
        """delta_t = w_t gamma_in: the prior's share of the precision at ``step`` (KL warm-up)."""
        warm = min(1.0, step / self.kl_warmup_steps) if self.kl_warmup_steps > 0 else 1.0
        return warm * self.prior

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Prior term, ``kfac.step`` (after the trainer's ``kfac.begin_step``), momentum, mean update;
        ``.grad`` must be averaged over the ranks and the parameters at the mean."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        t, lr, beta = group["step"], group["lr"], group["momentum"]
        delta = self.prior_weight(t)
        params = [p for p in group["params"] if p.grad is not None]
        for p in params if delta else ():
            p.grad.add_(p, alpha=delta)
        self.kfac.step(lr)
        for p in params:
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p)
            p.add_(state["momentum"].mul_(beta).add_(p.grad), alpha=-lr)
        group["step"] = t + 1
        return loss

    # -- sampling ------------------------------------------------------------------------------
    def _block(self, layer: Layer) -> Block:
        """The layer's noise factors from the inverse this rank holds, recomputed when it changes."""
        cached = self._blocks.get(layer.name)
        if cached is not None and cached[0]() is layer.inverse:
            return cached[1]
        inverse = layer.inverse
        names = tuple(self.names[p] for p in layer.params)
        if isinstance(layer, UnitLayer):
            block = Block(names, cholesky_factor(inverse), None)
        elif isinstance(inverse, KronCholesky):
            block = Block(names, cholesky_factor(inverse.G_inv), cholesky_factor(inverse.A_inv).T)
        else:
            assert isinstance(layer, KronLayer) and isinstance(inverse, KronEigen) and inverse.extra == 0
            block = Block(names, inverse.Q_G * inverse.l_G.rsqrt(), (inverse.Q_A * inverse.l_A.rsqrt()).T)
        self._blocks[layer.name] = (weakref.ref(inverse), block)
        return block

    def _sampled_layers(self) -> Iterator[Layer]:
        """The layers with an inverse on every rank (the shared decisions say which), in K-FAC order."""
        for layer, has in zip(self.kfac.layers.values(), self.kfac.clock.has_inverse):
            if has and layer.inverse is not None:
                yield layer

    def _posterior(self, mean: Callable[[Tensor], Tensor]) -> MatrixNormal:
        blocks = {layer.name: self._block(layer) for layer in self._sampled_layers()}
        params = dict(self.model.named_parameters())
        return MatrixNormal({n: mean(params[n].detach()) for b in blocks.values() for n in b.names}, blocks,
                            self.scale)

    def sampled_params(self, generator: torch.Generator) -> AbstractContextManager[None]:
        """The model holds ``posterior().draw(generator)`` within the block (the means put back exactly
        on exit, ``.grad`` kept); no collective."""
        return sampled_params(self.model, self._posterior(lambda t: t), generator)

    def posterior(self) -> MatrixNormal:
        """A snapshot of the current posterior (means copied); every rank holds all of it, no collective."""
        return self._posterior(torch.clone)
