"""mpirun worker: distributed validation of the seeded initial model; rank 0 prints the totals.

The model's initial weights are identical on every rank (seeded), so any world size must give
the same top-1/top-5 (every validation image counted exactly once)."""

import sys

from app import config, launch
from app.train import Trainer

cfg = config.load(sys.argv[1], sys.argv[2:])
world = launch.discover()
device = launch.select_device(world, "cpu")
comm = launch.init_comm(world, cfg.comm, device)
trainer = Trainer(cfg, world, comm, device)
loss, top1, top5 = trainer.validate()
if comm.rank == 0:
    print(f"VAL loss={loss:.10f} top1={top1:.10f} top5={top5:.10f} n={trainer.info.val_size}")
comm.shutdown()
