"""``Comm`` on torch.distributed: nccl on GPU, gloo on CPU.

The process group is created by ``app.launch.init_comm``; this module only wraps one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from app.comm.base import Comm, Op, pad_dim0

_OPS = {"avg": dist.ReduceOp.AVG, "sum": dist.ReduceOp.SUM}


class TorchComm(Comm):
    """A communicator over one torch.distributed process group (the default one for the world)."""

    def __init__(self, device: torch.device, timeout: timedelta,
                 group: dist.ProcessGroup | None = None, parent: Comm | None = None) -> None:
        self._group = group if group is not None else dist.group.WORLD
        self._timeout = timeout
        super().__init__(dist.get_rank(self._group), dist.get_world_size(self._group), device, parent)

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Callable[[], object]:
        # One fused buffer: one library call per group instead of one per tensor.
        buf = tensors[0] if len(tensors) == 1 else torch.cat([t.view(-1) for t in tensors])
        work = dist.all_reduce(buf, op=_OPS[op], group=self._group, async_op=True)

        def finish() -> None:
            work.wait()
            if buf is not tensors[0]:
                for t, part in zip(tensors, buf.split([t.numel() for t in tensors])):
                    t.copy_(part.view_as(t))
        return finish

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op,
                        name: str) -> Callable[[], Tensor]:
        # gloo and nccl both take per-rank input tensors of uneven sizes.
        out = flat.new_empty(sizes[self.rank])
        work = dist.reduce_scatter(out, list(flat.split(sizes)), op=_OPS[op], group=self._group,
                                   async_op=True)

        def finish() -> Tensor:
            work.wait()
            return out
        return finish

    def _allgather(self, t: Tensor, name: str) -> Callable[[], list[Tensor]]:
        # gloo cannot gather uneven tensors: exchange the lengths (blocking, 8 bytes per rank),
        # then gather equal padded chunks into one buffer and cut each rank's rows out of it.
        counts = torch.empty(self.size, dtype=torch.int64, device=self.device)
        dist.all_gather_single(counts, torch.tensor([t.shape[0]], device=self.device), group=self._group)
        lengths = counts.tolist()
        longest = max(lengths)
        out = t.new_empty((self.size * longest, *t.shape[1:]))
        work = dist.all_gather_single(out, pad_dim0(t, longest), group=self._group, async_op=True)

        def finish() -> list[Tensor]:
            work.wait()
            return [out[r * longest: r * longest + n] for r, n in enumerate(lengths)]
        return finish

    def _broadcast(self, t: Tensor, root: int, name: str) -> Callable[[], object]:
        work = dist.broadcast(t, group_src=root, group=self._group, async_op=True)
        return work.wait

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(group=self._group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self._group)

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        group = dist.new_group(ranks, timeout=self._timeout)
        return TorchComm(self.device, self._timeout, group, parent=self) if self.rank in ranks else None

    def _new_duplicate(self) -> Comm:
        return TorchComm(self.device, self._timeout, dist.new_group(list(range(self.size)), timeout=self._timeout),
                         parent=self)

    def shutdown(self) -> None:
        if self._is_world and dist.is_initialized():
            # Drop our references too: a process group still referenced from Python outlives
            # destroy_process_group, and its gloo worker threads then release tensors while the
            # interpreter finalises (an intermittent abort at exit). Released here, its destructor
            # joins them now. Communicators handed out (a duplicate held by K-FAC) lose theirs too.
            for child in [*self._subgroups.values(), *self._duplicates]:
                if isinstance(child, TorchComm) and child is not self:
                    child._group = None
            self._subgroups = {}
            self._duplicates = []
            dist.destroy_process_group()
            self._group = None
            gc.collect()
