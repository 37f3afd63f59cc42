"""``Comm`` on Horovod (>= 0.28: grouped ops, reducescatter, uneven allgather, process sets)."""

from __future__ import annotations

from dataclasses import replace

from mpi4py import MPI  # noqa: F401  -- load libmpi before Horovod's extension resolves it

# isort: split
import horovod.torch as hvd
import torch
from torch import Tensor

from app.comm import traffic
from app.comm.base import Comm, Launched, Op, nbytes, own_only, pad_dim0, row_bytes
from app.comm.traffic import Traffic

_OPS = {"avg": hvd.Average, "sum": hvd.Sum}


class HorovodComm(Comm):
    """A communicator over one Horovod process set (the global one for the world)."""

    def __init__(self, device: torch.device, process_set: hvd.ProcessSet = hvd.global_process_set,
                 parent: Comm | None = None) -> None:
        self._ps = process_set
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
        return f"{name}.ps{self._ps.process_set_id}.{self._seq}"

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        handle = hvd.grouped_allreduce_async_(tensors, op=_OPS[op], name=self._name(name),
                                              process_set=self._ps)
        return (lambda: hvd.synchronize(handle)), traffic.allreduce(sum(nbytes(t) for t in tensors))

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        # Horovod 0.28.1's reducescatter takes no split sizes: it splits dim 0 as evenly as it can.
        # Uneven segments therefore go either as `size` rows padded to the longest segment (one row
        # per rank; the padding is sent and the own row received whole), or, when ownership is so
        # skewed that padding would move more than an allreduce (size * longest > 2 * numel), as an
        # allreduce of `flat` in place (the whole buffer received), sliced and copied locally.
        n, longest, item = sizes[self.rank], max(sizes), flat.element_size()
        if self.size * longest <= 2 * flat.numel():
            rows = torch.stack([pad_dim0(seg, longest) for seg in flat.split(sizes)])
            handle = hvd.reducescatter_async(rows, name=self._name(name), op=_OPS[op],
                                             process_set=self._ps)
            used = Traffic(sent=nbytes(rows), received=longest * item, data=n * item)

            def finish_rows() -> Tensor:
                row = hvd.synchronize(handle)[0]
                return row if n == longest else row[:n].clone()  # so the padded row can be freed
            return finish_rows, used
        start = sum(sizes[: self.rank])
        handle = hvd.allreduce_async_(flat, op=_OPS[op], name=self._name(name), process_set=self._ps)
        used = Traffic(sent=nbytes(flat), received=nbytes(flat), data=n * item)
        return (lambda: hvd.synchronize(handle)[start: start + n].clone()), used

    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        # Uneven dim 0 is native: one call, whose output holds exactly every part. Unknown lengths
        # are allgathered first (blocking), to cut the result apart and to count what it receives.
        known = lengths is not None
        if lengths is None:
            lengths = hvd.allgather(torch.tensor([t.shape[0]], device=self.device), name=self._name(name),
                                    process_set=self._ps).tolist()
        data = hvd.allgather_async(t, name=self._name(name), process_set=self._ps)
        used = replace(traffic.allgather(lengths, self.rank, row_bytes(t), known), calls=1 if known else 2)
        return (lambda: list(hvd.synchronize(data).split(lengths))), used

    def _gather(self, t: Tensor, root: int, lengths: list[int] | None,
                name: str) -> Launched[list[Tensor] | None]:
        # Horovod has no gather: an alltoall in which every rank sends its part to the root only
        # (every rank takes part in the call, empty or not). Unknown lengths go to the root the
        # same way first (blocking).
        known = lengths is not None
        is_root = self.rank == root

        def to_root(x: Tensor) -> int:
            splits = torch.zeros(self.size, dtype=torch.int32)
            splits[root] = x.shape[0]
            return hvd.alltoall_async(x, splits, name=self._name(name), process_set=self._ps)

        if lengths is None:
            counts, _ = hvd.synchronize(to_root(torch.tensor([t.shape[0]], device=self.device)))
            lengths = counts.tolist() if is_root else own_only(t, self.rank, self.size)
        handle = to_root(t)
        used = replace(traffic.gather(lengths, self.rank, root, row_bytes(t), known), calls=1 if known else 2)

        def finish() -> list[Tensor] | None:
            out, _ = hvd.synchronize(handle)
            return list(out.split(lengths)) if is_root else None
        return finish, used

    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        # Horovod wants the root as a global rank, even within a process set.
        handle = hvd.broadcast_async_(t, self._ps.ranks[root], name=self._name(name),
                                      process_set=self._ps)
        return (lambda: hvd.synchronize(handle)), traffic.broadcast(nbytes(t), self.rank == root)

    def barrier(self) -> None:
        hvd.barrier(process_set=self._ps)

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        ps = hvd.add_process_set(ranks)
        return HorovodComm(self.device, ps, parent=self) if ps.included() else None

    def shutdown(self) -> None:
        if self._is_world and hvd.is_initialized():
            hvd.shutdown()
