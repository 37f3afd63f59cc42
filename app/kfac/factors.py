"""Per-layer curvature state: Kronecker factors (Linear, Conv2d) and unit-wise blocks (BatchNorm2d).

Conventions, each proved by ``tests/test_kfac_oracles.py``:

* **Rows.** Every example of a Linear layer, and every (example, output position) of a Conv2d
  (im2col via ``F.unfold``, honouring stride, padding and dilation), is one row ``a`` of the input
  matrix; the bias is an appended 1, i.e. the last row/column of A, matching PyTorch's row-major
  ``vec([W.flatten(1) | b])``.
* **A** is the mean of ``a a^T`` over all rows (examples and positions).
* **G** is ``(1/N) sum_i sum_t g_it g_it^T`` over the N examples and T positions, where
  ``g_it = dl_i/ds_it`` is the gradient of example i's own loss (KFC, Grosse & Martens 2016: positions
  are summed in G and averaged in A). For one example and one position ``G (x) A`` is then exactly
  that example's Fisher block; for T positions it is the KFC approximation of
  ``E[vec(dW) vec(dW)^T]`` with ``dW = sum_t g_t a_t^T``.
* **Loss scaling.** A mean-reduced loss over the N examples of a step gives
  ``dL/ds_it = g_it / N``, so the captured sums are multiplied by N (``emp``); the sampled losses
  of ``mc``/``exact`` are sum-reduced, so theirs are divided by N. The caller passes that factor
  as ``g_scale`` to ``step_factors``.
* **BatchNorm2d (SP-NGD unit-wise).** Per channel c and example i, ``u_i = sum_t xhat_t delta_t``
  and ``v_i = sum_t delta_t`` are example i's gradients w.r.t. gamma_c and beta_c; the block is
  ``(1/N) sum_i [[u^2, uv], [uv, v^2]]`` with the same loss scaling as G. ``xhat`` is recomputed
  from the BN *input* with the statistics BN normalised with (batch statistics in training mode,
  running ones in eval mode); BN's output is no use since an in-place ReLU overwrites it.

All statistics are accumulated in float32 (float64 for a float64 model) with autocast disabled.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.kfac import inverse as inv
from app.kfac.exchange import Slot
from app.kfac.inverse import Retries


@contextmanager
def _stats_mode(device: torch.device) -> Iterator[None]:
    """No graph, no autocast: hooks run inside the forward's autocast region."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


def gram(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x^T x`` in ``dtype``; on CUDA a half-precision x stays in its GEMM with float32 output."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32:
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x = x.to(dtype)
    return x.t() @ x


def input_rows(module: nn.Linear | nn.Conv2d, x: Tensor) -> Tensor:
    """The layer input as a (rows, features) matrix: im2col rows for Conv2d, flattened for Linear."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": PyTorch precomputes the (maybe uneven) padding
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = (0, 0)
    if module.kernel_size == (1, 1) and padding == (0, 0):  # no im2col copy; free for channels_last
        x = x[:, :, ::module.stride[0], ::module.stride[1]]
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(g: Tensor, channel_dim: int) -> Tensor:
    """An output gradient as a (rows, out_features) matrix."""
    return g.movedim(channel_dim, -1).reshape(-1, g.shape[channel_dim])


def input_factor_sum(rows: Tensor, bias: bool, dtype: torch.dtype) -> Tensor:
    """``sum a a^T`` with the bias 1 appended, without materialising the ones column."""
    aa = gram(rows, dtype)
    if not bias:
        return aa
    d = aa.shape[0]
    s = rows.sum(0, dtype=dtype)
    out = aa.new_empty(d + 1, d + 1)
    out[:d, :d] = aa
    out[:d, d] = s
    out[d, :d] = s
    out[d, d] = rows.shape[0]
    return out


class Layer(ABC):
    """One preconditioned module: this step's sums, the running factors and their inverse.

    ``factors`` is the list of running-average statistics ((A, G) or (F,)) and ``inverse`` what the
    pure functions of ``app.kfac.inverse`` made of them; both are tensors (or small dataclasses of
    tensors), so ``app.kfac.exchange`` can move, reduce or invert them on any rank. In data
    parallel runs only the layer's owner holds ``factors``. ``due``: record statistics this step.
    """

    def __init__(self, name: str, module: nn.Module, dtype: torch.dtype) -> None:
        self.name = name
        self.module = module
        self.dtype = dtype
        self.factors: list[Tensor] | None = None
        self.inverse: Any = None
        self.due = True
        self.examples = 0  # examples seen by the forward hooks this step
        self._out_sum: Tensor | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The preconditioned parameters: weight, then bias if any."""
        return list(self.module.parameters(recurse=False))

    def reset(self) -> None:
        """Drop this step's sums."""
        self.examples = 0
        self._out_sum = None

    @property
    @abstractmethod
    def factor_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``factors``, known without any data (placement, wire layout)."""

    @property
    def factor_slots(self) -> list[Slot]:
        """Wire layout of ``factors``: all symmetric."""
        return [Slot(s, True) for s in self.factor_shapes]

    @abstractmethod
    def inverse_slots(self, method: str) -> list[Slot]:
        """Wire layout of ``inverse_tensors()`` for inverse ``method``."""

    @abstractmethod
    def inverse_tensors(self) -> list[Tensor]:
        """``inverse`` as tensors laid out by ``inverse_slots``."""

    @abstractmethod
    def set_inverse_tensors(self, tensors: list[Tensor]) -> None:
        """Set ``inverse`` from what ``inverse_tensors`` returned on another rank."""

    @abstractmethod
    def add_input(self, x: Tensor) -> Any:
        """Record one forward's input; returns what ``add_output_grad`` needs for that forward."""

    @abstractmethod
    def add_output_grad(self, g: Tensor, ctx: Any) -> None:
        """Record one backward's gradient w.r.t. the module output."""

    @abstractmethod
    def step_factors(self, g_scale: float) -> list[Tensor]:
        """This step's statistics, same layout as ``factors``; see the module docstring."""

    @abstractmethod
    def invert(self, damping: float, method: str, eigen_damping: str) -> Retries:
        """Compute ``inverse`` from ``factors``."""

    @abstractmethod
    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradients of ``params`` (same order) preconditioned with ``inverse``, in ``dtype``."""

    @abstractmethod
    def inverse_state(self) -> Any:
        """``inverse`` as checkpointable tensors."""

    @abstractmethod
    def load_inverse_state(self, state: Any) -> None: ...

    def fold(self, new: list[Tensor], decay: float, gap: int) -> None:
        """Step-aware running average ``decay**gap * old + (1 - decay**gap) * new``; the first update
        initialises.

        ``gap``: steps since the previous fold. The result is exactly what the per-step average
        ``x <- decay * x + (1 - decay) * s`` would hold had the statistics ``s`` been ``new`` on each
        of those ``gap`` steps: the refresh's statistics stand for the steps since the last one, so
        the average's age is counted in steps, not refreshes (one ``decay`` per refresh would leave a
        layer refreshed every k steps with curvature ~k/(1 - decay) steps old).
        """
        if self.factors is None:
            self.factors = [t.clone() for t in new]
            return
        weight = 1.0 - decay ** gap
        for old, t in zip(self.factors, new):
            old.lerp_(t, weight)

    def _add_out(self, s: Tensor) -> None:
        self._out_sum = s if self._out_sum is None else self._out_sum.add_(s)

    @property
    def captured(self) -> bool:
        """Whether this step saw both a forward and an output gradient."""
        return self.examples > 0 and self._out_sum is not None

    def _require_captured(self) -> Tensor:
        if self.examples == 0 or self._out_sum is None:  # not `captured`: mypy narrows only this
            missing = "no forward" if self.examples == 0 else "no output gradient"
            raise RuntimeError(f"K-FAC: layer {self.name!r} saw {missing} this step (call fisher_backward(out) "
                               f"for fisher=mc/exact and backward before step(), or add it to kfac.skip)")
        return self._out_sum


class KronLayer(Layer):
    """Linear or Conv2d: ``F ~= G (x) A``, preconditioned gradient ``G^-1 grad A^-1``."""

    module: nn.Linear | nn.Conv2d

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__(name, module, dtype)
        self._channel_dim = -1 if isinstance(module, nn.Linear) else 1
        self._in_sum: Tensor | None = None
        self._rows = 0

    def reset(self) -> None:
        super().reset()
        self._in_sum = None
        self._rows = 0

    @property
    def factor_shapes(self) -> list[tuple[int, ...]]:
        w = self.module.weight
        a = w[0].numel() + (self.module.bias is not None)
        return [(a, a), (w.shape[0], w.shape[0])]

    def inverse_slots(self, method: str) -> list[Slot]:
        a, g = self.factor_shapes
        if method == "cholesky":
            return [Slot(a, True), Slot(g, True)]
        return [Slot(a, False), Slot(a[:1], False), Slot(g, False), Slot(g[:1], False), Slot((1,), False)]

    def inverse_tensors(self) -> list[Tensor]:
        i = self.inverse
        if isinstance(i, inv.KronCholesky):
            return [i.A_inv, i.G_inv]
        return [i.Q_A, i.l_A, i.Q_G, i.l_G, i.Q_A.new_tensor([i.extra])]

    def set_inverse_tensors(self, tensors: list[Tensor]) -> None:
        if len(tensors) == 2:
            self.inverse = inv.KronCholesky(*tensors)
        else:
            Q_A, l_A, Q_G, l_G, extra = tensors
            self.inverse = inv.KronEigen(Q_A, l_A, Q_G, l_G, float(extra))

    def add_input(self, x: Tensor) -> None:
        with _stats_mode(x.device):
            rows = input_rows(self.module, x)
            s = input_factor_sum(rows, self.module.bias is not None, self.dtype)
        self._in_sum = s if self._in_sum is None else self._in_sum.add_(s)
        self._rows += rows.shape[0]
        self.examples += x.shape[0] if x.dim() > 1 else 1

    def add_output_grad(self, g: Tensor, ctx: None) -> None:
        with _stats_mode(g.device):
            self._add_out(gram(output_rows(g, self._channel_dim), self.dtype))

    def step_factors(self, g_scale: float) -> list[Tensor]:
        g_sum = self._require_captured()
        assert self._in_sum is not None
        return [self._in_sum / self._rows, g_sum * g_scale]

    def invert(self, damping: float, method: str, eigen_damping: str) -> Retries:
        assert self.factors is not None
        A, G = self.factors
        self.inverse, retries = inv.invert_kron(A, G, damping, method, eigen_damping)
        return retries

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        w = grads[0]
        mat = torch.cat([w.reshape(w.shape[0], -1), *(b[:, None] for b in grads[1:])], 1)
        p = self.inverse.apply(mat.to(self.dtype))
        d = w[0].numel()
        out = [p[:, :d].reshape(w.shape)]
        if len(grads) > 1:
            out.append(p[:, d])
        return out

    def inverse_state(self) -> Any:
        return inv.inverse_state(self.inverse)

    def load_inverse_state(self, state: Any) -> None:
        self.inverse = inv.inverse_from_state(state, self.params[0].device, self.dtype)


class UnitLayer(Layer):
    """BatchNorm2d: one damped 2x2 Fisher block per channel over (gamma_c, beta_c)."""

    module: nn.BatchNorm2d

    @property
    def factor_shapes(self) -> list[tuple[int, ...]]:
        return [(self.module.num_features, 2, 2)]

    def inverse_slots(self, method: str) -> list[Slot]:
        return self.factor_slots  # closed-form 2x2 inverses, symmetric, whatever the method

    def inverse_tensors(self) -> list[Tensor]:
        return [self.inverse]

    def set_inverse_tensors(self, tensors: list[Tensor]) -> None:
        (self.inverse,) = tensors

    def add_input(self, x: Tensor) -> tuple[Tensor, int, Tensor, Tensor]:
        bn = self.module
        with _stats_mode(x.device):
            if bn.training or bn.running_mean is None or bn.running_var is None:
                var, mean = torch.var_mean(x.to(self.dtype), dim=(0, 2, 3), correction=0)
            else:
                mean, var = bn.running_mean.to(self.dtype), bn.running_var.to(self.dtype)
            invstd = torch.rsqrt(var + bn.eps)
        self.examples += x.shape[0]
        return x, x._version, mean, invstd

    def add_output_grad(self, g: Tensor, ctx: tuple[Tensor, int, Tensor, Tensor]) -> None:
        x, version, mean, invstd = ctx
        if x._version != version:
            raise RuntimeError(f"K-FAC: the input of BatchNorm {self.name!r} was modified in place after "
                               f"the forward; its normalised input can no longer be recomputed")
        with _stats_mode(g.device):
            xhat = (x.to(self.dtype) - mean[:, None, None]) * invstd[:, None, None]
            delta = g.to(self.dtype)
            uv = torch.stack([(xhat * delta).sum((2, 3)), delta.sum((2, 3))], -1)  # (N, C, 2)
            self._add_out(torch.einsum("nci,ncj->cij", uv, uv))

    def step_factors(self, g_scale: float) -> list[Tensor]:
        return [self._require_captured() * g_scale]

    def invert(self, damping: float, method: str, eigen_damping: str) -> Retries:
        assert self.factors is not None
        self.inverse = inv.unitwise_inverse(self.factors[0], damping)
        return Retries()

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        p = inv.unitwise_apply(self.inverse, torch.stack(grads, -1).to(self.dtype))
        return [p[:, 0], p[:, 1]]

    def inverse_state(self) -> Any:
        return self.inverse

    def load_inverse_state(self, state: Any) -> None:
        self.inverse = state.to(device=self.params[0].device, dtype=self.dtype)


def find_layers(model: nn.Module, skip: list[str], batchnorm: bool) -> dict[str, Layer]:
    """Every trainable Linear, Conv2d (and BatchNorm2d when ``batchnorm``) not matched by ``skip``.

    Other modules keep their plain gradient. Unsupported variants are refused by name so the user
    can skip them instead of getting a silently wrong preconditioner.
    """
    layers: dict[str, Layer] = {}
    for name, m in model.named_modules():
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            continue
        params = list(m.parameters(recurse=False))
        if not params or not all(p.requires_grad for p in params):
            continue
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise ValueError(f"K-FAC: Conv2d {name!r} has groups={m.groups}; grouped convolutions are "
                                 f"not supported, add it to kfac.skip")
            if m.padding_mode != "zeros":
                raise ValueError(f"K-FAC: Conv2d {name!r} has padding_mode={m.padding_mode!r}; only 'zeros' "
                                 f"is supported, add it to kfac.skip")
            layers[name] = KronLayer(name, m, dtype)
        elif isinstance(m, nn.Linear):
            layers[name] = KronLayer(name, m, dtype)
        elif batchnorm and isinstance(m, nn.BatchNorm2d) and m.affine:
            layers[name] = UnitLayer(name, m, dtype)
    return layers
