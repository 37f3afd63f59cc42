"""The sample-space natural gradient on 1-3 mpirun ranks equals one process (tests/mpi/ngd_worker.py)."""

from __future__ import annotations

import pytest
from mpi_helpers import REPO, run_check_worker

WORKER = REPO / "tests" / "mpi" / "ngd_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize(("backend", "np"), [("torch", 1), ("torch", 2), ("torch", 3), ("horovod", 2)])
def test_distributed_ngd_dual_equals_one_process(backend: str, np: int) -> None:
    run_check_worker(WORKER, backend, np, timeout=180)
