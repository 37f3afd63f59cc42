"""What every mpirun check worker shares: a failure list, ``expect``, and a ``main`` that starts
the chosen comm backend, runs the worker's checks, and reports "ALL OK" on rank 0 or each failure
on its rank, exiting non-zero when any rank failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from app import launch
from app.comm import Comm
from app.config import CommConfig

failures: list[str] = []


def expect(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


def main(checks: Callable[[Comm, str], str]) -> None:
    """Run ``checks(comm, backend)``; it returns extra words for the ALL OK line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("torch", "horovod"), required=True)
    args = parser.parse_args()
    world = launch.discover()
    with launch.abort_on_error(world):
        device = launch.select_device(world, "cpu")
        comm = launch.init_comm(world, CommConfig(backend=args.backend, timeout_s=60), device)
        extra = checks(comm, args.backend)
        for f in failures:
            print(f"rank {comm.rank}: FAIL {f}", flush=True)
        failed = comm.allreduce(torch.tensor([len(failures)]), op="sum", name="result").item()
        if comm.rank == 0 and failed == 0:
            print(f"ALL OK backend={args.backend} np={comm.size}{extra}", flush=True)
        comm.shutdown()
        raise SystemExit(1 if failed else 0)
