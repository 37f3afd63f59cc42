"""Soak test of the issue order: hooks fire in another order on every rank, for 200 steps.

Run under mpirun: ``mpirun -np 4 python tests/mpi/order_worker.py --backend torch``. Data-parallel
K-FAC with gradient and factor buckets on one communicator (``tests/replay.py``): once in order,
once with every rank's hooks replayed after backward in an order of its own per step, a quarter
of them dropped (the flush forces those). Without one issue order the ranks pair different
collectives and hang or fail; with it, no hang, and the parameters are bitwise equal to the
in-order run on every rank.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import harness
import torch
from harness import expect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared replay helpers
from replay import net, train  # noqa: E402

from app.comm import Comm  # noqa: E402

STEPS = 200


def checks(comm: Comm, backend: str) -> str:
    base = net()
    start = time.monotonic()
    in_order = train(comm, base, False, STEPS, "emp")
    shuffled = train(comm, base, True, STEPS, "emp")
    expect(all(torch.equal(a, b) for a, b in zip(in_order, shuffled, strict=True)),
           "replayed hooks: parameters differ from the in-order run")
    first = [p.clone() for p in shuffled]
    for p in first:
        comm.broadcast(p, 0, name="compare")
    expect(all(torch.equal(a, b) for a, b in zip(first, shuffled, strict=True)), "replicas differ from rank 0's")
    return f" steps={STEPS} seconds={time.monotonic() - start:.0f}"


if __name__ == "__main__":
    harness.main(checks)
