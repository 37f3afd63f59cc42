"""Preemption that loses nothing: TERM to the launcher (``spngd launch mpirun``), to a SLURM job
(``scancel``) and to a Grid Engine job (``qdel``) ends with a complete ResNet-18-sized (90 MB)
checkpoint and exit 85, and the run resumes from it.

Why a launcher wrapper: Open MPI 5's mpirun answers TERM by killing the ranks ~0.5 s later and
exiting 1 (measured: even ranks that exit 85 at once leave it at 1), so TERM must not reach it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from mpi_helpers import REPO, VENV_BIN, mpi_env, mpi_skip_reason

from app.checkpoint import REQUEUE_EXIT, Checkpointer

if TYPE_CHECKING:
    from schedulers import SgeCluster, SlurmCluster

pytest_plugins = ("schedulers",)  # the slurm_cluster and sge_cluster fixtures

SPNGD = str(VENV_BIN / "spngd")
MPIRUN = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2"]
CKPT_BYTES = 80e6  # ResNet-18 weights and SGD momentum: 89.6 MB


def _python(code: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *argv], check=False, env=mpi_env(None),
                          capture_output=True, text=True, timeout=timeout)


# -- the pieces, in one process each ------------------------------------------------------------------

def test_ranks_unblock_and_catch_term_and_usr2() -> None:
    """A rank started with TERM blocked (``spngd launch`` does that to the launcher, and a launcher
    that keeps the mask passes it on) must still see scancel's TERM; USR2 (Grid Engine's -notify)
    must checkpoint too instead of killing the rank."""
    res = _python("""
        import os, signal
        from app.checkpoint import StopSignal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            stop = StopSignal()
            stop.install()
            os.kill(os.getpid(), sig)
            print(stop.received == sig)
            stop.uninstall()
        print(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set()))  # the mask is restored
    """)
    assert res.stdout.split() == ["True", "True", "True"], res.stdout + res.stderr


_CHILD = """
    import signal, sys, time
    blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(85 if blocked else 1))
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1])
def test_launch_keeps_term_from_the_launcher_and_passes_usr1(sig: signal.Signals) -> None:
    """The launcher starts with TERM blocked; TERM, USR2 and USR1 to ``spngd launch`` reach it as
    USR1; its exit status is ours."""
    proc = subprocess.Popen([SPNGD, "launch", sys.executable, "-c", textwrap.dedent(_CHILD)], env=mpi_env(None),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == REQUEUE_EXIT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_launch_reports_a_signal_death_like_a_shell_and_bad_commands_in_one_line() -> None:
    res = subprocess.run([SPNGD, "launch", sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
                         check=False, env=mpi_env(None), capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + 9, res.stderr
    for argv, message in ([[], "spngd launch needs a command"],
                          [["no-such-launcher"], "cannot start 'no-such-launcher': No such file or directory"]):
        res = subprocess.run([SPNGD, "launch", *argv], check=False, env=mpi_env(None), capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_term_to_every_process_spares_the_loader_workers(tmp_path: Path) -> None:
    """scancel signals every process of the job, DataLoader workers included; torch makes a worker
    die of TERM, which used to fail the rank (rc 1, no checkpoint) instead of checkpointing."""
    run_dir = tmp_path / "w"
    proc = subprocess.Popen([SPNGD, "train", "--config", str(REPO / "configs/smoke.yaml"), "--set", "data.workers=2",
                             "--set", "train.max_steps=100000", "--set", "train.log_every=1", "--set",
                             f"output.dir={tmp_path}", "--set", "output.name=w", "--set", "output.plot=false"],
                            env=mpi_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for("training to start", lambda: _training(run_dir) or proc.poll() is not None, timeout=120)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(workers) >= 2, workers
        for pid in [proc.pid, *map(int, workers)]:
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == REQUEUE_EXIT and "checkpoint written at step" in out, out[-3000:]


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    """SIGKILL (the scheduler's last word) while a 90 MB checkpoint is being written: the newest
    complete one is still what --resume auto finds."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, torch
        from app.checkpoint import Checkpointer
        ckpt, state = Checkpointer(sys.argv[1], keep=2), {"w": torch.zeros(22_000_000)}
        for step in range(1, 1000):
            ckpt.save(state, step)
            print(step, flush=True)
    """), str(tmp_path)], env=mpi_env(None), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "1\n"
    time.sleep(0.3)  # into the next write (each takes about a second)
    proc.kill()
    proc.wait(timeout=30)
    found = Checkpointer(tmp_path, keep=2).load_latest()
    assert found is not None and found[1].stat().st_size > CKPT_BYTES


# -- ResNet-18 on 2 ranks: spngd launch, SLURM, Grid Engine -------------------------------------------

def _config(tmp_path: Path) -> Path:
    """ResNet-18 on 32-pixel synthetic images: a full-size 90 MB checkpoint at ~1 s per step."""
    path = tmp_path / "resnet18.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"backend": "synthetic", "image_size": 32, "val_resize": 32, "batch_size": 2, "workers": 0,
                 "synthetic_classes": 10, "synthetic_samples": 200},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "lr": 0.01, "schedule": "constant"},
        "train": {"epochs": 100, "val_every": 0, "log_every": 2},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard": False, "plot": False},
    }))
    return path


def _wait_for(what: str, ok: Callable[[], bool], timeout: float) -> None:
    from schedulers import wait_for  # imported here: at module level it would be before pytest_plugins

    wait_for(what, ok, timeout)


def _training(run_dir: Path) -> bool:
    """True once rank 0 logged a training row: past setup, mid-run."""
    metrics = run_dir / "metrics.csv"
    return metrics.exists() and len(metrics.read_text().splitlines()) > 1


def _checkpointed_step(run_dir: Path, out: str) -> int:
    """The step of the signal's checkpoint, checked to be complete and the one --resume auto uses."""
    m = re.search(r"checkpoint written at step (\d+), exiting with 85", out)
    assert m, out[-3000:]
    found = Checkpointer(run_dir, keep=2).load_latest()
    assert found is not None, out[-3000:]
    assert found[1].name == f"ckpt-{int(m.group(1)):08d}.pt" and found[1].stat().st_size > CKPT_BYTES
    return int(m.group(1))


@pytest.mark.slow
@pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))
def test_term_to_spngd_launch_checkpoints_resnet18_and_the_run_resumes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run_dir = tmp_path / "runs" / "r18"
    train = [SPNGD, "train", "--config", str(config), "--set", "output.name=r18", "--resume", "auto"]
    proc = subprocess.Popen([SPNGD, "launch", *MPIRUN, *train], env=mpi_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for("training to start", lambda: _training(run_dir) or proc.poll() is not None, timeout=180)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # what `kill <pid>` and a preempting scheduler send
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == REQUEUE_EXIT, out[-3000:]
    step = _checkpointed_step(run_dir, out)
    print(f"TERM -> checkpoint of step {step} -> exit 85: {time.monotonic() - t0:.1f} s")

    res = subprocess.run([SPNGD, "launch", *MPIRUN, *train, "--set", f"train.max_steps={step + 1}"],
                         check=False, env=mpi_env(None), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/ckpt-{step:08d}.pt at step {step}" in res.stderr, res.stderr[-3000:]
    assert f"steps={step + 1} " in res.stdout, res.stdout


def _submit(tmp_path: Path, system: str, name: str, env: dict[str, str]) -> tuple[str, Path]:
    res = subprocess.run([SPNGD, "submit", "--system", system, "--nodes", "1", "--config", str(_config(tmp_path)),
                          "--set", f"output.name={name}"], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip(), tmp_path / "runs" / name


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*")))


def _assert_stopped_with_a_checkpoint(run_dir: Path) -> None:
    log = _logs(run_dir)
    _checkpointed_step(run_dir, log)
    assert "spngd: training exited with status 85" in log, log[-3000:]
    assert "running the job again" not in log, log[-3000:]  # cancelled stays cancelled


@pytest.mark.slow
def test_scancel_checkpoints_resnet18_and_exits_85(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Plain ``scancel``: SLURM sends CONT+TERM to the batch shell and every process of the job, and
    SIGKILL KillWait (30 s by default) later."""
    job_id, run_dir = _submit(tmp_path, "local-slurm", "slurm-cancel", mpi_env(None))
    _wait_for("training to start", lambda: _training(run_dir) or not slurm_cluster.job_state(job_id), timeout=180)
    assert _training(run_dir), _logs(run_dir)[-3000:]
    subprocess.run(["scancel", job_id], check=True)
    slurm_cluster.wait_gone([job_id], timeout=120)
    _assert_stopped_with_a_checkpoint(run_dir)


@pytest.mark.slow
def test_qdel_checkpoints_resnet18_and_exits_85(sge_cluster: SgeCluster, tmp_path: Path) -> None:
    """``qdel`` of a ``-notify`` job: Grid Engine sends USR2 to the job, and SIGKILL the queue's
    notify time (60 s here and by default) later."""
    env = mpi_env({k: sge_cluster.env[k] for k in ("SGE_ROOT", "SGE_CELL")})
    job_id, run_dir = _submit(tmp_path, "local-sge", "sge-qdel", env)
    _wait_for("training to start", lambda: _training(run_dir) or not sge_cluster.job_listed(job_id), timeout=180)
    assert _training(run_dir), _logs(run_dir)[-3000:]
    subprocess.run(["qdel", job_id], env=env, check=True, capture_output=True)
    sge_cluster.wait_gone([job_id], timeout=120)
    _assert_stopped_with_a_checkpoint(run_dir)
