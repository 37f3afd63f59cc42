"""IVON (app/bayes/ivon.py) on data x Monte-Carlo-sample ranks against one process, on a real backend.

Run under mpirun: ``mpirun -np 2 python tests/mpi/ivon_worker.py --backend torch|horovod``. For each layout
(``bayes.mc_groups`` M, ``bayes.samples`` K) every rank trains its share of the global batch with the samples
``SampleGrid`` gives it, the trainer's protocol (loss / K, backward inside ``sampled_params``, one step), and
also runs the one-process reference with all M x K samples on the whole batch (deterministic, alike on every
rank). After ``STEPS`` steps: parameters, IVON's Hessian and momentum within float64 round-off of the
reference, and bitwise equal on every rank.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import harness
import torch
import torch.nn.functional as F
from harness import expect
from torch import Tensor, nn

from app.bayes.grid import SampleGrid
from app.bayes.ivon import IVON, build_ivon
from app.comm import Comm
from app.config import BayesConfig

STEPS, BATCH, SEED = 4, 12, 5
BAYES = BayesConfig(prior_variance=2.0, tempering=0.5, init_precision=0.5)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def train(comm: Comm, grid: SampleGrid) -> tuple[nn.Module, IVON]:
    net = model()
    opt = build_ivon(net, comm, lr=0.05, bayes=BAYES, dataset_size=100.0, betas=[0.9, 0.99])
    for t in range(STEPS):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(BATCH, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)
        x, y = x[grid.data_rank :: grid.data_size], y[grid.data_rank :: grid.data_size]
        generators = grid.generators(torch.device("cpu"), SEED, t)
        for gen in generators:
            with opt.sampled_params(gen):
                (F.cross_entropy(net(x), y) / len(generators)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


def state(net: nn.Module, opt: IVON) -> list[Tensor]:
    return [*(p.detach() for p in net.parameters()), opt.param_groups[0]["hess"], opt.param_groups[0]["momentum"]]


def _checks(comm: Comm, backend: str) -> str:
    alone = cast(Comm, SimpleNamespace(size=1))  # the reference never communicates
    for groups, samples in ((1, 1), (comm.size, 1), (1, 2), (comm.size, 2)):
        grid = SampleGrid(comm.size, comm.rank, groups, samples)
        ours = state(*train(comm, grid))
        ref = state(*train(alone, SampleGrid(1, 0, 1, grid.total_samples)))
        what = f"M={groups} K={samples}"
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            err = ((a - b).norm() / b.norm()).item()
            expect(err < 1e-12, f"{what}: tensor {i} differs from one process by {err:.2e} (relative)")
        flat = torch.cat([t.reshape(-1) for t in ours])
        every = comm.allgather(flat[None], name="replicas")
        expect(all(torch.equal(every[0], r) for r in every), f"{what}: replicas differ")
    return ""


if __name__ == "__main__":
    harness.main(_checks)
