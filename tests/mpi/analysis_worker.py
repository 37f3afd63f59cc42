"""app/analysis on data-sharded ranks against one process, on a real backend.

Run under mpirun: ``mpirun -np N python tests/mpi/analysis_worker.py --backend torch|horovod``. Each rank
holds an uneven shard of 11 examples (rank r starts at example offset_r); for every matrix it checks that
products equal the one-process operator's (every rank also builds that one, on all 11 examples, with a
SoloComm), that every rank holds the same bytes, and that each estimator's spectrum and trace under every
approximation equal one process's; and that ``measures.snapshot_norms`` (norms, Fisher-Rao, PAC-Bayes
sigma') gives one process's numbers on every rank.
"""

from __future__ import annotations

import harness
import torch
from harness import expect
from torch import nn

from app.analysis.measures import snapshot_norms
from app.analysis.operators import MATRICES, ROW_MATRICES, Curvature
from app.analysis.spectra import KFAC_MATRICES, spectrum
from app.comm import Comm
from app.comm.solo import SoloComm

N = 11


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def shard(rank: int, size: int) -> tuple[int, int]:
    """Uneven contiguous shards: rank r holds [start, stop) (rank 0 the largest)."""
    bounds = [round(N * (i ** 1.3) / size ** 1.3) for i in range(size + 1)]
    return bounds[rank], bounds[rank + 1]


def checks(comm: Comm, backend: str) -> str:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    start, stop = shard(comm.rank, comm.size)
    net = model()
    solo = SoloComm(torch.device("cpu"))
    for matrix in MATRICES:
        mine = Curvature(net, x[start:stop], y[start:stop], matrix, comm, total=N, offset=start, seed=7, chunk=2)
        ref = Curvature(net, x, y, matrix, solo, total=N, seed=7)
        v = torch.randn(mine.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        got = mine.matvec(v)
        expect(torch.allclose(got, ref.matvec(v), rtol=1e-12, atol=1e-14), f"{matrix}: product != one process")
        gathered = comm.allgather(got[None], name="check")
        expect(all(torch.equal(t[0], got) for t in gathered), f"{matrix}: ranks hold different products")
        approximations = ["full", "block", "diag"] + (["kfac"] if matrix in KFAC_MATRICES else [])
        for approximation in approximations:
            estimators = ["lanczos"] if approximation in ("full", "block") else ["auto"]
            if matrix in ROW_MATRICES and approximation != "kfac":
                estimators.append("dual")
            for estimator in estimators:
                a = spectrum(mine, approximation, k=3, estimator=estimator, tol=1e-12, seed=2, trace_samples=5)
                b = spectrum(ref, approximation, k=3, estimator=estimator, tol=1e-12, seed=2, trace_samples=5)
                what = f"{matrix}/{approximation}/{estimator}"
                expect(torch.allclose(torch.tensor(a.eigenvalues), torch.tensor(b.eigenvalues), rtol=1e-9,
                                      atol=1e-12), f"{what}: eigenvalues {a.eigenvalues} != {b.eigenvalues}")
                expect(abs(a.trace - b.trace) <= 1e-9 * max(1.0, abs(b.trace)), f"{what}: trace {a.trace} != {b.trace}")
                expect(a.estimator == b.estimator, f"{what}: estimator {a.estimator} != {b.estimator}")
    with torch.no_grad():
        own = net(x).argmax(1)  # labels the net fits: the PAC-Bayes search has an accuracy to lose
    mine_norms = snapshot_norms(net, x[start:stop], own[start:stop], comm, total=N, seed=3, chunk=2)
    ref_norms = snapshot_norms(net, x, own, solo, total=N, seed=3)
    for name, value in ref_norms.items():
        expect(abs(mine_norms[name] - value) <= 1e-12 * abs(value), f"{name}: {mine_norms[name]} != {value}")
    expect(ref_norms["pacbayes_sigma"] < 1.0, f"sigma' {ref_norms['pacbayes_sigma']}: the search found no drop")
    gathered_norms = comm.allgather(torch.tensor(list(mine_norms.values()), dtype=torch.float64)[None], name="check")
    expect(all(torch.equal(t[0], gathered_norms[0][0]) for t in gathered_norms), "ranks hold different measures")
    return f" matrices={len(MATRICES)} measures={len(ref_norms)}"


if __name__ == "__main__":
    harness.main(checks)
