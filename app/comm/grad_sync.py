"""Data-parallel gradient averaging, bucketed and overlapped with backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from app.comm.base import Comm, Handle
from app.comm.order import BACKWARD, GRADIENTS, Key, launch_key, param_positions


class _Bucket:
    """Parameters whose gradients travel together in one flat allreduce.

    The buffer holds the flattened gradients followed by one has-a-gradient flag per parameter,
    so a parameter that no rank computed a gradient for keeps ``grad = None``.
    """

    def __init__(self, params: list[nn.Parameter], key: Key) -> None:
        self.params = params
        self.key = key  # its place in the communicator's issue order
        self.numel = sum(p.numel() for p in params)
        self.buffer = torch.empty(self.numel + len(params), dtype=params[0].dtype,
                                  device=params[0].device)
        self.views = [v.view_as(p) for v, p in
                      zip(self.buffer[: self.numel].split([p.numel() for p in params]), params)]
        self.ready: set[int] = set()
        self.handle: Handle[Tensor] | None = None


class GradientAverager:
    """Averages ``.grad`` of ``model``'s trainable parameters over ``comm``'s ranks.

    Parameters are grouped, in reverse registration order (about the order backward produces
    their gradients), into buckets of ``bucket_mb`` MiB of one dtype. A post-accumulate-grad hook
    on every parameter launches its bucket's async allreduce as soon as the bucket is complete, so
    communication overlaps the rest of backward. ``wait()`` launches what is left (a gradient a
    rank did not compute counts as zero there), waits, and copies the averages into ``.grad``.
    The buckets are a standing source of the communicator's issue order (``app.comm.order``):
    they go in key order with every other hook-started collective of the step (K-FAC's factor
    buckets), so every rank issues the same collectives in the same order even when its gradients
    arrive differently. On one rank it does nothing.

    Gradient accumulation: run the micro-batches before the last inside ``no_sync()`` (or
    ``sync(False)``); their gradients just accumulate locally.
    """

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 25.0) -> None:
        if bucket_mb <= 0:
            raise ValueError(f"GradientAverager: bucket_mb={bucket_mb} must be > 0")
        self.comm = comm
        self.enabled = True
        params = [p for p in model.parameters() if p.requires_grad]
        positions = param_positions(model)
        groups = self._group(params[::-1], int(bucket_mb * 2**20)) if comm.size > 1 else []
        self._buckets = [_Bucket(g, launch_key(BACKWARD, min(positions[p] for p in g), GRADIENTS, k))
                         for k, g in enumerate(groups)]
        self._where: dict[nn.Parameter, tuple[_Bucket, int]] = {
            p: (b, i) for b in self._buckets for i, p in enumerate(b.params)}
        self._standing = comm.order.attach({b.key: partial(self._launch, b) for b in self._buckets}) \
            if self._buckets else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]

    @staticmethod
    def _group(params: list[nn.Parameter], limit: int) -> list[list[nn.Parameter]]:
        groups: list[list[nn.Parameter]] = []
        used = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            prev = groups[-1][-1] if groups else None
            if prev is None or (prev.dtype, prev.device) != (p.dtype, p.device) or used + nbytes > limit:
                groups.append([])
                used = 0
            groups[-1].append(p)
            used += nbytes
        return groups

    @contextlib.contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        """Within the block, hooks launch averaging (True) or let gradients accumulate (False)."""
        before, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = before

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Accumulate gradients locally for the micro-batches before the last."""
        return self.sync(False)

    def _on_grad(self, p: Tensor) -> None:
        if not self.enabled:
            return
        bucket, index = self._where[p]  # type: ignore[index]
        if bucket.handle is not None:
            raise RuntimeError("GradientAverager: a gradient changed after its bucket was sent; call "
                               "wait() before the next synchronised backward, or use no_sync()")
        bucket.ready.add(index)
        if len(bucket.ready) == len(bucket.params):
            self.comm.order.ready(bucket.key)

    def _launch(self, bucket: _Bucket) -> None:
        for p, view in zip(bucket.params, bucket.views):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
        flags = torch.tensor([p.grad is not None for p in bucket.params], dtype=bucket.buffer.dtype)
        bucket.buffer[bucket.numel:].copy_(flags)
        bucket.handle = self.comm.allreduce_async(bucket.buffer, op="avg", name="grad_bucket")

    def wait(self) -> None:
        """Finish averaging: end the step's round of the issue order (launching the buckets backward
        left incomplete, in order with the other sources' operations), then copy results back."""
        if not self._buckets:
            return
        if any(b.handle is None for b in self._buckets):
            self.comm.order.open()  # this step's round, if no hook opened it
        self.comm.order.flush()
        for bucket in self._buckets:
            assert bucket.handle is not None
            bucket.handle.wait()
            had_grad: list[float] | None = None
            for i, (p, view) in enumerate(zip(bucket.params, bucket.views)):
                if p.grad is not None:
                    p.grad.copy_(view)
                    continue
                if had_grad is None:
                    had_grad = bucket.buffer[bucket.numel:].tolist()
                if had_grad[i] > 0:
                    p.grad = view.clone()
            bucket.ready.clear()
            bucket.handle = None

    def remove(self) -> None:
        """Detach the hooks and leave the issue order (the model no longer averages on backward)."""
        if self._standing is not None:
            self._standing.detach()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
