"""The command line as a user meets it: help texts, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mpi_helpers import run_mpi, skip_unless_runnable

from app.errors import USAGE_EXIT

REPO = Path(__file__).resolve().parents[1]


def _spngd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_commands_and_every_option() -> None:
    top = _spngd("--help")
    assert top.returncode == 0 and "train" in top.stdout and "check" in top.stdout
    train = _spngd("train", "--help")
    assert train.returncode == 0
    for key in ("optim.lr", "kfac.damping", "data.backend", "comm.backend", "checkpoint.resume"):
        assert key in train.stdout


def test_bad_override_is_one_line_exit_2() -> None:
    res = _spngd("train", "--config", "configs/demo.yaml", "--set", "optim.lr=abc")
    assert res.returncode == 2
    assert res.stderr.strip() == "spngd: error: config: optim.lr='abc' is not a number"
    assert res.stdout == ""


def test_missing_config_file_exit_2() -> None:
    res = _spngd("train", "--config", "configs/nope.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == "spngd: error: config: file 'configs/nope.yaml' does not exist"


def test_missing_dataset_exit_2(tmp_path: Path) -> None:
    res = _spngd("train", "--config", str(REPO / "configs/smoke.yaml"), "--set", f"data.path={tmp_path}/absent",
                 "--set", f"output.dir={tmp_path}/runs", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spngd: error:") and "absent" in lines[0]


def test_check_command_reports_every_tensor() -> None:
    res = _spngd("check", "--config", "configs/smoke.yaml", "--set", "data.image_size=8", "--set", "data.val_resize=8")
    assert res.returncode == 0, res.stderr
    probe, *lines = res.stdout.strip().splitlines()
    assert probe.startswith("probe: 2 random 8x8 images, up to 8 coordinates per tensor")
    assert lines[-1].startswith("CHECK OK tensors=") and " skipped=" in lines[-1]
    assert any(line.startswith("fc.weight") for line in lines)
    assert all("max_rel_err=" in line for line in lines)


def test_comm_bench_command_prints_its_table_and_one_line_errors() -> None:
    res = _spngd("comm-bench", "--backend", "torch", "--device", "cpu", "--sizes", "4K", "--iters", "1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("comm bench: backend=TorchComm ranks=1 device=cpu iters=1")
    assert any(line.split()[:3] == ["allreduce", "4", "KiB"] for line in lines), res.stdout
    bad = _spngd("comm-bench", "--sizes", "4Q")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "argument --sizes: size '4Q' is not like 4K, 1M or 16M")


# MPICH's Hydra environment with MPI_LOCALNRANKS missing, built from Open MPI's per rank: the global rank
# is fine, the node-local layout is not, so discovery fails alike on every rank (issue 10, finding 11).
_BROKEN_MPICH = """#!/bin/sh
export PMI_RANK=$OMPI_COMM_WORLD_RANK PMI_SIZE=$OMPI_COMM_WORLD_SIZE MPI_LOCALRANKID=$OMPI_COMM_WORLD_LOCAL_RANK
unset OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK OMPI_COMM_WORLD_LOCAL_SIZE
exec "$@"
"""


@pytest.mark.mpi
def test_broken_local_rank_variables_print_one_error_per_job(tmp_path: Path) -> None:
    skip_unless_runnable()
    wrapper = tmp_path / "broken_mpich.sh"
    wrapper.write_text(_BROKEN_MPICH)
    rc, out = run_mpi(2, wrapper, sys.executable, "-m", "app", "train", "--config", "configs/smoke.yaml",
                      "--set", f"output.dir={tmp_path}/runs", python="/bin/sh", timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("spngd: error:")]
    assert errors == ["spngd: error: launch: MPI_LOCALRANKID is set but MPI_LOCALNRANKS is not"], out
    assert rc == USAGE_EXIT, out
    assert "Traceback" not in out, out
