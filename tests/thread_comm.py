"""N ranks as threads of one process: a real ``Comm`` (validation, counters, handles) whose
collectives meet at a barrier, for fast in-process data-parallel tests. Every collective completes
when it is launched; ranks must call them in the same order, as with the real backends. The
counters count what the torch backend's algorithms would move (``app.comm.traffic``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from app.comm import traffic
from app.comm.base import Comm, Launched, Op, nbytes, row_bytes

T = TypeVar("T")


class ThreadWorld:
    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's ``value``, indexed by rank."""
        self._slots[rank] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def abort(self) -> None:
        """Release every rank waiting in this world (they raise BrokenBarrierError)."""
        self._barrier.abort()

    def run(self, fn: Callable[[ThreadComm], T]) -> list[T]:
        """``fn(comm)`` on every rank in its own thread; the results by rank, or the first error."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                results[rank] = fn(ThreadComm(self, rank))
            except BaseException as exc:  # surfaced below; a failing rank must not hang the others
                errors.append(exc)
                self.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm(Comm):
    def __init__(self, world: ThreadWorld, rank: int, parent: Comm | None = None) -> None:
        self.world = world
        super().__init__(rank, world.size, torch.device("cpu"), parent)

    def _reduce(self, tensors: list[Tensor], op: Op) -> Tensor:
        total = torch.stack(tensors).sum(0)
        return total / self.size if op == "avg" else total

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        values = self.world.exchange(self.rank, [t.clone() for t in tensors])
        for k, t in enumerate(tensors):
            t.copy_(self._reduce([v[k] for v in values], op))
        return (lambda: None), traffic.allreduce(sum(nbytes(t) for t in tensors))

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        total = self._reduce(self.world.exchange(self.rank, flat.clone()), op)
        start = sum(sizes[: self.rank])
        out = total[start: start + sizes[self.rank]].clone()
        return (lambda: out), traffic.reduce_scatter(sizes, self.rank, flat.element_size())

    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        values = self.world.exchange(self.rank, t.clone())
        values[self.rank] = t  # as the torch backend: the own part is the input, not a copy
        used = traffic.allgather([v.shape[0] for v in values], self.rank, row_bytes(t), lengths is not None)
        return (lambda: values), used

    def _gather(self, t: Tensor, root: int, lengths: list[int] | None,
                name: str) -> Launched[list[Tensor] | None]:
        values = self.world.exchange(self.rank, t.clone())
        values[self.rank] = t
        used = traffic.gather([v.shape[0] for v in values], self.rank, root, row_bytes(t), lengths is not None)
        return (lambda: values if self.rank == root else None), used

    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        t.copy_(self.world.exchange(self.rank, t.clone())[root])
        return (lambda: None), traffic.broadcast(nbytes(t), self.rank == root)

    def barrier(self) -> None:
        self.world.exchange(self.rank, None)

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        raise NotImplementedError("ThreadComm has no subgroups")

    def shutdown(self) -> None:
        pass
