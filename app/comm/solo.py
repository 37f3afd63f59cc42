"""The world of one process, with no collective library behind it.

Every collective over one rank is the identity (the reduction of one value, the gather of one part),
so this needs no ``torch.distributed`` process group: code that builds one-process engines (``spngd
bench``) gets a real ``Comm`` without starting global library state a later one in the same process
would collide with ("trying to initialize the default process group twice").
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.comm import traffic
from app.comm.base import Comm, CommError, Launched, Op, nbytes, row_bytes


class SoloComm(Comm):
    def __init__(self, device: torch.device) -> None:
        super().__init__(0, 1, device)

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        return (lambda: None), traffic.allreduce(sum(nbytes(t) for t in tensors))

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        out = flat[: sizes[0]].clone()
        return (lambda: out), traffic.reduce_scatter(sizes, 0, flat.element_size())

    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        return (lambda: [t]), traffic.allgather([t.shape[0]], 0, row_bytes(t), lengths is not None)

    def _gather(self, t: Tensor, root: int, lengths: list[int] | None, name: str) -> Launched[list[Tensor] | None]:
        return (lambda: [t]), traffic.gather([t.shape[0]], 0, root, row_bytes(t), lengths is not None)

    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        return (lambda: None), traffic.broadcast(nbytes(t), True)

    def barrier(self) -> None:
        pass

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        raise CommError("SoloComm: a world of one rank has no other subgroup")

    def shutdown(self) -> None:
        pass
