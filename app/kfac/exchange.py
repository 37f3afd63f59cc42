"""Moving K-FAC state between ranks: packing, owner-ordered buckets, and the collectives.

* **Packing.** A symmetric matrix travels as one triangle (diagonal included), ``n(n+1)/2``
  numbers instead of ``n^2``; a stack of them (BatchNorm's ``(C, 2, 2)`` blocks) as ``C`` triangles.
  Other tensors (eigenvectors, eigenvalues) travel whole. A ``Slot`` says which is which, so
  every rank can size and unpack a payload it did not build. The triangle is laid out in
  rectangular full packed form (LAPACK's RFP, see ``pack_symmetric``): block slices and triangle
  masks, no gather indices, so nothing per matrix size is kept on the device (int64 triangle
  indices cost ``8 n (n + 1)`` bytes per size: 170 MB for ResNet-50's n = 4608, 312 MB for all its
  factor sizes, held for the whole run by a cache).
* **Factor exchange.** The layers due at a step are cut, in the order backward finishes them
  (reverse layer order), into buckets of about ``bucket_bytes``; inside a bucket their packed
  factors are laid out by owner rank, so one ``reduce_scatter`` (average) per bucket hands each
  owner exactly the averaged factors it will invert, and nothing else. A bucket is launched as
  soon as its layers' statistics are final, during the step's last backward (``FactorExchange``),
  in the communicator's issue order with the gradient buckets (``app.comm.order``), and every
  bucket is launched before the first is waited on, so the exchange overlaps the rest of backward
  and the owner folds and inverts bucket k while buckets k+1.. are still in flight.
* **Objects.** ``gather_objects`` sends arbitrary picklable state (checkpoints, layers that
  change owner) to one rank only; it is for rare events, not the per-step path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from app.comm.base import Comm, Handle
from app.comm.order import BACKWARD, FACTORS, Key, launch_key
from app.errors import ConfigError


@dataclass(frozen=True)
class Slot:
    """The wire layout of one tensor: its shape, and whether its last two dims are symmetric."""

    shape: tuple[int, ...]
    symmetric: bool

    @property
    def numel(self) -> int:
        if not self.symmetric:
            return math.prod(self.shape)
        n = self.shape[-1]
        return math.prod(self.shape[:-2]) * n * (n + 1) // 2


def packed_numel(slots: Sequence[Slot]) -> int:
    return sum(s.numel for s in slots)


def _halves(n: int) -> tuple[int, int]:
    return (n + 1) // 2, n // 2


def _mask(k: int, upper: bool, device: torch.device) -> Tensor:
    ones = torch.ones(k, k, dtype=torch.bool, device=device)
    return ones.triu() if upper else ones.tril()


def pack_symmetric(t: Tensor) -> Tensor:
    """The symmetric (..., n, n) ``t`` as (..., n(n+1)/2): rectangular full packed form.

    With ``k1 = ceil(n/2)``, ``k2 = floor(n/2)`` and blocks ``[[M11, M12], [M12^T, M22]]``, the
    upper triangle of M11 (k1 x k1) and the lower triangle of M22 (k2 x k2, shifted one row down)
    tile a (k2 + 1) x k1 rectangle; M12 travels whole. Pure copies: bitwise exact, NaN and inf
    included.
    """
    n = t.shape[-1]
    k1, k2 = _halves(n)
    rect = torch.where(_mask(k1, True, t.device), t[..., :k1, :k1], 0)
    if k2 + 1 > k1:  # n even: one row more than the k1 x k1 square
        rect = torch.cat([rect, rect.new_zeros((*rect.shape[:-2], 1, k1))], -2)
    lower = rect[..., 1:, :k2]
    lower.copy_(torch.where(_mask(k2, False, t.device), t[..., k1:, k1:], lower))
    return torch.cat([t[..., :k1, k1:].reshape(*t.shape[:-2], -1), rect.reshape(*t.shape[:-2], -1)], -1)


def unpack_symmetric(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_symmetric`` for a tensor of ``shape`` (..., n, n)."""
    n = shape[-1]
    k1, k2 = _halves(n)
    batch = shape[:-2]
    m12, rect = flat.reshape(*batch, -1).split([k1 * k2, (k2 + 1) * k1], -1)
    m12 = m12.reshape(*batch, k1, k2)
    rect = rect.reshape(*batch, k2 + 1, k1)
    out = flat.new_empty(shape)
    square = rect[..., :k1, :k1]
    out[..., :k1, :k1] = torch.where(_mask(k1, True, flat.device), square, square.mT)
    out[..., :k1, k1:] = m12
    out[..., k1:, :k1] = m12.mT
    low = rect[..., 1:, :k2]
    out[..., k1:, k1:] = torch.where(_mask(k2, False, flat.device), low, low.mT)
    return out


def pack(tensors: Sequence[Tensor], slots: Sequence[Slot], dtype: torch.dtype) -> Tensor:
    """``tensors`` laid out by ``slots`` in one 1-D tensor of ``dtype``."""
    parts = [(pack_symmetric(t) if slot.symmetric else t).reshape(-1).to(dtype)
             for t, slot in zip(tensors, slots, strict=True)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def unpack(flat: Tensor, slots: Sequence[Slot], dtype: torch.dtype) -> list[Tensor]:
    """Inverse of ``pack``: new tensors of ``dtype``, symmetric slots mirrored."""
    out = []
    for part, slot in zip(flat.split([s.numel for s in slots]), slots, strict=True):
        part = part.to(dtype)
        out.append(unpack_symmetric(part, slot.shape) if slot.symmetric else part.reshape(slot.shape).clone())
    return out


def plan_buckets(sizes: Sequence[tuple[int, int]], bucket_bytes: int | None) -> list[list[int]]:
    """Cut ``(layer, bytes)`` pairs, in the order they become final, into buckets of about
    ``bucket_bytes`` (a layer larger than that gets one to itself); None: one bucket. Shared by the
    exchange and ``app.kfac.plan``, so the plan sizes the buckets the run launches."""
    buckets: list[list[int]] = []
    used = 0
    for i, size in sizes:
        if not buckets or (bucket_bytes is not None and used + size > bucket_bytes):
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += size
    return buckets


def owner_layout(layers: Sequence[int], owners: Sequence[int] | dict[int, int], numel: dict[int, int],
                 ranks: int) -> tuple[list[int], list[int]]:
    """A bucket's wire order (by owner, then layer) and the segment size each rank receives."""
    ordered = sorted(layers, key=lambda i: (owners[i], i))
    sizes = [0] * ranks
    for i in ordered:
        sizes[owners[i]] += numel[i]
    return ordered, sizes


def share_layout(share: str, owners: Sequence[int], ranks: int, inverse_due: Sequence[bool],
                 has_grad: Sequence[bool]) -> list[list[int]]:
    """Per rank, the layers whose inverses (``share=inverses``) or preconditioned gradients
    (``share=gradients``) its part of the step's allgather carries, in layer order.

    A pure function of what every rank knows when the allgather starts, so the parts' lengths
    travel with the call instead of being exchanged, and ``app.kfac.plan`` sizes the same parts:
    inverses of the layers due for one; gradients of every layer with a gradient (a layer without
    an inverse is always due for one; an owner whose first inversion failed sends zeros, which the
    others ignore once the shared decisions say it has none).
    """
    parts: list[list[int]] = [[] for _ in range(ranks)]
    for i, owner in enumerate(owners):
        if inverse_due[i] if share == "inverses" else has_grad[i]:
            parts[owner].append(i)
    return parts


@dataclass
class _Bucket:
    layers: list[int]  # the planned layers, in the order their statistics become final
    key: Key  # its place in the communicator's issue order
    mine: list[int] = field(default_factory=list)  # this rank's layers, in wire order (after launch)
    handle: Handle[Tensor] | None = None


class FactorExchange:
    """One step's factors on their way to their owners (see the module docstring).

    Planned when the step begins, from ``plan``: ``(index, owner, slots, dtype)`` of the due layers
    in the order their statistics become final (backward runs the layers in reverse). Each bucket
    joins the step's round of the communicator's issue order (``app.comm.order``) under a key
    from ``phase`` and the smallest parameter position (``positions``, per layer index; None: plan
    order) of its layers. ``add`` hands over one layer's final statistics; a complete bucket is
    ready, and the queue launches it once every operation with an earlier key has gone, so all
    ranks issue the same collectives in the same order however their hooks fired, and the
    exchange overlaps the rest of backward. When the round must end before a bucket is complete,
    ``provide(index)`` is asked to ``add`` its missing layers. ``results`` needs every planned
    layer added (``missing`` lists the others).

    With ``comm=None`` (one process) nothing is packed or sent. ``bytes`` is what this rank handed
    to the collectives: every bucket's whole buffer, the quantity ``ByteCounters`` counts.
    """

    NAME = "kfac.factors"

    def __init__(self, comm: Comm | None, plan: Sequence[tuple[int, int, list[Slot], torch.dtype]],
                 bucket_bytes: int, wire_dtype: torch.dtype | None, *, positions: Sequence[int] | None = None,
                 phase: int = BACKWARD, provide: Callable[[int], None] | None = None) -> None:
        self._comm = comm
        self._provide = provide
        self._owner = {i: owner for i, owner, _, _ in plan}
        self._slots = {i: slots for i, _, slots, _ in plan}
        self._dtypes = {i: dtype for i, _, _, dtype in plan}
        self._wire = wire_dtype
        self._factors: dict[int, list[Tensor]] = {}  # added, not yet packed (or kept: one process)
        self._added: set[int] = set()
        self.bytes = 0
        self.buffer_bytes = 0  # send buffers and own segments of every bucket (all in flight at once)
        sizes = [(i, packed_numel(slots) * self._wire_dtype(i).itemsize) for i, _, slots, _ in plan]
        cut = plan_buckets(sizes, bucket_bytes if comm is not None else None)
        self._buckets = [_Bucket(b, launch_key(phase, min(positions[i] for i in b) if positions is not None else 0,
                                               FACTORS, k)) for k, b in enumerate(cut)]
        self._bucket_of = {i: b for b in self._buckets for i in b.layers}
        if comm is not None:
            for b in self._buckets:
                comm.order.add(b.key, partial(self._launch, comm, b), partial(self._complete, b))

    @property
    def missing(self) -> list[int]:
        """The planned layers not added yet, in plan order."""
        return [i for b in self._buckets for i in self._left(b)]

    def _left(self, bucket: _Bucket) -> list[int]:
        """The layers of ``bucket`` not added yet."""
        return [i for i in bucket.layers if i not in self._added]

    def add(self, index: int, factors: list[Tensor]) -> None:
        """Layer ``index``'s final statistics for this step; readies its bucket once complete."""
        if index not in self._owner or index in self._added:
            raise RuntimeError(f"K-FAC: factors of layer {index} handed to the exchange twice or unplanned")
        self._added.add(index)
        self._factors[index] = factors
        bucket = self._bucket_of[index]
        if self._comm is not None and not self._left(bucket):
            self._comm.order.ready(bucket.key)

    def _complete(self, bucket: _Bucket) -> None:
        """The round ends: have the missing layers of ``bucket`` provided (which readies it)."""
        missing = self._left(bucket)
        if self._provide is None:
            raise RuntimeError(f"K-FAC: the factor exchange is missing layers {missing}")
        for i in missing:
            self._provide(i)

    def _wire_dtype(self, index: int) -> torch.dtype:
        return self._wire or self._dtypes[index]

    def _launch(self, comm: Comm, bucket: _Bucket) -> None:
        numel = {i: packed_numel(self._slots[i]) for i in bucket.layers}
        ordered, sizes = owner_layout(bucket.layers, self._owner, numel, comm.size)
        dtype = self._wire_dtype(ordered[0])
        with torch.no_grad():  # called from backward hooks
            flat = torch.cat([pack(self._factors[i], self._slots[i], dtype) for i in ordered])
        try:
            bucket.handle = comm.reduce_scatter_async(flat, sizes, op="avg", name=self.NAME)
        except ValueError as exc:  # a library refusing the wire dtype (Horovod 0.28: bfloat16)
            if self._wire is None:
                raise
            raise ConfigError(f"config: kfac.wire_dtype={str(self._wire).removeprefix('torch.')} is not "
                              f"supported by the {type(comm).__name__} backend ({exc})") from None
        self.bytes += flat.numel() * flat.element_size()
        self.buffer_bytes += (flat.numel() + sizes[comm.rank]) * flat.element_size()
        bucket.mine = [i for i in ordered if self._owner[i] == comm.rank]
        for i in ordered:  # packed: the owners get the averages back
            del self._factors[i]

    def results(self) -> Iterator[list[tuple[int, list[Tensor]]]]:
        """Per bucket, in launch order: ``(index, averaged factors)`` of this rank's layers."""
        if self.missing:
            raise RuntimeError(f"K-FAC: the factor exchange is missing layers {self.missing}")
        if self._comm is None:
            yield [(i, self._factors[i]) for b in self._buckets for i in b.layers]
            return
        self._comm.order.flush()  # the round ends: every bucket is in flight
        for bucket in self._buckets:
            assert bucket.handle is not None
            segment = bucket.handle.wait()
            sizes = [packed_numel(self._slots[i]) for i in bucket.mine]
            yield [(i, unpack(part, self._slots[i], self._dtypes[i]))
                   for i, part in zip(bucket.mine, segment.split(sizes))]


def gather_objects(comm: Comm, obj: Any, name: str, root: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` (tensors, containers, numbers, strings) on ``root``, indexed by rank; None
    on the other ranks.

    Serialised with ``torch.save`` and sent to the root only (``Comm.gather``: no padding, nothing
    for the others to hold); tensors come back on the CPU. ``obj=None`` travels as an empty part,
    which costs no message, and arrives as None.
    """
    if obj is None:
        raw = torch.empty(0, dtype=torch.uint8, device=comm.device)
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        raw = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8).to(comm.device)
    parts = comm.gather(raw, root, name=name)
    if parts is None:
        return None
    return [torch.load(io.BytesIO(part.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
            if part.numel() else None for part in parts]
