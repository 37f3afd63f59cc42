"""The analysis operators and estimators on 1-4 mpirun ranks equal one process (tests/mpi/analysis_worker.py)."""

from __future__ import annotations

import pytest
from mpi_helpers import REPO, run_check_worker

WORKER = REPO / "tests" / "mpi" / "analysis_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize(("backend", "np"), [("torch", 1), ("torch", 2), ("torch", 4), ("horovod", 3)])
def test_distributed_analysis_equals_one_process(backend: str, np: int) -> None:
    run_check_worker(WORKER, backend, np, timeout=240)
