"""app/analysis/ngd_dual.py on data-sharded ranks against one process, on a real backend.

Run under mpirun: ``mpirun -np N python tests/mpi/ngd_worker.py --backend torch|horovod``. Each rank holds
an uneven shard of 11 examples; for a tiny MLP and a tiny CNN, both matrices and two dampings, the
natural gradient of the whole batch's mean gradient must equal the one-process step (every rank also
computes that one, with a SoloComm, on all 11 examples) to 1e-10, and be the same bytes on every rank.
"""

from __future__ import annotations

import harness
import torch
import torch.nn.functional as F
from analysis_worker import N, model, shard
from harness import expect
from torch import nn

from app.analysis.ngd_dual import NGD_MATRICES, NGDDual
from app.comm import Comm
from app.comm.solo import SoloComm


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()


def checks(comm: Comm, backend: str) -> str:
    g = torch.Generator().manual_seed(1)
    start, stop = shard(comm.rank, comm.size)
    solo = SoloComm(torch.device("cpu"))
    cases = 0
    for name, net, shape in (("mlp", model(), (4,)), ("cnn", cnn(), (2, 5, 5))):
        x = torch.randn(N, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (N,), generator=g)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])  # type: ignore[union-attr]
        for matrix in NGD_MATRICES:
            for damping in (1e-3, 1.0):
                what = f"{name}/{matrix}/lambda={damping}"
                got = NGDDual(net, comm, damping, matrix, chunk=2).direction(grad, x[start:stop], y[start:stop])
                ref = NGDDual(net, solo, damping, matrix).direction(grad, x, y)
                scale = float(ref.abs().max())
                diff = float((got - ref).abs().max())
                expect(torch.allclose(got, ref, rtol=1e-10, atol=1e-10 * scale),
                       f"{what}: step != one process (max diff {diff:.3g}, scale {scale:.3g})")
                gathered = comm.allgather(got[None], name="check")
                expect(all(torch.equal(t[0], got) for t in gathered), f"{what}: ranks hold different steps")
                cases += 1
    return f" cases={cases}"


if __name__ == "__main__":
    harness.main(checks)
