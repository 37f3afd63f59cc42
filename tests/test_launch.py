"""Launcher discovery on fake environments, device choice, and whole-job abort on one failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from mpi_helpers import REPO, run_mpi, skip_unless_runnable

from app import launch
from app.launch import LaunchError, World

OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
HOROVOD = {"HOROVOD_RANK": "2", "HOROVOD_SIZE": "3", "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "1"}
SLURM = {"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4"}
# What an sbatch shell carries: a SLURM layout that mpirun's own variables must override.
BATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "8"}


@pytest.mark.parametrize("env, world", [
    ({}, World(0, 1, 0, 1, "single")),
    (OMPI, World(5, 8, 1, 4, "openmpi")),
    (MPICH, World(3, 4, 1, 2, "mpich")),  # MPICH and Intel MPI (Hydra) share these
    (HOROVOD, World(2, 3, 0, 1, "horovodrun")),
    (SLURM, World(6, 7, 2, 4, "slurm")),
    ({**BATCH_SHELL, **OMPI}, World(5, 8, 1, 4, "openmpi")),
    ({**BATCH_SHELL, **MPICH}, World(3, 4, 1, 2, "mpich")),
    ({**OMPI, **HOROVOD}, World(5, 8, 1, 4, "openmpi")),
    # srun --mpi=pmi2 with MPICH: PMI rank/size, node-local layout from SLURM.
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
      "SLURM_NTASKS_PER_NODE": "2"}, World(3, 4, 1, 2, "mpich")),
    # No --ntasks-per-node: this node's entry of SLURM_TASKS_PER_NODE.
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x3),1",
      "SLURM_NODEID": "3"}, World(6, 7, 0, 1, "slurm")),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2"},
     World(1, 2, 1, 2, "slurm")),
])
def test_discover(env: dict[str, str], world: World) -> None:
    assert launch.discover(env) == world


@pytest.mark.parametrize("env, message", [
    ({**OMPI, "OMPI_COMM_WORLD_RANK": "8"}, "inconsistent openmpi layout: rank 8 of 8"),
    ({**MPICH, "PMI_SIZE": "four"}, "PMI_SIZE='four' is not an integer"),
    ({**HOROVOD, "HOROVOD_LOCAL_RANK": "1"}, "local rank 1 of 1"),
    ({"SLURM_PROCID": "0"}, "SLURM_PROCID is set but SLURM_NTASKS is not"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpich sets no node-local rank (MPI_LOCALRANKID)"),
    ({**SLURM, "SLURM_NTASKS": "-1"}, "rank 6 of -1"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
     "SLURM_LOCALID is set but SLURM_NTASKS_PER_NODE is not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2x"},
     "SLURM_TASKS_PER_NODE='2x' is not like"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1(x2)",
      "SLURM_NODEID": "2"}, "SLURM_NODEID=2 has no entry"),
])
def test_discover_rejects_bad_environments(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(message)) as info:
        launch.discover(env)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("env, rank", [
    ({}, 0), (OMPI, 5), (MPICH, 3), (HOROVOD, 2), (SLURM, 6), ({**BATCH_SHELL, **OMPI}, 5),
    ({"PMI_RANK": "3", "MPI_LOCALRANKID": "1"}, 3),  # discover() refuses this layout; the rank is still known
    ({"OMPI_COMM_WORLD_RANK": "x", "SLURM_PROCID": "4"}, 4),  # the first rank variable that parses
])
def test_global_rank_needs_only_the_rank_variables(env: dict[str, str], rank: int) -> None:
    assert launch.global_rank(env) == rank


def test_choose_backend() -> None:
    assert launch.choose_backend("auto", HOROVOD) == "horovod"
    assert launch.choose_backend("auto", OMPI) == "torch"
    assert launch.choose_backend("horovod", {}) == "horovod"
    with pytest.raises(LaunchError, match="'mpi' is not one of auto, torch, horovod"):
        launch.choose_backend("mpi", {})


def test_address_towards() -> None:
    assert launch._address_towards("localhost") == "127.0.0.1"
    with pytest.raises(LaunchError, match="cannot find a route from rank 0 to host 'no-such-host"):
        launch._address_towards("no-such-host.invalid")


def test_select_device() -> None:
    world = World(0, 1, 0, 1, "single")
    assert launch.select_device(world, "cpu") == torch.device("cpu")
    with pytest.raises(LaunchError, match="'gpu' is not one of"):
        launch.select_device(world, "gpu")
    if torch.cuda.is_available():
        assert launch.select_device(World(3, 4, 3, 4, "openmpi"), "auto") == \
            torch.device("cuda", 3 % torch.cuda.device_count())
    else:
        assert launch.select_device(world, "auto") == torch.device("cpu")
        with pytest.raises(LaunchError, match="no CUDA device is visible"):
            launch.select_device(world, "cuda")


@pytest.mark.mpi
def test_python_run_directly_in_a_multi_task_allocation_fails_in_one_line() -> None:
    """A batch shell's SLURM_* variables claim 2 tasks, but this is one plain process."""
    skip_unless_runnable()
    code = ("from app import launch; from app.config import CommConfig; import torch\n"
            "w = launch.discover(); launch.init_comm(w, CommConfig(backend='torch'), torch.device('cpu'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "SLURM_", "HOROVOD_"))}
    env.update({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2",
                "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "LaunchError: launch: slurm says rank 0 of 2, MPI says 0 of 1" in proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", pytest.param("horovod", marks=pytest.mark.horovod)])
@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_one_failing_rank_ends_the_whole_job_quickly(backend: str, mode: str) -> None:
    """raise: rank 1 raises. stall: rank 1 never joins, the others hit comm.timeout_s (3 s)."""
    skip_unless_runnable(backend)
    start = time.monotonic()
    rc, out = run_mpi(3, REPO / "tests" / "mpi" / "fail_worker.py", "--backend", backend,
                      "--fail-rank", "1", "--mode", mode, timeout=90)
    elapsed = time.monotonic() - start
    assert rc not in (0, 124), out
    assert elapsed < 60, f"job took {elapsed:.0f} s to end"
    reports = len(re.findall(r"spngd: error on rank \d: ", out))
    if mode == "raise":  # one report: the peers' echoes of the failure stay silent
        assert reports == 1 and out.count("RuntimeError: injected failure on rank 1 (fail_worker.py:") == 1, out
        assert "Traceback" not in out, out
    else:  # ranks 0 and 2 time out together; either may report before the job is gone
        assert reports in (1, 2), out
    assert "passed a collective its peer never joined" not in out, out
