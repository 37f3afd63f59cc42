"""The K-FAC / SP-NGD preconditioner: when to refresh what, on which rank, in which order, for one step."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.comm.base import Comm, Handle
from app.comm.order import BACKWARD, EARLY, param_positions
from app.config import KFACConfig, Schedule, value_at
from app.errors import Diverged
from app.kfac.capture import Capture
from app.kfac.exchange import FactorExchange, gather_objects, pack, packed_numel, share_layout, unpack
from app.kfac.factors import Layer, find_layers
from app.kfac.fisher import sampled_losses
from app.kfac.intervals import Clock, LayerTrace, diff
from app.kfac.placement import Placement, imbalance, loads
from app.kfac.plan import decisions_numel, factor_bytes, layer_costs, share_dtype, share_numel
from app.metrics import KFACSummary

log = logging.getLogger(__name__)



class KFAC:
    """Kronecker-factored natural-gradient preconditioning of Linear, Conv2d and BatchNorm2d layers.

    Per step: ``begin_step(step, micro_batches, loss_scale)``; per micro-batch ``out = model(x)``,
    ``fisher_backward(out)``, ``loss.backward()``; data-parallel gradient averaging; ``step(lr)``,
    which replaces ``.grad`` of every preconditioned parameter; then ``optimizer.step()``.

    * **Loss.** The training loss must be the mean over the step's examples (criterion mean,
      divided by k for k equal micro-batches); the ``emp`` G scaling relies on it (see
      ``app.kfac.factors``).
    * **Weight decay** is not part of the Fisher: K-FAC preconditions the loss gradient only and the
      optimiser adds weight decay to the preconditioned gradient afterwards (decoupled), so
      ``w -= lr * (F^-1 grad + wd * w)``. KL clipping measures the preconditioned loss gradient only.
    * **When** (``app.kfac.intervals``): each layer refreshes its factors every ``interval`` steps,
      fixed or adaptive (Algorithm 1); every step is preconditioned with the latest inverses.
    * **Data parallel** (``comm``): every layer has one owner rank (``app.kfac.placement``). A step
      runs: (1) the due layers' packed factors are reduce-scattered (averaged) to their owners in
      owner-ordered buckets (``app.kfac.exchange``), each launched during the last micro-batch's
      backward as soon as its layers' statistics are final (emp; mc/exact: right after the last
      ``fisher_backward``, before the main backward), so the exchange overlaps backward and the
      gradient averaging; whatever a caller left unfinished (no ``fisher_backward`` calls) is
      launched when ``step`` starts; (2) while they travel, every layer whose inverse stays as it is gets
      preconditioned; (3) as each bucket lands, its owner folds the factors into the running
      average, computes Diff and inverts; (4) one small allreduce shares the owners' Diffs,
      non-finite flags and per-layer retry counts, so intervals, counters and stops agree on every rank;
      (5) ``share=inverses``: the refreshed inverses are allgathered and every rank preconditions
      the rest; ``share=gradients``: owners precondition their layers and the results are
      allgathered, every step. Only owners hold the running factors; ``state_dict`` gathers them to rank 0.
    * **Failures.** A layer whose new factors contain NaN/Inf keeps its previous factors and
      inverse for the step (plain gradient if it has none), counted in ``kfac_nan_skips``. Cholesky
      failures retry in float64, then with 10x damping, counted. Non-finite factors and damping
      retries make a bad refresh, warned each time with the layer's name (rank 0); more than
      ``max_bad_refreshes`` in a row raise ``Diverged``, as the layer would otherwise stay on stale
      or over-damped curvature for the rest of the run.
    * **Randomness.** ``fisher=mc`` draws its labels from a generator of its own, seeded from
      (``seed``, rank) and saved per rank in ``state_dict``: nothing else draws from it, so a resumed
      run samples exactly the labels the uninterrupted one did.
    """

    def __init__(self, model: nn.Module, cfg: KFACConfig, comm: Comm | None = None, seed: int = 0, *,
                 steps_per_epoch: int = 1, total_steps: int = 1) -> None:
        self.cfg = cfg
        # where kfac.damping/kl_clip/stat_decay schedules place their epochs and their end of training
        self._horizon = (steps_per_epoch, total_steps)
        # a damping term added to kfac.damping, a function of the step (noisy K-FAC: the prior's share of
        # the posterior precision, ``app.bayes.noisy_kfac``); None for plain K-FAC
        self.extra_damping: Callable[[int], float] | None = None
        self._hyper(0)
        # The factor buckets launch from hooks, in the world communicator's issue order with the gradient
        # buckets (``app.comm.order``), so no rank pairs one with another rank's gradient bucket.
        self.comm = comm
        self.layers: dict[str, Layer] = find_layers(model, cfg.skip, cfg.batchnorm)
        self._layers = list(self.layers.values())
        self._rank, self._size = (comm.rank, comm.size) if comm is not None else (0, 1)
        self.clock = Clock(len(self._layers), cfg)
        self.placement = Placement(self._costs(), self._size, cfg.max_rebalances)
        self._wire = torch.bfloat16 if cfg.wire_dtype == "bfloat16" else None
        self._dtype = share_dtype(self._layers)
        self._device = comm.device if comm is not None else torch.device("cpu")
        self._sampler = torch.Generator(device=next(model.parameters()).device)
        self._sampler.manual_seed(int(np.random.SeedSequence([seed, self._rank]).generate_state(1)[0]))
        self._index = {layer: i for i, layer in enumerate(self._layers)}
        positions = param_positions(model)
        # where each layer's factor bucket goes in the issue order: by its parameters' position, and
        # before the user's backward when G comes from sampled labels (final in ``fisher_backward``)
        self._positions = [min((positions[p] for p in layer.module.parameters()), default=len(positions))
                           for layer in self._layers]
        self._phase = BACKWARD if cfg.fisher == "emp" else EARLY
        self._capture = Capture(self._layers, hooked_backward=cfg.fisher == "emp",
                                on_complete=lambda layer: self._send(self._index[layer]))
        self._step: int | None = None
        self._due: list[bool] = []
        self._passes_left = 0
        self._loss_scale = 1.0
        self._exchange: FactorExchange | None = None
        self._counters = {"kfac_layers": 0, "kfac_factor_updates": 0, "kfac_inverse_updates": 0,
                          "kfac_nan_skips": 0, "kfac_fp64_retries": 0, "kfac_damping_retries": 0,
                          "kfac_due_layers": 0, "kfac_bytes_step": 0, "kfac_bytes_total": 0,
                          "kfac_share_bytes_total": 0, "kfac_rebalances": 0, "kfac_steps": 0,
                          "kfac_layer_refreshes": 0, "kfac_bytes_every_step_total": 0}
        # what one step's exchange sends when every layer is due: the yardstick of the traffic share
        self._bytes_every_step = 0 if self.comm is None else sum(
            packed_numel(layer.factor_slots) * (self._wire or layer.dtype).itemsize for layer in self._layers)
        self._kl_scale: Tensor | float = 1.0
        self._bad = [0] * len(self._layers)  # consecutive bad refreshes per layer
        self._trace: LayerTrace | None = None
        self._share: list[list[int]] = []  # the step's allgather layout (``share_layout``)
        self._peak = {"statistics": 0, "exchange": 0, "share": 0}  # the largest of any step so far

    def _costs(self) -> list[float]:
        return layer_costs(self._layers, self.clock.intervals, self.cfg.share)

    def _mine(self, i: int) -> bool:
        return self.placement.owners[i] == self._rank

    # -- the step ------------------------------------------------------------------------------
    def begin_step(self, step: int, micro_batches: int = 1, loss_scale: float = 1.0) -> None:
        """Decide which layers are due at ``step``, arm their hooks and plan the factor exchange.

        ``micro_batches``: the forward/backward passes this step accumulates, one
        ``fisher_backward`` call each; the last one's backward sends the factors as they become
        final. ``loss_scale``: the factor the loss is multiplied by before ``backward`` (fp16
        ``GradScaler.get_scale()``), divided out of the emp G.
        """
        if micro_batches < 1:
            raise ValueError(f"K-FAC: begin_step(micro_batches={micro_batches}) must be >= 1")
        self._step = step
        self._hyper(step)
        self._due = self.clock.factors_due(step)
        self._passes_left = micro_batches
        self._loss_scale = loss_scale
        for layer, due in zip(self._layers, self._due):
            layer.reset()
            layer.due = due
        self._capture.clear()
        self._capture.armed = any(self._due)
        self._peak["statistics"] = max(self._peak["statistics"],
                                       sum(factor_bytes(layer) for layer, due in zip(self._layers, self._due) if due))
        owners = self.placement.owners
        self._exchange = FactorExchange(
            self.comm, [(i, owners[i], self._layers[i].factor_slots, self._layers[i].dtype)
                        for i in reversed(range(len(self._layers))) if self._due[i]],
            int(self.cfg.bucket_mb * 2 ** 20), self._wire, positions=self._positions, phase=self._phase,
            provide=self._send)

    def _hyper(self, step: int) -> None:
        """The damping, KL clip and running-average decay in force at ``step`` (each ``kfac`` key may be a
        schedule): pure functions of the step, so a resumed run continues on the same values. An inverse
        keeps the damping of its refresh step until the next refresh."""
        spe, total = self._horizon
        self.damping, self.kl_clip, self.stat_decay = (value_at(x, step, spe, total) for x in
                                                       (self.cfg.damping, self.cfg.kl_clip, self.cfg.stat_decay))
        if self.extra_damping is not None:
            self.damping += self.extra_damping(step)

    def fisher_backward(self, out: Tensor) -> None:
        """Once per micro-batch, after its forward and before its backward.

        mc/exact: backward the sampled losses into G only (``.grad`` untouched), and on the last
        micro-batch send every due layer's factors; emp: mark the last micro-batch, whose backward
        sends each layer's factors as soon as its hooks have fired.
        """
        if self._step is None:
            raise RuntimeError("K-FAC: fisher_backward() called without begin_step()")
        self._passes_left -= 1
        if self._passes_left < 0:
            raise RuntimeError("K-FAC: fisher_backward() called more often than begin_step(micro_batches=...) "
                               "announced")
        if not self._capture.armed:
            return
        final = self._passes_left == 0
        if self.cfg.fisher == "emp":
            self._capture.final = final
            return
        self._capture.backward(sampled_losses(out, self.cfg.fisher, self._sampler))
        if final:
            assert self._exchange is not None
            for i in self._exchange.missing:
                if self._layers[i].captured:
                    self._send(i)

    def _send(self, i: int) -> None:
        """Hand layer i's final statistics of the step to the exchange (launching what can go)."""
        assert self._exchange is not None
        layer = self._layers[i]
        with torch.no_grad():
            self._exchange.add(i, layer.step_factors(self._g_scale(layer)))

    def step(self, lr: float) -> None:
        """Refresh due factors and inverses, then write preconditioned gradients into ``.grad``.

        ``.grad`` must already be unscaled and averaged over the ranks. Collective with a
        communicator.
        """
        if self._step is None or self._exchange is None:
            raise RuntimeError("K-FAC: step() called without begin_step()")
        self._capture.armed = False
        self._capture.clear()
        step, due, exchange = self._step, self._due, self._exchange
        for i in exchange.missing:  # not sent during backward (no fisher_backward calls)
            self._send(i)
        inverse_due = self.clock.inverse_due(step, due)
        owners = self.placement.owners
        grads = self._grads()
        updates = {i: self._layers[i].precondition(grads[i]) for i in grads  # overlaps the exchange
                   if self._computes(i) and self.clock.has_inverse[i] and not inverse_due[i]}
        report = self._refresh(exchange, inverse_due)
        busy = any(due) or any(inverse_due)
        if self.comm is not None:
            decided = report.numel() * report.element_size() if busy else 0
            self._peak["exchange"] = max(self._peak["exchange"], exchange.buffer_bytes + decided)
        decisions = (self.comm.allreduce_async(report, op="sum", name="kfac.decisions")
                     if self.comm is not None and busy else None)
        shared = self._launch_share(inverse_due, grads, updates)
        outcome = (decisions.wait() if decisions is not None else report).tolist()
        n = len(self._layers)
        finite = [flag == 0 for flag in outcome[n:2 * n]]
        changed = self.clock.update(step, due, outcome[:n], finite)
        self._count(due, inverse_due, outcome, exchange.bytes)
        bad = self._bad_refreshes(due, inverse_due, outcome)
        if shared is not None:
            self._finish_share(shared.wait(), inverse_due, grads, updates)
        for i in grads:
            if i not in updates and self._computes(i) and self.clock.has_inverse[i]:
                updates[i] = self._layers[i].precondition(grads[i])
        self._apply(lr, grads, updates)
        if self._trace is not None:
            self._trace.write(step, [(self._layers[i].name, owners[i], self.clock.intervals[i],
                                      outcome[i] if self.clock.adaptive and not math.isnan(outcome[i]) else None)
                                     for i in range(n) if due[i] and finite[i]])
        if changed:
            self._rebalance()
        for layer in self._layers:
            layer.reset()
        self._step = self._exchange = None
        if bad is not None:
            raise bad

    def _grads(self) -> dict[int, list[Tensor]]:
        """``.grad`` of the layers whose parameters all have one (alike on every rank after averaging)."""
        out = {}
        for i, layer in enumerate(self._layers):
            grads = [p.grad for p in layer.params if p.grad is not None]
            if len(grads) == len(layer.params):
                out[i] = grads
        return out

    def _computes(self, i: int) -> bool:
        """Whether this rank preconditions layer i itself (else it receives the result)."""
        return self.cfg.share == "inverses" or self._mine(i)

    def _refresh(self, exchange: FactorExchange, inverse_due: list[bool]) -> Tensor:
        """Owner work as buckets land: finite check, Diff, running average, inversion.

        Returns this rank's share of the step's decisions, summed over the ranks afterwards:
        ``[Diff per layer (NaN: none computed), non-finite flag per layer, damping retries per layer,
        fp64 retries]``, zero for layers it does not own.
        """
        n = len(self._layers)
        report = torch.zeros(decisions_numel(n), dtype=torch.float64, device=self._device)
        fp64 = 0
        inverted = set()
        for bucket in exchange.results():
            finite = torch.stack([torch.stack([torch.isfinite(t).all() for t in ts]).all()
                                  for _, ts in bucket]).tolist() if bucket else []
            for (i, new), ok in zip(bucket, finite):
                layer = self._layers[i]
                if not ok:
                    report[n + i] = 1
                else:
                    if self.clock.adaptive:  # against the average this step's statistics update
                        report[i] = (torch.stack([diff(x, f) for x, f in zip(new, layer.factors)]).max().to(report)
                                     if layer.factors is not None else math.nan)
                    assert self._step is not None
                    layer.fold(new, self.stat_decay, max(self._step - self.clock.last[i], 1))
                if inverse_due[i] and layer.factors is not None:
                    fp64 += self._invert(i, report)
                    inverted.add(i)
        for i, layer in enumerate(self._layers):  # due for an inverse without new factors
            if self._mine(i) and inverse_due[i] and i not in inverted and layer.factors is not None:
                fp64 += self._invert(i, report)
        report[3 * n] = fp64
        return report

    def _invert(self, i: int, report: Tensor) -> int:
        """Invert layer i, noting its damping retries in ``report``; returns its float64 retries."""
        retries = self._layers[i].invert(self.damping, self.cfg.inverse, self.cfg.eigen_damping)
        report[2 * len(self._layers) + i] = retries.damping
        return retries.fp64

    def _bad_refreshes(self, due: list[bool], inverse_due: list[bool], outcome: list[float]) -> Diverged | None:
        """Track each refreshed layer's run of bad refreshes (non-finite factors or damping retries) from the
        shared ``outcome``: rank 0 warns about each one; the error to raise once a run passes the limit."""
        n, limit = len(self._layers), self.cfg.max_bad_refreshes
        for i, layer in enumerate(self._layers):
            if not (due[i] or inverse_due[i]):
                continue
            nonfinite, damping = outcome[n + i] > 0, round(outcome[2 * n + i])
            if not (nonfinite or damping):
                self._bad[i] = 0
                continue
            self._bad[i] += 1
            what = ("non-finite factors (factor update skipped)" if nonfinite
                    else f"{damping} damping retries (x10 each) to invert")
            if self._rank == 0:
                log.warning("K-FAC: layer %s had %s at step %s: %d bad refreshes in a row (kfac.max_bad_refreshes=%d)",
                            layer.name, what, self._step, self._bad[i], limit)
            if limit and self._bad[i] > limit:
                return Diverged(f"K-FAC layer {layer.name} had {self._bad[i]} bad refreshes in a row, the last "
                                   f"{what} at step {self._step} (kfac.max_bad_refreshes={limit}); no checkpoint "
                                   f"written")
        return None

    def _launch_share(self, inverse_due: list[bool], grads: dict[int, list[Tensor]],
                      updates: dict[int, list[Tensor]]) -> Handle[list[Tensor]] | None:
        """Start allgathering this rank's refreshed inverses or preconditioned gradients; every part's
        length comes from ``share_layout``, so none is exchanged."""
        if self.comm is None or (self.cfg.share == "inverses" and not any(inverse_due)):
            return None
        layout = self._share_layout(inverse_due, grads)
        self._share = layout
        numel = self._share_numel
        parts: list[Tensor] = []
        for i in layout[self._rank]:
            layer = self._layers[i]
            if self.cfg.share == "inverses":
                slots = layer.inverse_slots(self.cfg.inverse)
                if layer.factors is None:
                    parts.append(torch.zeros(numel(i), dtype=self._dtype, device=self._device))
                    continue
                parts.append(pack(layer.inverse_tensors(), slots, self._dtype))
                # the owner applies what the others unpack: same values and memory layout, so the
                # replicas' updates agree bitwise (LAPACK's results are column-major)
                layer.set_inverse_tensors(unpack(parts[-1], slots, layer.dtype))
            elif layer.inverse is None:  # its first inversion failed: a placeholder the others ignore
                parts.append(torch.zeros(numel(i), dtype=self._dtype, device=self._device))
            else:
                if i not in updates:
                    updates[i] = layer.precondition(grads[i])
                parts += [u.reshape(-1).to(self._dtype) for u in updates[i]]
        payload = torch.cat(parts) if parts else torch.empty(0, dtype=self._dtype, device=self._device)
        lengths = [sum(numel(i) for i in part) for part in layout]
        nbytes = payload.element_size()
        self._counters["kfac_share_bytes_total"] += payload.numel() * nbytes
        self._peak["share"] = max(self._peak["share"], sum(lengths) * nbytes)  # own part and one per other part
        return self.comm.allgather_async(payload, name=f"kfac.{self.cfg.share}", lengths=lengths)

    def _share_layout(self, inverse_due: list[bool], grads: dict[int, list[Tensor]]) -> list[list[int]]:
        return share_layout(self.cfg.share, self.placement.owners, self._size, inverse_due,
                            [i in grads for i in range(len(self._layers))])

    def _share_numel(self, i: int) -> int:
        return share_numel(self._layers[i], self.cfg.share, self.cfg.inverse)

    def _finish_share(self, parts: list[Tensor], inverse_due: list[bool], grads: dict[int, list[Tensor]],
                      updates: dict[int, list[Tensor]]) -> None:
        """Take the other owners' inverses or preconditioned gradients out of the allgather (the layers of
        ``share_layout``; only those with an inverse after the shared decisions)."""
        numel = self._share_numel
        for r, part in enumerate(parts):
            if r == self._rank:
                continue
            index = self._share[r]
            for i, chunk in zip(index, part.split([numel(i) for i in index])):
                if not self.clock.has_inverse[i]:
                    continue
                layer = self._layers[i]
                if self.cfg.share == "inverses":
                    layer.set_inverse_tensors(unpack(chunk, layer.inverse_slots(self.cfg.inverse), layer.dtype))
                else:
                    updates[i] = [c.view_as(g) for c, g in zip(chunk.split([g.numel() for g in grads[i]]), grads[i])]

    def _count(self, due: list[bool], inverse_due: list[bool], outcome: list[float], sent: int) -> None:
        n = len(self._layers)
        c = self._counters
        c["kfac_factor_updates"] += any(due)
        c["kfac_inverse_updates"] += any(d and has for d, has in zip(inverse_due, self.clock.has_inverse))
        c["kfac_nan_skips"] += round(sum(outcome[n:2 * n]))
        c["kfac_damping_retries"] += round(sum(outcome[2 * n:3 * n]))
        c["kfac_fp64_retries"] += round(outcome[3 * n])
        c["kfac_due_layers"] = sum(due)
        c["kfac_bytes_step"] = sent
        c["kfac_bytes_total"] += sent
        c["kfac_steps"] += 1
        c["kfac_layer_refreshes"] += sum(due)
        c["kfac_bytes_every_step_total"] += self._bytes_every_step

    def _g_scale(self, layer: Layer) -> float:
        """Turns the captured output-gradient sums into G (see ``app.kfac.factors``)."""
        n = max(layer.examples, 1)
        return n / self._loss_scale ** 2 if self.cfg.fisher == "emp" else 1.0 / n

    def _apply(self, lr: float, grads: dict[int, list[Tensor]], updates: dict[int, list[Tensor]]) -> None:
        """KL-clip the preconditioned gradients (layer order, so every rank agrees) into ``.grad``."""
        order = [i for i in grads if i in updates]
        self._counters["kfac_layers"] = len(order)
        if not order:
            return
        pairs = [(g, u) for i in order for g, u in zip(grads[i], updates[i])]
        scale: Tensor | float = 1.0
        if self.kl_clip > 0:
            vg = torch.stack([(u * g.to(u.dtype)).sum() for g, u in pairs]).sum()
            bound = torch.sqrt(self.kl_clip / (lr ** 2 * vg.clamp(min=torch.finfo(vg.dtype).tiny)))
            scale = bound.clamp(max=1.0)
        self._kl_scale = scale
        for g, u in pairs:
            g.copy_(u * scale)

    # -- placement -----------------------------------------------------------------------------
    def _rebalance(self) -> None:
        """Re-place the layers when the new intervals unbalance the owners (``Placement.update``).

        A moved layer's state goes to its new owner only: one ``gather_objects`` per receiving rank
        (in rank order), to which only the layers' old owners send. Per rank and re-placement: sent =
        the state of the layers it gives up, received = the state of the layers it takes on, plus 8
        bytes of length per receiving rank (sent) and 8 x ranks (received, once); an allgather
        would hand every rank the state of every moved layer (all of K-FAC's state when all move).
        """
        old = self.placement.update(self._costs())
        if old is None:
            return
        assert self.comm is not None  # one rank never re-places
        new = self.placement.owners
        with_inverse = self.cfg.share == "gradients"  # with share=inverses every rank has them
        moved = [i for i in range(len(self._layers)) if old[i] != new[i]]
        for dest in sorted({new[i] for i in moved}):  # the same order on every rank
            outgoing = {i: _export(self._layers[i], with_inverse) for i in moved
                        if new[i] == dest and old[i] == self._rank}
            for i in outgoing:
                _drop(self._layers[i], with_inverse)
            for part in gather_objects(self.comm, outgoing or None, name="kfac.rebalance", root=dest) or []:
                for i, entry in (part or {}).items():
                    _import(self._layers[i], entry, with_inverse)
        self._counters["kfac_rebalances"] = self.placement.rebalances

    # -- bookkeeping ---------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes of the tensors K-FAC holds on this rank: running factors and inverses now, and the largest
        step statistics, exchange buffers (factor buckets, own segments, decisions) and allgather buffers
        of any step so far. ``app.kfac.plan`` computes the same parts for any rank count."""
        factors = sum(t.numel() * t.element_size() for layer in self._layers for t in layer.factors or [])
        inverses = sum(t.numel() * t.element_size() for layer in self._layers if layer.inverse is not None
                       for t in layer.inverse_tensors())
        return {"factors": factors, "inverses": inverses, **self._peak}

    def trace_layers(self, path: Path) -> None:
        """Append one CSV row per layer refresh to ``path`` (call on one rank; see ``LayerTrace``)."""
        self._trace = LayerTrace(path)

    @property
    def stats(self) -> dict[str, float]:
        """Counters and interval/placement summaries for logging; the keys are fixed from construction on.

        ``kfac_bytes_step``/``_total``: factor bytes this rank handed to the reduce-scatter (last
        step / run), ``kfac_bytes_every_step_total`` what refreshing every layer every step would have
        handed; ``kfac_layer_refreshes``: layer refreshes over the run; ``kfac_share_bytes_total``:
        inverse or gradient allgather bytes; ``kfac_diff_max``: the largest latest Diff over the layers
        (0 before any); ``kfac_owner_imbalance``: max/mean of the owners' expected cost;
        ``kfac_damping``/``_kl_clip``/``_stat_decay``: the values in force at the last step (schedules);
        ``kfac_comm_sent``/``_received``/``_received_data``: what every K-FAC collective of this process
        really sent and received (padding and exchanged lengths included) and the real data in the latter,
        from the communicator's counters (since this process started; a resumed run counts afresh).
        """
        intervals = self.clock.intervals or [0]
        mine = [c for name, c in (self.comm.counters.snapshot().items() if self.comm is not None else ())
                if name.startswith("kfac.")]
        return {**self._counters, "kfac_comm_sent": sum(c.sent for c in mine),
                "kfac_comm_received": sum(c.received for c in mine),
                "kfac_comm_received_data": sum(c.data for c in mine),
                "kfac_kl_scale": float(self._kl_scale), "kfac_damping": self.damping,
                "kfac_kl_clip": self.kl_clip, "kfac_stat_decay": self.stat_decay,
                "kfac_interval_mean": sum(intervals) / len(intervals), "kfac_interval_max": max(intervals),
                "kfac_diff_max": self.clock.diff_max,
                "kfac_owner_imbalance": imbalance(loads(self._costs(), self.placement.owners, self._size))}

    def summary(self) -> KFACSummary:
        """The run's refreshes, traffic and ownership for the end-of-run report (alike on every rank)."""
        c = self._counters
        names: list[list[str]] = [[] for _ in range(self._size)]
        held = [0] * self._size
        for layer, owner in zip(self._layers, self.placement.owners):
            names[owner].append(layer.name)
            held[owner] += sum(math.prod(s) for s in layer.factor_shapes) * layer.dtype.itemsize
        return KFACSummary(layers=len(self._layers), steps=c["kfac_steps"], refreshes=c["kfac_layer_refreshes"],
                           bytes_sent=c["kfac_bytes_total"], bytes_every_step=c["kfac_bytes_every_step_total"],
                           interval_mean=sum(self.clock.intervals) / max(len(self._layers), 1),
                           interval_max=max(self.clock.intervals, default=0), owned_layers=names, owned_bytes=held)

    def state_dict(self) -> dict[str, Any] | None:
        """The whole state, placement-independent: factors and inverses of every
        layer (so a resumed run between inverse refreshes is exact), intervals, owners, counters,
        and every rank's mc label generator.

        Collective with a communicator: every rank must call it; the owners' layers and the
        generators are gathered to rank 0 only (on the CPU), which gets the whole state, and the
        other ranks get None. Only rank 0 writes checkpoints: handing every rank the whole state
        would cost each as much memory and traffic as the writer.
        """
        owned = {layer.name: _export(layer, with_inverse=True)
                 for i, layer in enumerate(self._layers) if self._mine(i)}
        samplers = [self._sampler.get_state()]
        if self.comm is not None:
            parts = gather_objects(self.comm, (owned, samplers[0]), name="kfac.checkpoint")
            if parts is None:
                return None
            owned = {name: entry for layers, _ in parts for name, entry in layers.items()}
            samplers = [sampler for _, sampler in parts]
        return {
            "counters": dict(self._counters),
            "bad_refreshes": list(self._bad),
            "kl_scale": float(self._kl_scale),
            "inverse_method": self._inverse_method(),
            "clock": self.clock.state_dict(),
            "owners": list(self.placement.owners),
            "ranks": self._size,
            "layers": {name: owned[name] for name in self.layers},
            "samplers": samplers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``, on any number of ranks; inverses made with another
        method/damping are recomputed. The owners and each rank's mc generator are kept when the
        rank count is the same (else every rank keeps its fresh (seed, rank) generator)."""
        saved, ours = set(state["layers"]), set(self.layers)
        if saved != ours:
            raise ValueError(f"K-FAC: checkpoint layers differ from the model's (only in checkpoint: "
                             f"{sorted(saved - ours)}, only in model: {sorted(ours - saved)}); "
                             f"was kfac.skip or kfac.batchnorm changed?")
        same_method = list(state["inverse_method"]) == self._inverse_method()
        entries = [state["layers"][layer.name] for layer in self._layers]
        has_inverse = [same_method and e["inverse"] is not None for e in entries]
        self.clock.load_state_dict(state["clock"], [e["factors"] is not None for e in entries], has_inverse)
        self._counters.update(state["counters"])
        self._bad = list(state.get("bad_refreshes", self._bad))
        self._kl_scale = state["kl_scale"]
        self.placement = Placement(self._costs(), self._size, self.cfg.max_rebalances)
        self.placement.rebalances = self._counters["kfac_rebalances"]
        if state["ranks"] == self._size:
            self.placement.owners = list(state["owners"])
            if "samplers" in state:  # absent in checkpoints written before the generator existed
                self._sampler.set_state(state["samplers"][self._rank])
        for i, (layer, entry) in enumerate(zip(self._layers, entries)):
            _drop(layer, with_inverse=True)
            if self._mine(i):
                _import(layer, entry, with_inverse=has_inverse[i])
            elif has_inverse[i] and self.cfg.share == "inverses":
                layer.load_inverse_state(entry["inverse"])

    def _inverse_method(self) -> list[Any]:
        """What made the inverses: the method and the damping setting, a schedule as its mapping. The
        setting, not the value in force: under an unchanged schedule the checkpoint's inverses are those an
        uninterrupted run holds (each made with its refresh step's damping); a changed one recomputes them."""
        d = self.cfg.damping
        return [self.cfg.inverse, self.cfg.eigen_damping, dataclasses.asdict(d) if isinstance(d, Schedule) else d]

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._capture.remove()


def _export(layer: Layer, with_inverse: bool) -> dict[str, Any]:
    """What a layer's owner holds, for a checkpoint or a new owner."""
    return {"factors": layer.factors,
            "inverse": layer.inverse_state() if with_inverse and layer.inverse is not None else None}


def _import(layer: Layer, entry: dict[str, Any], with_inverse: bool) -> None:
    device = layer.params[0].device
    layer.factors = _to(entry["factors"], device, layer.dtype)  # an old checkpoint's "previous" is unused
    if with_inverse and entry["inverse"] is not None:
        layer.load_inverse_state(entry["inverse"])


def _to(tensors: list[Tensor] | None, device: torch.device, dtype: torch.dtype) -> list[Tensor] | None:
    """Copies: the running average is updated in place and must not alias the caller's checkpoint."""
    return None if tensors is None else [t.to(device=device, dtype=dtype, copy=True) for t in tensors]


def _drop(layer: Layer, with_inverse: bool) -> None:
    layer.factors = None
    if with_inverse:
        layer.inverse = None
