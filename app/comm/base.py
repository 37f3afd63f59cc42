"""The one collective-communication interface the rest of spngd uses.

Backends (torch.distributed, Horovod) implement a few private launch primitives; everything that
must behave the same whichever library runs underneath lives here: argument validation with
one-line errors, the per-call-site byte counters, uneven-size bookkeeping, padding helpers, and
subgroup caching.

Every operation is asynchronous at heart: a backend *launches* it and returns a waiter together
with the ``Traffic`` the launch really uses on this rank (its algorithm's buffers, padding
included), which the counters add up; ``Handle`` wraps that waiter. Each blocking method is its
``*_async(...).wait()``. Ranks must launch the collectives of one communicator in the same order
(torch.distributed matches them by order and the Horovod backend names them by a
per-communicator sequence number); collectives started from autograd hooks keep that order through
the communicator's ``order`` queue (``app.comm.order``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor

from app.comm.order import LaunchQueue
from app.comm.traffic import Traffic

Op = Literal["avg", "sum"]
T = TypeVar("T")
Launched = tuple[Callable[[], T], Traffic]  # a backend primitive's waiter and the traffic it uses


class CommError(ValueError):
    """A bad argument to a collective; the message is one line naming the call site."""


@dataclass(frozen=True)
class Count:
    """Traffic of one call site on this rank, summed over its operations (see ``ByteCounters``)."""

    calls: int = 0
    sent: int = 0
    received: int = 0
    data: int = 0


class ByteCounters:
    """Per-call-site counters of what this rank's collectives really move through its buffers.

    Each operation adds the ``Traffic`` its backend used (definitions in ``app.comm.traffic``):
    ``sent``, the bytes of the send buffers handed to the library; ``received``, the bytes the
    library wrote into receive buffers allocated for the call; ``data``, the other ranks' real
    payload within ``received``; ``calls``, the library calls. Padding and exchanged lengths count
    in ``sent``/``received`` but not in ``data``, so ``received - data`` is what the algorithm
    costs beyond the payload. They are buffer figures, not wire figures (a ring also forwards data
    no buffer of this rank holds). On the torch backend they equal ``app.comm.traffic``'s
    functions, which ``spngd plan`` evaluates for any rank count.
    """

    def __init__(self) -> None:
        self._counts: dict[str, Count] = {}

    def add(self, name: str, traffic: Traffic) -> None:
        old = self._counts.get(name, Count())
        self._counts[name] = Count(old.calls + traffic.calls, old.sent + traffic.sent,
                                   old.received + traffic.received, old.data + traffic.data)

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

    Horovod's reducescatter, which needs equal shapes on every rank, gets uneven segments this way.
    """
    if t.shape[0] == length:
        return t
    out = t.new_zeros((length, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def row_bytes(t: Tensor) -> int:
    """Bytes of one dim-0 row: the unit in which uneven parts differ."""
    return math.prod(t.shape[1:]) * t.element_size()


def own_only(t: Tensor, rank: int, size: int) -> list[int]:
    """The lengths a non-root rank of a gather knows when they were not passed: its own only."""
    return [t.shape[0] if r == rank else 0 for r in range(size)]


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
    parent's counters, so one snapshot holds all the traffic of a rank, and its ``order``, so the
    hook-started collectives of a rank follow one issue order across all its communicators.
    """

    def __init__(self, rank: int, size: int, device: torch.device, parent: Comm | None = None) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.counters: ByteCounters = parent.counters if parent is not None else ByteCounters()
        self._is_world = parent is None
        self._subgroups: dict[tuple[int, ...], Comm | None] = {tuple(range(size)): self}
        self.order: LaunchQueue = parent.order if parent is not None else LaunchQueue()

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
        staged = [t.contiguous() for t in tensors]
        finish = self._count(name, self._allreduce(staged, op, name))

        def done() -> list[Tensor]:
            finish()
            _copy_back(tensors, staged)
            return tensors
        return Handle(done)

    def reduce_scatter(self, flat: Tensor, sizes: Sequence[int], op: Op = "avg",
                       name: str = "reduce_scatter") -> Tensor:
        """Reduce ``flat`` over all ranks and return this rank's segment (a new tensor).

        ``flat`` is 1-D and holds ``size`` consecutive segments, segment r (``sizes[r]`` elements,
        zero allowed) being the part that rank r receives. ``flat`` is the send and scratch buffer:
        its contents are undefined afterwards (a reduce may leave partial sums in it), and the
        result does not keep it alive.
        """
        return self.reduce_scatter_async(flat, sizes, op, name).wait()

    def reduce_scatter_async(self, flat: Tensor, sizes: Sequence[int], op: Op = "avg",
                             name: str = "reduce_scatter") -> Handle[Tensor]:
        self._check(name, [flat], op)
        sizes = self._check_sizes(name, flat, sizes)
        return Handle(self._count(name, self._reduce_scatter(flat.contiguous(), sizes, op, name)))

    def allgather(self, t: Tensor, name: str = "allgather",
                  lengths: Sequence[int] | None = None) -> list[Tensor]:
        """Every rank's ``t``, indexed by rank; dim 0 may differ between ranks, other dims may not.

        ``lengths``, when given, is every rank's dim-0 length (the same list on every rank): it
        saves the length exchange. The trailing shape and dtype must agree on all ranks (not
        checked: that would cost a round trip). This rank's entry is ``t`` itself (or its
        contiguous copy), not a copy of it.
        """
        return self.allgather_async(t, name, lengths).wait()

    def allgather_async(self, t: Tensor, name: str = "allgather",
                        lengths: Sequence[int] | None = None) -> Handle[list[Tensor]]:
        known = self._check_parts(name, "allgather", t, lengths)
        return Handle(self._count(name, self._allgather(t.contiguous(), known, name)))

    def gather(self, t: Tensor, root: int, name: str = "gather",
               lengths: Sequence[int] | None = None) -> list[Tensor] | None:
        """Every rank's ``t`` on ``root`` only, indexed by rank; None on the other ranks.

        Shapes and ``lengths`` as for ``allgather``; only the root allocates receive buffers, each
        of its part's size.
        """
        return self.gather_async(t, root, name, lengths).wait()

    def gather_async(self, t: Tensor, root: int, name: str = "gather",
                     lengths: Sequence[int] | None = None) -> Handle[list[Tensor] | None]:
        known = self._check_parts(name, "gather", t, lengths)
        self._check_root(name, root)
        return Handle(self._count(name, self._gather(t.contiguous(), root, known, name)))

    def broadcast(self, t: Tensor, root: int, name: str = "broadcast") -> Tensor:
        """Overwrite ``t`` on every rank with root's ``t``, in place; returns ``t``."""
        return self.broadcast_async(t, root, name).wait()

    def broadcast_async(self, t: Tensor, root: int, name: str = "broadcast") -> Handle[Tensor]:
        self._check(name, [t])
        self._check_root(name, root)
        staged = t.contiguous()
        finish = self._count(name, self._broadcast(staged, root, name))

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

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank of this communicator has reached it."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the library (world communicator) or nothing (subgroups die with the world)."""

    # ---- backend launch primitives: start the operation, return a waiter and its traffic ---

    @abstractmethod
    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        """In-place reduction of each tensor (same dtype, maybe different shapes)."""

    @abstractmethod
    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        """This rank's reduced segment of ``flat`` (validated: 1-D, sum(sizes) == numel)."""

    @abstractmethod
    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        """Every rank's ``t``, dim 0 uneven; ``lengths`` validated, or None when not known."""

    @abstractmethod
    def _gather(self, t: Tensor, root: int, lengths: list[int] | None,
                name: str) -> Launched[list[Tensor] | None]:
        """Every rank's ``t`` on ``root``, None elsewhere; ``lengths`` as for ``_allgather``."""

    @abstractmethod
    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        """In-place broadcast from ``root`` (a rank of this communicator)."""

    @abstractmethod
    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        """A new communicator over validated ``ranks``; None on ranks outside it."""

    # ---- shared validation and counting -------------------------------------------------

    def _count(self, name: str, launched: Launched[T]) -> Callable[[], T]:
        finish, traffic = launched
        self.counters.add(name, traffic)
        return finish

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

    def _check_root(self, name: str, root: int) -> None:
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            raise CommError(f"{name}: root {root} is not a rank of a communicator of size {self.size}")

    def _check_parts(self, name: str, what: str, t: Tensor, lengths: Sequence[int] | None) -> list[int] | None:
        """Validate a tensor whose dim 0 differs between ranks and the optional ``lengths`` of all parts."""
        self._check(name, [t])
        if t.dim() == 0:
            raise CommError(f"{name}: {what} needs a tensor with at least one dimension")
        if lengths is None:
            return None
        out = list(lengths)
        if len(out) != self.size or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in out):
            raise CommError(f"{name}: lengths {out} must be {self.size} non-negative integers, one per rank")
        if out[self.rank] != t.shape[0]:
            raise CommError(f"{name}: lengths[{self.rank}] is {out[self.rank]}, but this rank's tensor has "
                            f"{t.shape[0]} rows")
        return out

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
