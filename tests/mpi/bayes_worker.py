"""The data x sample grid through ``spngd train``'s Trainer: np ranks in np sample groups with one
weight sample each equal one rank with np samples per step (same seeds, same global batch).

Run under mpirun: ``mpirun -np N python tests/mpi/bayes_worker.py --backend torch|horovod``. Every
rank trains VOGN (float64, cifar_resnet8 on the bundled MNIST-5k) with ``bayes.mc_groups=N``; rank 0
then trains the reference on a one-rank communicator with ``bayes.samples=N`` and compares the means
and sigmas (relative 1e-9: the same sums in another order); the replicas must be bitwise equal.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness
import torch
from harness import expect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from thread_comm import ThreadComm, ThreadWorld  # noqa: E402

from app import config, launch  # noqa: E402
from app.comm import Comm  # noqa: E402
from app.train import Trainer  # noqa: E402

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
STEPS = 3


def _train(comm: Comm, world: launch.World, out: str, groups: int, samples: int) -> list[torch.Tensor]:
    cfg = config.load(SMOKE, ["optim.name=vogn", "optim.lr=0.01", "train.dtype=float64", f"train.max_steps={STEPS}",
                              "data.batch_size=8", f"bayes.mc_groups={groups}", f"bayes.samples={samples}",
                              "bayes.init_precision=0.1", f"output.dir={out}"])
    trainer = Trainer(cfg, world, comm, comm.device)
    for _ in trainer.steps():
        pass
    std = trainer.optimizer.std  # type: ignore[attr-defined]
    params = list(trainer.model.parameters())
    return [p.detach().clone() for p in params] + [std[p].clone() for p in params]


def checks(comm: Comm, backend: str) -> str:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        mine = _train(comm, launch.discover(), out, comm.size, 1)
        flat = torch.cat([t.reshape(-1) for t in mine])
        replicas = comm.allgather(flat[None], name="check")
        expect(all(torch.equal(r[0], flat) for r in replicas), "replicas differ")
        if comm.rank == 0:
            single = launch.World(rank=0, size=1, local_rank=0, local_size=1, launcher="single")
            ref = _train(ThreadComm(ThreadWorld(1), 0), single, out, 1, comm.size)
            for i, (a, b) in enumerate(zip(mine, ref)):
                err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                expect(err < 1e-9, f"tensor {i}: relative error {err:.2e} against 1 rank x {comm.size} samples")
    return f" steps={STEPS}"


if __name__ == "__main__":
    harness.main(checks)
