"""The K-FAC / SP-NGD preconditioner: when to refresh what, and in which order, for one step."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from app.config import KFACConfig
from app.kfac.capture import Capture
from app.kfac.factors import Layer, find_layers
from app.kfac.fisher import sampled_losses
from app.kfac.inverse import Retries

log = logging.getLogger(__name__)


class AllReduce(Protocol):
    """The part of ``app.comm.Comm`` K-FAC uses: an in-place allreduce."""

    def allreduce(self, t: Tensor, op: str = "avg", name: str = "") -> Any: ...


class KFAC:
    """Kronecker-factored natural-gradient preconditioning of Linear, Conv2d and BatchNorm2d layers.

    Per step: ``begin_step(step)``; per micro-batch ``out = model(x)``,
    ``fisher_backward(out)``, ``loss.backward()``; data-parallel gradient averaging; ``step(lr)``,
    which replaces ``.grad`` of every preconditioned parameter; then ``optimizer.step()``.

    * **Loss.** The training loss must be the mean over the step's examples (criterion mean,
      divided by k for k equal micro-batches); the ``emp`` G scaling relies on it (see
      ``app.kfac.factors``).
    * **Weight decay** is not part of the Fisher: K-FAC preconditions the loss gradient only and the
      optimiser adds weight decay to the preconditioned gradient afterwards (decoupled), so
      ``w -= lr * (F^-1 grad + wd * w)``. KL clipping measures the preconditioned loss gradient only.
    * **Data parallel.** With ``comm``, each step's factors are averaged over the ranks before they
      enter the running average, and every rank inverts every factor.
    * **Intervals.** Factors are captured on steps that are multiples of ``factor_interval``,
      inverses refreshed on multiples of ``inverse_interval``, and both whenever a layer has none
      yet (so the first step does both); every step is preconditioned with the latest inverses.
    * **Failures.** A layer whose new factors contain NaN/Inf keeps its previous factors and
      inverse for the step (plain gradient if it has none), counted in ``kfac_nan_skips`` and logged
      once per layer. Cholesky failures retry in float64, then with 10x damping, counted.
    """

    def __init__(self, model: nn.Module, cfg: KFACConfig, comm: AllReduce | None = None) -> None:
        self.cfg = cfg
        self.comm = comm
        self.layers: dict[str, Layer] = find_layers(model, cfg.skip, cfg.batchnorm)
        self._capture = Capture(self.layers.values(), hooked_backward=cfg.fisher == "emp")
        self._step: int | None = None
        self._factors_due = False
        self._inverse_due = False
        self._counters = {"kfac_layers": 0, "kfac_factor_updates": 0, "kfac_inverse_updates": 0,
                          "kfac_nan_skips": 0, "kfac_fp64_retries": 0, "kfac_damping_retries": 0}
        self._kl_scale: Tensor | float = 1.0
        self._warned: set[str] = set()

    # -- the step ------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Decide what is due at ``step`` and arm the hooks when factors are."""
        missing = any(layer.factors is None for layer in self.layers.values())
        self._step = step
        self._factors_due = step % self.cfg.factor_interval == 0 or missing
        self._inverse_due = step % self.cfg.inverse_interval == 0
        for layer in self.layers.values():
            layer.reset()
        self._capture.clear()
        self._capture.armed = self._factors_due

    def fisher_backward(self, out: Tensor) -> None:
        """mc/exact: backward the sampled losses into G only (``.grad`` untouched); emp: no-op."""
        if self._capture.armed and self.cfg.fisher != "emp":
            self._capture.backward(sampled_losses(out, self.cfg.fisher))

    def step(self, lr: float, loss_scale: float = 1.0) -> None:
        """Update factors and inverses when due, then write preconditioned gradients into ``.grad``.

        ``loss_scale``: the factor the loss was multiplied by before ``backward`` (fp16
        ``GradScaler.get_scale()``); it is divided out of the emp G. ``.grad`` must already be unscaled.
        """
        if self._step is None:
            raise RuntimeError("K-FAC: step() called without begin_step()")
        self._capture.armed = False
        self._capture.clear()
        if self._factors_due:
            self._update_factors(loss_scale)
            self._counters["kfac_factor_updates"] += 1
        retries = Retries()
        inverted = False
        for layer in self.layers.values():
            if layer.factors is not None and (self._inverse_due or layer.inverse is None):
                retries += layer.invert(self.cfg.damping, self.cfg.inverse, self.cfg.eigen_damping)
                inverted = True
        self._counters["kfac_inverse_updates"] += inverted
        self._counters["kfac_fp64_retries"] += retries.fp64
        self._counters["kfac_damping_retries"] += retries.damping
        self._precondition(lr)
        for layer in self.layers.values():
            layer.reset()
        self._step = None

    def _update_factors(self, loss_scale: float) -> None:
        layers = list(self.layers.values())
        new = [layer.step_factors(self._g_scale(layer, loss_scale)) for layer in layers]
        if self.comm is not None:
            _allreduce_avg(self.comm, [t for ts in new for t in ts])
        finite = torch.stack([torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts in new]).tolist()
        for layer, ts, ok in zip(layers, new, finite):
            if ok:
                layer.fold(ts, self.cfg.stat_decay)
                continue
            self._counters["kfac_nan_skips"] += 1
            if layer.name not in self._warned:
                self._warned.add(layer.name)
                log.warning("K-FAC: non-finite factors in layer %s at step %s; its factor update is skipped "
                            "(counted in kfac_nan_skips, logged once per layer)", layer.name, self._step)

    def _g_scale(self, layer: Layer, loss_scale: float) -> float:
        """Turns the captured output-gradient sums into G (see ``app.kfac.factors``)."""
        n = max(layer.examples, 1)
        return n / loss_scale ** 2 if self.cfg.fisher == "emp" else 1.0 / n

    def _precondition(self, lr: float) -> None:
        grads: list[Tensor] = []  # .grad of the preconditioned parameters
        updates: list[Tensor] = []
        count = 0
        for layer in self.layers.values():
            layer_grads = [p.grad for p in layer.params if p.grad is not None]
            if layer.inverse is None or len(layer_grads) < len(layer.params):
                continue
            grads += layer_grads
            updates += layer.precondition(layer_grads)
            count += 1
        self._counters["kfac_layers"] = count
        if not updates:
            return
        scale: Tensor | float = 1.0
        if self.cfg.kl_clip > 0:
            vg = torch.stack([(u * g.to(u.dtype)).sum() for g, u in zip(grads, updates)]).sum()
            bound = torch.sqrt(self.cfg.kl_clip / (lr ** 2 * vg.clamp(min=torch.finfo(vg.dtype).tiny)))
            scale = bound.clamp(max=1.0)
        self._kl_scale = scale
        for g, u in zip(grads, updates):
            g.copy_(u * scale)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, float]:
        """Counters for logging; the keys are fixed from construction on."""
        return {**self._counters, "kfac_kl_scale": float(self._kl_scale)}

    def state_dict(self) -> dict[str, Any]:
        """Factors, inverses (so a resumed run between inverse refreshes is exact) and counters."""
        return {
            "counters": dict(self._counters),
            "kl_scale": float(self._kl_scale),
            "inverse_method": [self.cfg.inverse, self.cfg.eigen_damping, self.cfg.damping],
            "layers": {name: {"factors": layer.factors,
                              "inverse": None if layer.inverse is None else layer.inverse_state()}
                       for name, layer in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; inverses made with another method/damping are recomputed."""
        saved, ours = set(state["layers"]), set(self.layers)
        if saved != ours:
            raise ValueError(f"K-FAC: checkpoint layers differ from the model's (only in checkpoint: "
                             f"{sorted(saved - ours)}, only in model: {sorted(ours - saved)}); "
                             f"was kfac.skip or kfac.batchnorm changed?")
        same_method = list(state["inverse_method"]) == [self.cfg.inverse, self.cfg.eigen_damping, self.cfg.damping]
        for name, layer in self.layers.items():
            entry = state["layers"][name]
            device = layer.params[0].device
            layer.factors = (None if entry["factors"] is None
                             else [t.to(device=device, dtype=layer.dtype) for t in entry["factors"]])
            layer.inverse = None
            if same_method and entry["inverse"] is not None:
                layer.load_inverse_state(entry["inverse"])
        self._counters.update(state["counters"])
        self._kl_scale = state["kl_scale"]

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._capture.remove()


def _allreduce_avg(comm: AllReduce, tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place over the ranks with one collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.allreduce(flat, op="avg", name="kfac.factors")
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
