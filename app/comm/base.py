"""The one collective-communication interface the rest of spngd uses.

Backends (torch.distributed, Horovod) implement a few private launch primitives; everything that
must behave the same whichever library runs underneath lives here: argument validation with
one-line errors, the per-call-site byte counters, uneven-size bookkeeping, padding helpers, and
subgroup caching.

Every operation is asynchronous at heart: a backend *launches* it and returns a waiter; ``Handle``
wraps that waiter. Each blocking method is its ``*_async(...).wait()``. Ranks must launch the
collectives of one communicator in the same order (torch.distributed matches them by order and
the Horovod backend names them by a per-communicator sequence number).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor

Op = Literal["avg", "sum"]
T = TypeVar("T")


class CommError(ValueError):
    """A bad argument to a collective; the message is one line naming the call site."""


@dataclass(frozen=True)
class Count:
    """Traffic of one call site: how many calls, and how many payload bytes this rank handed in."""

    calls: int = 0
    bytes: int = 0


class ByteCounters:
    """Per-call-site payload counters, to measure what each part of a step communicates.

    ``bytes`` is defined as the payload this rank hands to the collective: the sum of
    ``numel * element_size`` of its *input* tensors (the whole flat buffer for reduce_scatter, this
    rank's own tensor for allgather, the tensor on every rank for broadcast). It is independent of
    the algorithm the library picks (ring, tree, padding), so it is comparable across backends and
    across runs; wire traffic is a backend-dependent multiple of it.
    """

    def __init__(self) -> None:
        self._counts: dict[str, Count] = {}

    def add(self, name: str, tensors: Sequence[Tensor]) -> None:
        old = self._counts.get(name, Count())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._counts[name] = Count(old.calls + 1, old.bytes + nbytes)

    def snapshot(self) -> dict[str, Count]:
        """A copy of the counters (call site -> Count), safe to keep while counting goes on."""
        return dict(self._counts)

    def reset(self) -> None:
        self._counts.clear()


class Handle(Generic[T]):
    """An operation in flight; ``wait()`` blocks until it is done and returns its result.

    Waiting twice returns the same result, so a handle can be waited on defensively.
    """

    def __init__(self, finish: Callable[[], T]) -> None:
        self._finish: Callable[[], T] | None = finish
        self._result: T | None = None

    def wait(self) -> T:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result  # type: ignore[return-value]


def pad_dim0(t: Tensor, length: int) -> Tensor:
    """``t`` zero-padded along dim 0 to ``length`` rows (``t`` itself when already that long).

    Libraries that need equal shapes on every rank (gloo allgather, Horovod reducescatter) get
    uneven data this way.
    """
    if t.shape[0] == length:
        return t
    out = t.new_zeros((length, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _copy_back(tensors: Sequence[Tensor], staged: Sequence[Tensor]) -> None:
    """Results of in-place ops that ran on contiguous copies go back into the callers' tensors."""
    for t, s in zip(tensors, staged, strict=True):
        if s is not t:
            t.copy_(s)


class Comm(ABC):
    """A communicator over ``size`` ranks; ``rank`` is this process's index in it.

    Tensors must be on ``device``; any layout works (a non-contiguous one, e.g. channels_last, is
    staged through a contiguous copy, which the libraries need). Each method takes ``name``, the
    call site whose counters the call adds to (see ``ByteCounters``). Subgroups share their
    parent's counters, so one snapshot holds all the traffic of a rank.
    """

    def __init__(self, rank: int, size: int, device: torch.device, parent: Comm | None = None) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.counters: ByteCounters = parent.counters if parent is not None else ByteCounters()
        self._is_world = parent is None
        self._subgroups: dict[tuple[int, ...], Comm | None] = {tuple(range(size)): self}
        self._duplicates: list[Comm] = []  # released with the world

    # ---- public API ------------------------------------------------------------------------

    def allreduce(self, t: Tensor, op: Op = "avg", name: str = "allreduce") -> Tensor:
        """Reduce ``t`` over all ranks, in place; returns ``t``."""
        return self.allreduce_async(t, op, name).wait()

    def allreduce_async(self, t: Tensor, op: Op = "avg", name: str = "allreduce") -> Handle[Tensor]:
        group = self.grouped_allreduce_async([t], op, name)
        return Handle(lambda: group.wait()[0])

    def grouped_allreduce(self, tensors: Sequence[Tensor], op: Op = "avg",
                          name: str = "grouped_allreduce") -> list[Tensor]:
        """Reduce every tensor of ``tensors`` in place, as one fused operation."""
        return self.grouped_allreduce_async(tensors, op, name).wait()

    def grouped_allreduce_async(self, tensors: Sequence[Tensor], op: Op = "avg",
                                name: str = "grouped_allreduce") -> Handle[list[Tensor]]:
        tensors = list(tensors)
        if not tensors:
            raise CommError(f"{name}: grouped_allreduce needs at least one tensor")
        self._check(name, tensors, op)
        if len({t.dtype for t in tensors}) > 1:
            raise CommError(f"{name}: grouped_allreduce needs one dtype, got "
                            f"{sorted({str(t.dtype) for t in tensors})}")
        self.counters.add(name, tensors)
        staged = [t.contiguous() for t in tensors]
        finish = self._allreduce(staged, op, name)

        def done() -> list[Tensor]:
            finish()
            _copy_back(tensors, staged)
            return tensors
        return Handle(done)

    def reduce_scatter(self, flat: Tensor, sizes: Sequence[int], op: Op = "avg",
                       name: str = "reduce_scatter") -> Tensor:
        """Reduce ``flat`` over all ranks and return this rank's segment (a new tensor).

        ``flat`` is 1-D and holds ``size`` consecutive segments, segment r (``sizes[r]`` elements,
        zero allowed) being the part that rank r receives. ``flat`` itself is left unchanged.
        """
        return self.reduce_scatter_async(flat, sizes, op, name).wait()

    def reduce_scatter_async(self, flat: Tensor, sizes: Sequence[int], op: Op = "avg",
                             name: str = "reduce_scatter") -> Handle[Tensor]:
        self._check(name, [flat], op)
        sizes = self._check_sizes(name, flat, sizes)
        self.counters.add(name, [flat])
        return Handle(self._reduce_scatter(flat.contiguous(), sizes, op, name))

    def allgather(self, t: Tensor, name: str = "allgather") -> list[Tensor]:
        """Every rank's ``t``, indexed by rank; dim 0 may differ between ranks, other dims may not.

        The trailing shape and dtype must agree on all ranks (not checked: that would cost a
        round trip).
        """
        return self.allgather_async(t, name).wait()

    def allgather_async(self, t: Tensor, name: str = "allgather") -> Handle[list[Tensor]]:
        self._check(name, [t])
        if t.dim() == 0:
            raise CommError(f"{name}: allgather needs a tensor with at least one dimension")
        self.counters.add(name, [t])
        return Handle(self._allgather(t.contiguous(), name))

    def broadcast(self, t: Tensor, root: int, name: str = "broadcast") -> Tensor:
        """Overwrite ``t`` on every rank with root's ``t``, in place; returns ``t``."""
        return self.broadcast_async(t, root, name).wait()

    def broadcast_async(self, t: Tensor, root: int, name: str = "broadcast") -> Handle[Tensor]:
        self._check(name, [t])
        if not 0 <= root < self.size:
            raise CommError(f"{name}: root {root} is not a rank of a communicator of size {self.size}")
        self.counters.add(name, [t])
        staged = t.contiguous()
        finish = self._broadcast(staged, root, name)

        def done() -> Tensor:
            finish()
            _copy_back([t], [staged])
            return t
        return Handle(done)

    def subgroup(self, ranks: Sequence[int]) -> Comm | None:
        """A communicator over ``ranks`` (ranks of this communicator, sorted by the caller).

        Collective: every rank of this communicator must call it with the same list. Ranks outside
        get None. The same list twice gives the same communicator, and the list of all ranks gives
        this one. Its ``rank`` is the position in ``ranks``; it counts into this one's counters.
        Only the world communicator can be split: both libraries create groups collectively over
        all processes.
        """
        if not self._is_world:
            raise CommError("subgroup: only the world communicator can be split")
        key = tuple(ranks)
        if not key or list(key) != sorted(set(key)) or key[0] < 0 or key[-1] >= self.size:
            raise CommError(f"subgroup: ranks {list(key)} must be distinct, increasing and within "
                            f"0..{self.size - 1}")
        if key not in self._subgroups:
            self._subgroups[key] = self._new_subgroup(list(key))
        return self._subgroups[key]

    def duplicate(self) -> Comm:
        """A communicator over the same ranks whose collectives are ordered independently of this
        one's (MPI_Comm_dup).

        Collective over the world. Two parts of a step that launch collectives from different
        hooks (gradient buckets, K-FAC factor buckets) each keep their own launch order on their
        own communicator; on a shared one, a rank whose hooks fired in another order would pair
        the wrong collectives. It counts into this one's counters.
        """
        if not self._is_world:
            raise CommError("duplicate: only the world communicator can be duplicated")
        dup = self._new_duplicate()
        self._duplicates.append(dup)
        return dup

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank of this communicator has reached it."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the library (world communicator) or nothing (subgroups die with the world)."""

    # ---- backend launch primitives: start the operation, return a waiter ----------------

    @abstractmethod
    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Callable[[], object]:
        """In-place reduction of each tensor (same dtype, maybe different shapes)."""

    @abstractmethod
    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op,
                        name: str) -> Callable[[], Tensor]:
        """This rank's reduced segment of ``flat`` (validated: 1-D, sum(sizes) == numel)."""

    @abstractmethod
    def _allgather(self, t: Tensor, name: str) -> Callable[[], list[Tensor]]:
        """Every rank's ``t``, dim 0 uneven."""

    @abstractmethod
    def _broadcast(self, t: Tensor, root: int, name: str) -> Callable[[], object]:
        """In-place broadcast from ``root`` (a rank of this communicator)."""

    @abstractmethod
    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        """A new communicator over validated ``ranks``; None on ranks outside it."""

    @abstractmethod
    def _new_duplicate(self) -> Comm:
        """A new communicator over all ranks of this (world) one, with its own ordering."""

    # ---- shared validation -------------------------------------------------------------

    def _check(self, name: str, tensors: Sequence[Tensor], op: Op | None = None) -> None:
        if op is not None and op not in ("avg", "sum"):
            raise CommError(f"{name}: op {op!r} is not one of avg, sum")
        for t in tensors:
            if not isinstance(t, Tensor):
                raise CommError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise CommError(f"{name}: tensor is on {t.device}, the communicator on {self.device}")
            if op == "avg" and not t.is_floating_point():
                raise CommError(f"{name}: op 'avg' needs a floating-point tensor, got {t.dtype}")

    def _check_sizes(self, name: str, flat: Tensor, sizes: Sequence[int]) -> list[int]:
        if flat.dim() != 1:
            raise CommError(f"{name}: reduce_scatter needs a 1-D buffer, got shape {tuple(flat.shape)}")
        out = list(sizes)
        if len(out) != self.size:
            raise CommError(f"{name}: {len(out)} segment sizes given for {self.size} ranks")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
            raise CommError(f"{name}: segment sizes {out} must be non-negative integers")
        if sum(out) != flat.numel():
            raise CommError(f"{name}: segment sizes sum to {sum(out)}, but the buffer has "
                            f"{flat.numel()} elements")
        return out

