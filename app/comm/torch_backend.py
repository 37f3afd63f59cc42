"""``Comm`` on torch.distributed: nccl on GPU, gloo on CPU.

The process group is created by ``app.launch.init_comm``; this module only wraps one. The
algorithms, chosen so that no rank allocates a buffer larger than the data it receives, and the
traffic they move are those of ``app.comm.traffic``, which counts every call here.
"""

from __future__ import annotations

import gc
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from app.comm import traffic
from app.comm.base import Comm, Launched, Op, nbytes, own_only, row_bytes

_OPS = {"avg": dist.ReduceOp.AVG, "sum": dist.ReduceOp.SUM}


class TorchComm(Comm):
    """A communicator over one torch.distributed process group (the default one for the world)."""

    def __init__(self, device: torch.device, timeout: timedelta,
                 group: dist.ProcessGroup | None = None, parent: Comm | None = None) -> None:
        self._group = group if group is not None else dist.group.WORLD
        self._timeout = timeout
        super().__init__(dist.get_rank(self._group), dist.get_world_size(self._group), device, parent)

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        # One fused buffer: one library call per group instead of one per tensor.
        buf = tensors[0] if len(tensors) == 1 else torch.cat([t.view(-1) for t in tensors])
        work = dist.all_reduce(buf, op=_OPS[op], group=self._group, async_op=True)

        def finish() -> None:
            work.wait()
            if buf is not tensors[0]:
                for t, part in zip(tensors, buf.split([t.numel() for t in tensors])):
                    t.copy_(part.view_as(t))
        return finish, traffic.allreduce(nbytes(buf))

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        used = traffic.reduce_scatter(sizes, self.rank, flat.element_size())
        if len(set(sizes)) == 1:
            out = flat.new_empty(sizes[self.rank])
            work = dist.reduce_scatter(out, list(flat.split(sizes)), op=_OPS[op], group=self._group,
                                       async_op=True)

            def finish_even() -> Tensor:
                work.wait()
                return out
            return finish_even, used
        # Uneven: one reduce per non-empty segment onto its owner. torch's own uneven
        # reduce_scatter on nccl issues one reduce per rank, empty or not (pytorch#82924). A sum
        # divided at the owner is the average on every backend (gloo's reduce has no AVG).
        segments = flat.split(sizes)
        works = [dist.reduce(seg, group_dst=r, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
                 for r, seg in enumerate(segments) if seg.numel() > 0]

        def finish() -> Tensor:
            for w in works:
                w.wait()
            out = segments[self.rank].clone()  # the owner's slice, so `flat` can be freed
            return out.div_(self.size) if op == "avg" else out
        return finish, used

    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        # One broadcast per non-empty part, from its rank, into a buffer of exactly that part: no
        # rank allocates size x longest. Unknown lengths are exchanged first (blocking, 8 bytes a rank).
        known = lengths is not None
        if lengths is None:
            counts = torch.empty(self.size, dtype=torch.int64, device=self.device)
            dist.all_gather_single(counts, torch.tensor([t.shape[0]], device=self.device), group=self._group)
            lengths = counts.tolist()
        parts = [t if r == self.rank else t.new_empty((n, *t.shape[1:])) for r, n in enumerate(lengths)]
        works = [dist.broadcast(part, group_src=r, group=self._group, async_op=True)
                 for r, part in enumerate(parts) if part.shape[0] > 0]

        def finish() -> list[Tensor]:
            for w in works:
                w.wait()
            return parts
        return finish, traffic.allgather(lengths, self.rank, row_bytes(t), known)

    def _gather(self, t: Tensor, root: int, lengths: list[int] | None,
                name: str) -> Launched[list[Tensor] | None]:
        # Point-to-point to the root, each part into a buffer of its size. Unknown lengths are
        # gathered to the root first (blocking); the other ranks need only their own.
        known = lengths is not None
        is_root = self.rank == root
        if lengths is None:
            counts = torch.empty(self.size if is_root else 0, dtype=torch.int64, device=self.device)
            dist.gather(torch.tensor([t.shape[0]], device=self.device),
                        list(counts.split(1)) if is_root else None, group_dst=root, group=self._group)
            lengths = counts.tolist() if is_root else own_only(t, self.rank, self.size)
        used = traffic.gather(lengths, self.rank, root, row_bytes(t), known)
        if not is_root:
            works = [dist.isend(t, group_dst=root, group=self._group)] if t.shape[0] > 0 else []
            parts = None
        else:
            parts = [t if r == root else t.new_empty((n, *t.shape[1:])) for r, n in enumerate(lengths)]
            works = [dist.irecv(part, group_src=r, group=self._group)
                     for r, part in enumerate(parts) if r != root and part.shape[0] > 0]

        def finish() -> list[Tensor] | None:
            for w in works:
                assert w is not None
                w.wait()
            return parts
        return finish, used

    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        work = dist.broadcast(t, group_src=root, group=self._group, async_op=True)
        return work.wait, traffic.broadcast(nbytes(t), self.rank == root)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(group=self._group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self._group)

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        group = dist.new_group(ranks, timeout=self._timeout)
        return TorchComm(self.device, self._timeout, group, parent=self) if self.rank in ranks else None

    def shutdown(self) -> None:
        if self._is_world and dist.is_initialized():
            # Drop our references too: a process group still referenced from Python outlives
            # destroy_process_group, and its gloo worker threads then release tensors while the
            # interpreter finalises (an intermittent abort at exit). Released here, its destructor
            # joins them now. Subgroups handed out lose theirs too.
            for child in self._subgroups.values():
                if isinstance(child, TorchComm) and child is not self:
                    child._group = None
            self._subgroups = {}
            dist.destroy_process_group()
            self._group = None
            gc.collect()
