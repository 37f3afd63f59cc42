"""Per-example squared gradients: the Gauss-Newton diagonal VOGN needs every step.

``SquaredGradients.squares()`` returns, for every parameter theta of the hooked layers,
``s = sum_i (dl_i/dtheta)^2`` over the examples i of every armed forward/backward since ``clear()``,
where l_i is example i's own loss. Nothing per-example is kept for the whole model: each layer's
per-example gradients are formed inside its output-gradient hook, squared, summed over the batch and
dropped, together with the recorded input, before backward moves on to the layer below.

* **Capture.** A forward hook records the module input (never the output, which an in-place ReLU may
  overwrite) and puts a tensor hook on the output; that hook fires during the user's
  ``loss.backward()`` with the gradient of the output as it was when the module returned. Hooks do
  nothing unless ``armed`` and the output requires grad (``torch.no_grad()`` forwards). Only the
  first backward through a recorded forward counts (a retained graph's later backwards are ignored).
  Disarm around ``torch.func`` transforms of the model: the hooks would fire inside them too.
* **Scaling.** The backpropagated loss is taken to be the *mean* over the B examples of the forward
  (dim 0 of the layer input), so the output gradient is 1/B of example i's own; it is multiplied by B.
  A loss multiplied by a GradScaler's scale is divided back by ``squares(loss_scale=...)``.
  Micro-batches: several forward/backward pairs between clears add up, each scaled by its own B.
* **Linear** (inputs (B, F) or (B, ..., F)): example i's weight gradient is ``sum_t g_it x_it^T``,
  summed over the extra positions t *before* squaring; with no extra dims its square is
  ``g_i^2 (x_i^2)^T`` and no per-example matrix is formed.
* **Conv2d** (groups=1, zero padding; any stride, padding, dilation, bias): im2col columns
  (``conv_patches``: ``F.unfold``'s values from strided views, faster on CPU),
  ``delta_i (C_out x L) @ cols_i^T (L x C_in*kh*kw)``.
* **BatchNorm2d** (affine): ``sum_hw xhat delta`` for gamma and ``sum_hw delta`` for beta, squared per
  example (not ``(sum xhat^2)(sum delta^2)``, the published VOGN code's defect). ``xhat`` uses the
  statistics BN normalised with. In train mode a per-example gradient also flows through the batch
  mean and variance; like VOGN we take example i's contribution at fixed statistics, which is exact
  in eval mode (running statistics) and drops an O(1/B) coupling term in train mode.
* **Memory.** Transient, one layer at a time, in float32 (float64 for a float64 layer): a Linear with
  extra dims or a Conv2d forms B per-example gradients, B x the weight's size (ResNet-50's largest,
  512x512x3x3 at B=32: 302 MB), plus the Conv2d's im2col columns, B x L x C_in*kh*kw; a BatchNorm2d
  forms one input-sized xhat.

A module called more than once per forward (shared weights) would need its calls' gradients summed
before squaring; it is refused at its second call, as is any recorded forward whose output never got a
gradient. Sums cover this process's examples; data-parallel callers reduce them across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Hooked = nn.Linear | nn.Conv2d | nn.BatchNorm2d


@contextmanager
def _stats_mode(device: torch.device) -> Iterator[None]:
    """No graph, no autocast: the forward hook runs inside the forward's autocast region."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


def linear_squares(x: Tensor, delta: Tensor, bias: bool) -> list[Tensor]:
    """Per-example squared (weight, bias) gradients of a Linear, summed over dim 0 of ``x``/``delta``."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    delta = delta.reshape(b, -1, delta.shape[-1])
    if x.shape[1] == 1:
        x, delta = x[:, 0], delta[:, 0]
        out = [delta.square().t() @ x.square()]
    else:
        out = [torch.bmm(delta.transpose(1, 2), x).square().sum(0)]
        delta = delta.sum(1)
    if bias:
        out.append(delta.square().sum(0))
    return out


def conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col columns of ``x`` as (B, L, C_in*kh*kw), the same values ``F.unfold`` gives, built as
    strided windows of the padded input and one copy: on CPU ``F.unfold`` (aten::im2col) plus the
    transpose copy took ~4x longer and was most of VOGN's step (docs/performance.md)."""
    if isinstance(module.padding, str):  # "same"/"valid": PyTorch precomputes the (maybe uneven) padding
        x = F.pad(x, module._reversed_padding_repeated_twice)
    else:
        x = F.pad(x, (module.padding[1], module.padding[1], module.padding[0], module.padding[0]))
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    windows = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    b, _, h, w = windows.shape[:4]  # (B, C_in, H', W', kh, kw)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(b, h * w, -1)


def conv_squares(module: nn.Conv2d, x: Tensor, delta: Tensor) -> list[Tensor]:
    """Per-example squared (weight, bias) gradients of a Conv2d, summed over the batch."""
    b = x.shape[0]
    cols = conv_patches(module, x)  # (B, L, C_in*kh*kw)
    delta = delta.reshape(b, delta.shape[1], -1)  # (B, C_out, L)
    out = [torch.bmm(delta, cols).square().sum(0).reshape(module.weight.shape)]
    if module.bias is not None:
        out.append(delta.sum(2).square().sum(0))
    return out


def batchnorm_squares(xhat: Tensor, delta: Tensor) -> list[Tensor]:
    """Per-example squared (gamma, beta) gradients of a BatchNorm2d at fixed statistics, summed over the batch."""
    return [(xhat * delta).sum((2, 3)).square().sum(0), delta.sum((2, 3)).square().sum(0)]


@dataclass(eq=False)
class _Site:
    """One hooked module: its running sums and the recording its backward has yet to consume."""

    name: str
    module: Hooked
    dtype: torch.dtype
    sums: list[Tensor] | None = None
    outstanding: list[Any] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.module.parameters(recurse=False))  # weight, then bias if any

    def record(self, x: Tensor) -> Any:
        """What the backward hook needs: the input, and for BN the statistics it normalised with."""
        x = x.detach()
        bn = self.module
        if not isinstance(bn, nn.BatchNorm2d):
            return x
        with _stats_mode(x.device):
            if bn.training or bn.running_mean is None or bn.running_var is None:
                var, mean = torch.var_mean(x.to(self.dtype), dim=(0, 2, 3), correction=0)
            else:
                mean, var = bn.running_mean.to(self.dtype), bn.running_var.to(self.dtype)
            return x, mean, torch.rsqrt(var + bn.eps)

    def add(self, ctx: Any, g: Tensor) -> None:
        """Add one backward's per-example squares (``g`` is the mean loss's output gradient)."""
        m = self.module
        x = ctx[0] if isinstance(m, nn.BatchNorm2d) else ctx
        b = x.shape[0]
        with _stats_mode(g.device):
            delta = g.to(self.dtype) * b
            if isinstance(m, nn.BatchNorm2d):
                _, mean, invstd = ctx
                xhat = (x.to(self.dtype) - mean[:, None, None]) * invstd[:, None, None]
                squares = batchnorm_squares(xhat, delta)
            elif isinstance(m, nn.Conv2d):
                squares = conv_squares(m, x.to(self.dtype), delta)
            else:
                squares = linear_squares(x.to(self.dtype), delta, m.bias is not None)
            if self.sums is None:
                self.sums = squares
            else:
                for s, new in zip(self.sums, squares):
                    s.add_(new)


def _check(m: nn.Module) -> str | None:
    """Why ``m`` cannot be hooked, or None."""
    if not isinstance(m, Hooked):
        return f"{type(m).__name__} is not a Linear, Conv2d or BatchNorm2d"
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return f"Conv2d has groups={m.groups}; only groups=1 is supported"
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return f"Conv2d has padding_mode={m.padding_mode!r}; only 'zeros' is supported"
    if isinstance(m, nn.BatchNorm2d) and not m.affine:
        return "BatchNorm2d is not affine (no parameters)"
    params = list(m.parameters(recurse=False))
    if not all(p.requires_grad for p in params):
        return "some of its parameters do not require grad"
    return None


class SquaredGradients:
    """Hooks that sum per-example squared gradients over the examples of armed forwards.

    ``modules``: the modules to hook (default: every Linear, Conv2d and affine BatchNorm2d whose
    parameters all require grad); an unsupported one is refused by name with a ValueError.
    """

    def __init__(self, model: nn.Module, modules: Iterable[nn.Module] | None = None) -> None:
        names = {m: name for name, m in model.named_modules()}
        if modules is None:
            chosen: list[nn.Module] = [m for m in names if isinstance(m, Hooked) and list(m.parameters(recurse=False))
                      and all(p.requires_grad for p in m.parameters(recurse=False))]
        else:
            chosen = list(modules)
        self._sites: list[_Site] = []
        for m in chosen:
            if m not in names:
                raise ValueError(f"SquaredGradients: {type(m).__name__} module is not part of the model")
            why = _check(m)
            if why is not None:
                raise ValueError(f"SquaredGradients: module {names[m]!r}: {why}")
            assert isinstance(m, Hooked)
            dtype = torch.float64 if m.weight.dtype == torch.float64 else torch.float32
            self._sites.append(_Site(names[m], m, dtype))
        self.armed = False
        self._handles = [s.module.register_forward_hook(partial(self._forward_hook, s)) for s in self._sites]

    def layers(self) -> list[list[nn.Parameter]]:
        """The hooked modules' parameters, one list per module, in registration order."""
        return [site.params for site in self._sites]

    def _forward_hook(self, site: _Site, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if not (self.armed and output.requires_grad):
            return
        if site.outstanding:
            raise RuntimeError(f"SquaredGradients: module {site.name!r} ran again before its last armed output "
                               f"got a gradient (shared weights, or a forward without backward: clear() first)")
        site.outstanding = [site.record(inputs[0])]
        output.register_hook(partial(self._grad_hook, site, site.outstanding))

    @staticmethod
    def _grad_hook(site: _Site, recording: list[Any], g: Tensor) -> None:
        if recording:  # emptied by the first backward through it, or by clear()
            site.add(recording.pop(), g)

    def squares(self, loss_scale: float = 1.0) -> dict[nn.Parameter, Tensor]:
        """``sum_i (dl_i/dtheta)^2`` per hooked parameter (its shape; float32, or float64 for float64).

        ``loss_scale``: the factor the backpropagated mean loss was multiplied by (GradScaler).
        """
        if not loss_scale > 0:
            raise ValueError(f"SquaredGradients: loss_scale must be positive, got {loss_scale}")
        out: dict[nn.Parameter, Tensor] = {}
        for site in self._sites:
            if site.outstanding:
                raise RuntimeError(f"SquaredGradients: module {site.name!r} has an armed forward whose output "
                                   f"got no gradient yet")
            if site.sums is None:
                raise RuntimeError(f"SquaredGradients: no armed backward reached module {site.name!r} "
                                   f"since clear()")
            out.update((p, s / loss_scale**2) for p, s in zip(site.params, site.sums))
        return out

    def clear(self) -> None:
        """Drop the sums and any recording still waiting for its gradient."""
        for site in self._sites:
            site.outstanding.clear()
            site.outstanding = []
            site.sums = None

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
