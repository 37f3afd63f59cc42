"""One rank fails mid-job; under ``abort_on_error`` the whole job must end promptly.

``mpirun -np N python tests/mpi/fail_worker.py --backend torch|horovod --fail-rank R --mode M``
with M = raise (rank R raises) or stall (rank R never joins the next collective, so the others
must give up after ``comm.timeout_s`` = 3 s).
"""

from __future__ import annotations

import argparse
import time

import torch

from app import launch
from app.config import CommConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("torch", "horovod"), required=True)
    parser.add_argument("--fail-rank", type=int, required=True)
    parser.add_argument("--mode", choices=("raise", "stall"), default="raise")
    args = parser.parse_args()
    world = launch.discover()
    with launch.abort_on_error(world):
        device = launch.select_device(world, "cpu")
        timeout_s = 3 if args.mode == "stall" else 300
        comm = launch.init_comm(world, CommConfig(backend=args.backend, timeout_s=timeout_s), device)
        comm.allreduce(torch.ones(4))  # every rank is connected
        if comm.rank == args.fail_rank and args.mode == "raise":
            raise RuntimeError(f"injected failure on rank {comm.rank}")
        if comm.rank == args.fail_rank:
            time.sleep(120)
        comm.allreduce(torch.ones(4))  # the others wait here for the rank that is gone
        print(f"rank {comm.rank} passed a collective its peer never joined", flush=True)


if __name__ == "__main__":
    main()
