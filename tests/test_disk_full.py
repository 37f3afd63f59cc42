"""A file system that fills up (issue 10, finding 10): a real, small tmpfs mounted for the test.

A failed write names the file and the free space in one line, leaves no partial or 0-byte file, and
the previous checkpoint stays what ``--resume auto`` continues from once space is freed.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from testlib import tmpfs

from app import config
from app.checkpoint import Checkpointer, load
from app.errors import DiskFullError
from app.metrics import Metrics, write_plot
from tests.mpi_helpers import REPO, mpi_env, run_mpi, skip_unless_runnable

SMOKE = str(REPO / "configs/smoke.yaml")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An empty 8 MiB tmpfs (skipped with the reason where mounting is not permitted)."""
    with tmpfs(tmp_path / "fs", "size=8m") as mnt:
        yield mnt


def _fill(fs: Path, leave: int) -> Path:
    """Write a filler file until about ``leave`` bytes are free."""
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with filler.open("ab") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass
    return filler


def _leftovers(root: Path) -> list[str]:
    """Temporary or empty files under ``root`` (what a failed write must not leave)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and (".tmp" in p.name or p.stat().st_size == 0))


def test_every_writer_fails_whole_on_a_full_disk(small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = small_fs / "run"
    run.mkdir()
    cfg = config.load(SMOKE)
    config.dump(cfg, run / "config.yaml")
    ckpt = Checkpointer(run, keep=2)
    ckpt.save({"step": 1, "w": torch.zeros(1000)}, 1)
    metrics = Metrics(run, total_steps=2, tensorboard=False, bar=False)
    row = {"kind": "train", "step": 1, "epoch": 0.5, "loss": 1.0, "top1": 0.5, "lr": 0.1, "img_per_s": 1.0,
           "data_s": 0.0, "step_s": 0.1, "skipped_images": 0}
    metrics.log(row)
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.csv")}
    _fill(small_fs, leave=0)

    with pytest.raises(DiskFullError, match=r"cannot write .*ckpt-00000002\.pt: No space left on device \(.* free "):
        ckpt.save({"step": 2, "w": torch.zeros(200_000)}, 2)
    with pytest.raises(DiskFullError, match=r"config\.yaml.* free of "):
        config.dump(cfg, run / "config.yaml")
    with pytest.raises(DiskFullError, match=r"metrics\.csv"):
        metrics.log({**row, "step": 2, "kind": "x" * 10_000})
    with pytest.raises(DiskFullError, match=r"plot\.png"):
        write_plot(metrics.history, run / "plot.png")
    with caplog.at_level(logging.WARNING):
        assert metrics.close(plot=True) is None  # the end-of-run plot only warns: metrics.csv is complete
    assert "plot not written" in caplog.text and "plot.png" in caplog.text

    assert _leftovers(run) == []
    assert {p: p.read_bytes() for p in before} == before
    assert [r["step"] for r in csv.DictReader((run / "metrics.csv").open())] == ["1"]
    assert load(run / "checkpoints/ckpt-00000001.pt")["step"] == 1
    assert ckpt.load_latest() is not None and ckpt.load_latest()[1].name == "ckpt-00000001.pt"  # type: ignore[index]


def test_stale_temporary_checkpoints_are_removed(tmp_path: Path) -> None:
    """A writer killed mid-save leaves .ckpt-*.tmpPID; the next save clears it."""
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save({"step": 1}, 1)
    stale = tmp_path / "checkpoints" / ".ckpt-00000002.pt.tmp999999"
    stale.write_bytes(b"partial")
    ckpt.save({"step": 3}, 3)
    assert not stale.exists()


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "train", "--config", SMOKE, *args], cwd=REPO,
                          env=mpi_env(None), capture_output=True, text=True, timeout=300)


def test_full_disk_during_a_run_loses_nothing(small_fs: Path) -> None:
    """A run checkpoints; the disk fills; the resumed run's next checkpoint fails with one line; after
    freeing space, --resume auto continues from the last good checkpoint."""
    common = ["--set", f"output.dir={small_fs}", "--set", "output.name=run", "--set", "output.plot=false",
              "--set", "checkpoint.every_steps=2", "--set", "train.log_every=2"]
    first = _train(*common, "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    run = small_fs / "run"
    good = run / "checkpoints/ckpt-00000004.pt"
    filler = _fill(small_fs, leave=good.stat().st_size // 2)  # room for config.yaml and rows, not a checkpoint

    full = _train(*common, "--set", "train.max_steps=8", "--resume", "auto")
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("spngd: error")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert "DiskFullError: cannot write" in errors[0] and "ckpt-00000006.pt" in errors[0], errors[0]
    assert "No space left on device" in errors[0] and " free of " in errors[0], errors[0]
    assert _leftovers(run) == []
    assert config.load(run / "config.yaml").train.max_steps == 8  # the resumed run's, written whole
    assert load(good)["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-00000002.pt", "ckpt-00000002.pt.sha256", "ckpt-00000004.pt", "ckpt-00000004.pt.sha256"]

    filler.unlink()
    again = _train(*common, "--set", "train.max_steps=8", "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {good} at step 4" in again.stderr
    assert "steps=8" in again.stdout


def test_full_disk_ends_a_two_rank_job_with_one_line(small_fs: Path) -> None:
    """Rank 0 fails writing while rank 1 waits in the barrier after the save: the job still ends at once."""
    skip_unless_runnable()
    common = ["--config", SMOKE, "--set", f"output.dir={small_fs}", "--set", "output.name=run",
              "--set", "output.plot=false", "--set", "train.max_steps=2"]
    _fill(small_fs, leave=64 * 1024)
    rc, out = run_mpi(2, "-m", "app", "train", *common, timeout=180)
    assert rc not in (0, 124), out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("spngd: error")]
    assert len(errors) == 1 and "ckpt-00000002.pt" in errors[0] and " free of " in errors[0], out[-3000:]
    assert _leftovers(small_fs / "run") == []
