"""End-to-end training runs under mpirun: the FINAL line and run-directory artefacts, exact resume
after a signal-triggered checkpoint, exact distributed validation, and the demo's accuracy target."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mpi_helpers import (
    REPO,
    mpi_env,
    mpirun_path,
    run_mpi,
    skip_unless_runnable,
)

from app.checkpoint import REQUEUE_EXIT, Checkpointer
from app.metrics import parse_final_line

pytestmark = pytest.mark.mpi
SPNGD = str(Path(sys.executable).parent / "spngd")
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(autouse=True)
def _need_mpi() -> None:
    skip_unless_runnable()


def _final(out: str) -> dict[str, float | int | str]:
    lines = [line for line in out.splitlines() if line.startswith("FINAL ")]
    assert len(lines) == 1, out  # printed once, by rank 0
    return parse_final_line(lines[0])


def _train_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [row for row in csv.DictReader(f) if row["kind"] == "train"]


@pytest.mark.parametrize("backend, np", [("torch", 1), ("torch", 4),
                                         pytest.param("horovod", 4, marks=pytest.mark.horovod)])
def test_smoke_run_writes_every_artefact(tmp_path: Path, backend: str, np: int) -> None:
    skip_unless_runnable(backend)
    rc, out = run_mpi(np, SPNGD, "train", "--config", SMOKE, "--set", f"comm.backend={backend}",
                      "--set", f"output.dir={tmp_path}", "--set", "output.name=smoke",
                      "--set", "output.tensorboard=true", timeout=300)
    assert rc == 0, out
    final = _final(out)
    run_dir = tmp_path / "smoke"
    assert final["run_dir"] == str(run_dir) and final["steps"] == 20
    assert 0.0 <= float(final["val_top1"]) <= 1.0
    for name in ("config.yaml", "metrics.csv", "plot.png"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    assert Checkpointer(run_dir, keep=2).load_latest() is not None
    assert [int(r["step"]) for r in _train_rows(run_dir)] == [5, 10, 15, 20]


def _resume_args(tmp_path: Path, name: str, fisher: str) -> list[str]:
    """12 K-FAC steps at 2 ranks, validating at step 6 and at the end (BN statistics differ per rank)."""
    return ["train", "--config", SMOKE, "--set", f"output.dir={tmp_path}", "--set", f"output.name={name}",
            "--set", "train.max_steps=12", "--set", "train.log_every=1", "--set", "output.plot=false",
            "--set", "optim.preconditioner=kfac", "--set", f"kfac.fisher={fisher}", "--set", "data.workers=1",
            "--set", "kfac.inverse_interval=2", "--set", "kfac.kl_clip=0.001", "--set", "train.val_every=0.05",
            "--set", "checkpoint.resume=auto"]


def _interrupted_run(tmp_path: Path, args: list[str], run_dir: Path, at_step: int) -> int:
    """Start a 2-rank run, send SIGUSR1 to mpirun once ``at_step`` is logged, return its exit code."""
    proc = subprocess.Popen([mpirun_path() or "mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2",
                             sys.executable, SPNGD, *args], cwd=REPO, env=mpi_env(None),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.csv").exists() and len(_train_rows(run_dir)) >= at_step:
                os.kill(proc.pid, signal.SIGUSR1)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "checkpoint written at step" in out, out
    return proc.returncode


def _val_rows(run_dir: Path) -> list[tuple[str, str, str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [(r["step"], r["loss"], r["top1"], r["top5"]) for r in csv.DictReader(f) if r["kind"] == "val"]


@pytest.mark.parametrize("fisher", ["emp", "mc", "exact"])
def test_resume_after_signal_equals_uninterrupted(tmp_path: Path, fisher: str) -> None:
    """Interrupted (checkpoint at the signal) then resumed equals uninterrupted bit for bit at 2 ranks:
    every training row, the weights and BatchNorm statistics of the final checkpoint (every rank's
    own, too), and each validation (mc: its label generator is restored; BN: each rank's statistics)."""
    rc, out = run_mpi(2, SPNGD, *_resume_args(tmp_path, "straight", fisher), timeout=300)
    assert rc == 0, out
    straight_final = _final(out)
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    args = _resume_args(tmp_path, "resumed", fisher)
    assert _interrupted_run(tmp_path, args, resumed, at_step=4) == REQUEUE_EXIT
    stopped_at = len(_train_rows(resumed))
    assert 4 <= stopped_at < 12
    rc, out = run_mpi(2, SPNGD, *args, timeout=300)
    assert rc == 0, out
    assert f"resumed from {resumed}/checkpoints/ckpt-{stopped_at:08d}.pt" in out
    a, b = _train_rows(straight), _train_rows(resumed)
    assert [r["step"] for r in b] == [str(s) for s in range(1, 13)]
    assert [(r["loss"], r["top1"], r["lr"]) for r in a] == [(r["loss"], r["top1"], r["lr"]) for r in b]
    assert [row[0] for row in _val_rows(straight)] == ["6", "12"]
    assert _val_rows(straight) == _val_rows(resumed)
    assert straight_final["val_loss"] == _final(out)["val_loss"]
    sa = Checkpointer(straight, keep=2).load_latest()[0]  # type: ignore[index]
    sb = Checkpointer(resumed, keep=2).load_latest()[0]  # type: ignore[index]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert all(torch.equal(x, y) for x, y in zip(sa["batchnorm"], sb["batchnorm"], strict=True))


def _validate(np: int) -> dict[str, float]:
    rc, out = run_mpi(np, REPO / "tests" / "mpi" / "validate_worker.py", SMOKE, "data.batch_size=7", timeout=240)
    assert rc == 0, out
    line = next(line for line in out.splitlines() if line.startswith("VAL "))
    return {k: float(v) for k, v in (item.split("=") for item in line.split()[1:])}


def test_validation_counts_every_image_once_at_any_world_size() -> None:
    one, three = _validate(1), _validate(3)
    assert one["n"] == three["n"] == 1000
    assert one["top1"] == three["top1"] and one["top5"] == three["top5"]
    assert three["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.slow
def test_demo_reaches_its_accuracy_target(tmp_path: Path) -> None:
    """`make demo`'s job: >= 0.97 validation top-1 on the bundled MNIST-5k with 2 ranks."""
    rc, out = run_mpi(2, SPNGD, "train", "--config", str(REPO / "configs" / "demo.yaml"),
                      "--set", f"output.dir={tmp_path}", timeout=900)
    assert rc == 0, out
    assert float(_final(out)["val_top1"]) >= 0.97, out
