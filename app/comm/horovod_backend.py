"""``Comm`` on Horovod (>= 0.28: grouped ops, reducescatter, uneven allgather, process sets)."""

from __future__ import annotations

from collections.abc import Callable

from mpi4py import MPI  # noqa: F401  -- load libmpi before Horovod's extension resolves it

# isort: split
import horovod.torch as hvd
import torch
from torch import Tensor

from app.comm.base import Comm, Op, pad_dim0

_OPS = {"avg": hvd.Average, "sum": hvd.Sum}


class HorovodComm(Comm):
    """A communicator over one Horovod process set (the global one for the world)."""

    def __init__(self, device: torch.device, process_set: hvd.ProcessSet = hvd.global_process_set,
                 parent: Comm | None = None, channel: int = 0) -> None:
        self._ps = process_set
        self._channel = channel  # duplicates of one process set differ in their op names only
        self._seq = 0
        super().__init__(process_set.rank(), process_set.size(), device, parent)

    @classmethod
    def init_world(cls, device: torch.device) -> HorovodComm:
        """Initialise Horovod (dynamic process sets, for ``subgroup``) and wrap its global set."""
        hvd.init(process_sets="dynamic")
        return cls(device)

    def _name(self, name: str) -> str:
        """A unique op name that every member derives alike.

        Horovod pairs ops across ranks by name. Its automatic names count every op a process
        issues, so they drift apart as soon as only some ranks use a process set; a sequence number
        per communicator does not.
        """
        self._seq += 1
        return f"{name}.ps{self._ps.process_set_id}.c{self._channel}.{self._seq}"

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Callable[[], object]:
        handle = hvd.grouped_allreduce_async_(tensors, op=_OPS[op], name=self._name(name),
                                              process_set=self._ps)
        return lambda: hvd.synchronize(handle)

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op,
                        name: str) -> Callable[[], Tensor]:
        # Horovod 0.28.1's reducescatter takes no split sizes: it splits dim 0 as evenly as it can.
        # Uneven segments therefore go either as `size` rows padded to the longest segment (one row
        # per rank), or, when ownership is so skewed that padding would move more than an
        # allreduce (size * longest > 2 * numel), as an allreduce of a copy, sliced locally (the
        # slice is copied so the caller does not keep the whole buffer alive).
        n = sizes[self.rank]
        if self.size * max(sizes) <= 2 * flat.numel():
            rows = torch.stack([pad_dim0(seg, max(sizes)) for seg in flat.split(sizes)])
            handle = hvd.reducescatter_async(rows, name=self._name(name), op=_OPS[op],
                                             process_set=self._ps)
            return lambda: hvd.synchronize(handle)[0, :n]
        start = sum(sizes[: self.rank])
        handle = hvd.allreduce_async_(flat.clone(), op=_OPS[op], name=self._name(name),
                                      process_set=self._ps)
        return lambda: hvd.synchronize(handle)[start: start + n].clone()

    def _allgather(self, t: Tensor, name: str) -> Callable[[], list[Tensor]]:
        # Uneven dim 0 is native; the lengths travel alongside to cut the result apart.
        data = hvd.allgather_async(t, name=self._name(name), process_set=self._ps)
        lengths = hvd.allgather_async(torch.tensor([t.shape[0]], device=self.device),
                                      name=self._name(name), process_set=self._ps)

        def finish() -> list[Tensor]:
            return list(hvd.synchronize(data).split(hvd.synchronize(lengths).tolist()))
        return finish

    def _broadcast(self, t: Tensor, root: int, name: str) -> Callable[[], object]:
        # Horovod wants the root as a global rank, even within a process set.
        handle = hvd.broadcast_async_(t, self._ps.ranks[root], name=self._name(name),
                                      process_set=self._ps)
        return lambda: hvd.synchronize(handle)

    def barrier(self) -> None:
        hvd.barrier(process_set=self._ps)

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        ps = hvd.add_process_set(ranks)
        return HorovodComm(self.device, ps, parent=self) if ps.included() else None

    def _new_duplicate(self) -> Comm:
        # Horovod pairs ops by name, not by order: a second name sequence is an independent channel.
        return HorovodComm(self.device, self._ps, parent=self, channel=len(self._duplicates) + 1)

    def shutdown(self) -> None:
        if self._is_world and hvd.is_initialized():
            hvd.shutdown()
