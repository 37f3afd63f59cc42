"""Noisy K-FAC on 2 ranks: ``mpirun -np 2 python tests/mpi/noisy_kfac_worker.py --backend torch``.

Two runs of configs/smoke.yaml with the overrides in ``$NOISY_KFAC_SET`` (the test's: noisy_kfac, float64):
2 data ranks x 1 sample group, then 1 data rank x 2 sample groups. After each, every rank's
parameters and a posterior draw (the same generator) must be bitwise equal to rank 0's: every rank
samples every layer from the inverses it holds. Rank 0 saves the second run's parameters and draw to
``$NOISY_KFAC_OUT``, which tests/test_noisy_kfac.py compares with 1 rank x 2 samples.
"""

from __future__ import annotations

import os

import harness
import torch
from harness import expect

from app import config, launch
from app.bayes.posterior import generator_for
from app.comm import Comm
from app.train import Trainer


def _run(comm: Comm, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = config.load("configs/smoke.yaml", [*os.environ["NOISY_KFAC_SET"].split(), f"bayes.mc_groups={groups}"])
    trainer = Trainer(cfg, launch.discover(), comm, comm.device)
    for _ in trainer.steps():
        pass
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    drawn = trainer.posterior().draw(generator_for("cpu", 7))
    draw = torch.cat([t.reshape(-1) for t in drawn.values()])
    for what, mine in (("parameters", params), ("posterior draw", draw)):
        theirs = comm.allgather(mine[None], name="check")
        expect(all(torch.equal(t[0], mine) for t in theirs), f"mc_groups={groups}: {what} differ between ranks")
    if trainer.averager is not None:  # the next run's averager takes its place in the issue order
        trainer.averager.remove()
    return params, draw


def checks(comm: Comm, backend: str) -> str:
    torch.set_num_threads(1)
    _run(comm, 1)
    params, draw = _run(comm, 2)
    if comm.rank == 0:
        torch.save({"params": params, "draw": draw}, os.environ["NOISY_KFAC_OUT"])
    return ""


if __name__ == "__main__":
    harness.main(checks)
