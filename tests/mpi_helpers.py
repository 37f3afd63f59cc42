"""Run a script under ``mpirun`` from a test: right environment, hard timeout, captured output.

Usage: ``rc, out = run_mpi(2, "tests/mpi/worker.py", "--flag", timeout=60)``; skip a test when
``mpi_skip_reason()`` (or, for Horovod, ``horovod_skip_reason()``) is not None.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


def mpi_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",  # several ranks share few cores: no thread oversubscription
    })
    env.update(extra or {})
    return env


def mpirun_path() -> str | None:
    return shutil.which("mpirun", path=mpi_env(None)["PATH"])


def mpi_skip_reason() -> str | None:
    """Why mpirun-based tests cannot run here, or None when they can."""
    if mpirun_path() is None:
        return "no mpirun on PATH or in .venv/bin (run docker/setup_venv.sh)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed"
    return None


@functools.cache
def horovod_skip_reason() -> str | None:
    """Why Horovod tests cannot run here, or None. Probed in a child process: horovod.torch
    imports only after mpi4py has loaded libmpi, which a test process should not do itself."""
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; import horovod.torch"],
                           env=mpi_env(None), capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"horovod.torch is not importable ({last}); build it with docker/build_horovod.sh"
    return None


def run_mpi(np: int, script: str | Path, *args: str, timeout: float = 120.0,
            env: Mapping[str, str] | None = None, python: str | None = None) -> tuple[int, str]:
    """``mpirun --oversubscribe -np NP PYTHON SCRIPT ARGS`` from the repository root.

    Returns (exit code, stdout and stderr interleaved). After ``timeout`` seconds the whole job is
    killed and the exit code is 124, with a note appended to the output.
    """
    mpirun = mpirun_path()
    if mpirun is None:
        raise RuntimeError(mpi_skip_reason())
    cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-np", str(np),
           python or sys.executable, str(script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=mpi_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, f"{out}\n[run_mpi: killed after {timeout:g} s]"


def skip_unless_runnable(backend: str = "torch") -> None:
    """Skip the calling test, with the reason, when mpirun (or Horovod for that backend) cannot run."""
    import pytest

    reason = mpi_skip_reason() or (horovod_skip_reason() if backend == "horovod" else None)
    if reason is not None:
        pytest.skip(reason)


def run_check_worker(script: str | Path, backend: str, np: int, timeout: float) -> None:
    """Run a ``tests/mpi/harness`` worker and require its "ALL OK" line (the output on failure)."""
    skip_unless_runnable(backend)
    rc, out = run_mpi(np, script, "--backend", backend, timeout=timeout)
    assert rc == 0 and f"ALL OK backend={backend} np={np}" in out, out[-4000:]
