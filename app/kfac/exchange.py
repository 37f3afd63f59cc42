"""Moving K-FAC state between ranks: packing, owner-ordered buckets, and the collectives.

* **Packing.** A symmetric matrix travels as its upper triangle (diagonal included), ``n(n+1)/2``
  numbers instead of ``n^2``; a stack of them (BatchNorm's ``(C, 2, 2)`` blocks) as ``C`` triangles.
  Other tensors (eigenvectors, eigenvalues) travel whole. A ``Slot`` says which is which, so
  every rank can size and unpack a payload it did not build.
* **Factor exchange.** The layers due at a step are cut, in layer order, into buckets of about
  ``bucket_bytes``; inside a bucket their packed factors are laid out by owner rank, so one
  ``reduce_scatter`` (average) per bucket hands each owner exactly the averaged factors it will
  invert, and nothing else. Every bucket is launched before the first is waited on, so the owner
  folds and inverts bucket k while buckets k+1.. are still in flight.
* **Objects.** ``gather_objects`` allgathers arbitrary picklable state (checkpoints, layers that
  change owner); it is for rare events, not the per-step path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from app.comm.base import Comm, Handle
from app.config import ConfigError


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


@cache
def _triu(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(n, n, device=device)
    return rows, cols


def pack(tensors: Sequence[Tensor], slots: Sequence[Slot], dtype: torch.dtype) -> Tensor:
    """``tensors`` laid out by ``slots`` in one 1-D tensor of ``dtype``."""
    parts = []
    for t, slot in zip(tensors, slots, strict=True):
        if slot.symmetric:
            rows, cols = _triu(slot.shape[-1], t.device)
            t = t[..., rows, cols]
        parts.append(t.reshape(-1).to(dtype))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def unpack(flat: Tensor, slots: Sequence[Slot], dtype: torch.dtype) -> list[Tensor]:
    """Inverse of ``pack``: new tensors of ``dtype``, symmetric slots mirrored."""
    out = []
    for part, slot in zip(flat.split([s.numel for s in slots]), slots, strict=True):
        part = part.to(dtype)
        if not slot.symmetric:
            out.append(part.reshape(slot.shape).clone())
            continue
        n = slot.shape[-1]
        rows, cols = _triu(n, flat.device)
        full = part.new_empty(slot.shape)
        tri = part.reshape(*slot.shape[:-2], -1)
        full[..., rows, cols] = tri
        full[..., cols, rows] = tri
        out.append(full)
    return out


@dataclass
class _Bucket:
    mine: list[int]  # indices of this rank's layers in the bucket, in bucket order
    handle: Handle[Tensor]


class FactorExchange:
    """One step's factors on their way to their owners (see the module docstring).

    ``items`` are ``(index, owner, factors, slots)`` of the due layers in layer order. With
    ``comm=None`` (one process) nothing is packed or sent. ``bytes`` is what this rank handed to
    the collectives: every bucket's whole buffer, the quantity ``ByteCounters`` counts.
    """

    NAME = "kfac.factors"

    def __init__(self, comm: Comm | None, items: list[tuple[int, int, list[Tensor], list[Slot]]],
                 bucket_bytes: int, wire_dtype: torch.dtype | None) -> None:
        self._comm = comm
        self._local = [(i, ts) for i, _, ts, _ in items]
        self._slots = {i: slots for i, _, _, slots in items}
        self._dtypes = {i: ts[0].dtype for i, _, ts, _ in items}
        self._wire = wire_dtype
        self._buckets: list[_Bucket] = []
        self.bytes = 0
        if comm is None:
            return
        group: list[tuple[int, int, list[Tensor], list[Slot]]] = []
        used = 0
        for item in items:
            size = packed_numel(item[3]) * self._wire_dtype(item[0]).itemsize
            if group and used + size > bucket_bytes:
                self._launch(comm, group)
                group, used = [], 0
            group.append(item)
            used += size
        if group:
            self._launch(comm, group)

    def _wire_dtype(self, index: int) -> torch.dtype:
        return self._wire or self._dtypes[index]

    def _launch(self, comm: Comm, group: list[tuple[int, int, list[Tensor], list[Slot]]]) -> None:
        ordered = sorted(group, key=lambda item: (item[1], item[0]))  # by owner, then layer order
        dtype = self._wire_dtype(ordered[0][0])
        flat = torch.cat([pack(ts, slots, dtype) for _, _, ts, slots in ordered])
        sizes = [0] * comm.size
        for _, owner, _, slots in ordered:
            sizes[owner] += packed_numel(slots)
        try:
            handle = comm.reduce_scatter_async(flat, sizes, op="avg", name=self.NAME)
        except ValueError as exc:  # a library refusing the wire dtype (Horovod 0.28: bfloat16)
            if self._wire is None:
                raise
            raise ConfigError(f"config: kfac.wire_dtype={str(self._wire).removeprefix('torch.')} is not "
                              f"supported by the {type(comm).__name__} backend ({exc})") from None
        self.bytes += flat.numel() * flat.element_size()
        self._buckets.append(_Bucket([i for i, owner, _, _ in ordered if owner == comm.rank], handle))

    def results(self) -> Iterator[list[tuple[int, list[Tensor]]]]:
        """Per bucket, in launch order: ``(index, averaged factors)`` of this rank's layers."""
        if self._comm is None:
            yield self._local
            return
        for bucket in self._buckets:
            segment = bucket.handle.wait()
            sizes = [packed_numel(self._slots[i]) for i in bucket.mine]
            yield [(i, unpack(part, self._slots[i], self._dtypes[i]))
                   for i, part in zip(bucket.mine, segment.split(sizes))]


def gather_objects(comm: Comm, obj: Any, name: str) -> list[Any]:
    """Every rank's ``obj`` (tensors, containers, numbers, strings), indexed by rank.

    Serialised with ``torch.save`` and allgathered as bytes; tensors come back on the CPU.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8).to(comm.device)
    return [torch.load(io.BytesIO(part.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
            for part in comm.allgather(raw, name=name)]
