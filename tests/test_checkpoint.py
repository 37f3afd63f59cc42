"""Checkpoint files: atomic writes, verification, fallback past damaged files, pruning; metrics
artefacts and the FINAL line's format."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from app.checkpoint import Checkpointer, CheckpointError, load
from app.metrics import Metrics, Summary, parse_final_line


def _state(step: int) -> dict[str, object]:
    return {"step": step, "w": torch.full((3,), float(step))}


def test_latest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save(_state(step), step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-00000020.pt", "ckpt-00000020.pt.sha256", "ckpt-00000030.pt", "ckpt-00000030.pt.sha256"]
    state, path = ckpt.load_latest()  # type: ignore[misc]
    assert state["step"] == 30 and path.name == "ckpt-00000030.pt"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_used(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(_state(1), 1)
    newest = ckpt.save(_state(2), 2)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        newest.with_suffix(".pt.sha256").unlink()
    with caplog.at_level(logging.WARNING):
        state, path = ckpt.load_latest()  # type: ignore[misc]
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt"
    assert "ckpt-00000002.pt is" in caplog.text and "trying an older checkpoint" in caplog.text
    assert "cannot be read" not in caplog.text  # the verdict itself, not wrapped in another
    with pytest.raises(CheckpointError) as info:
        load(newest)
    assert "\n" not in str(info.value)


def test_no_checkpoint_and_missing_file(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path, keep=1).load_latest() is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "ckpt-00000001.pt")


def test_checkpoints_cannot_run_code(tmp_path: Path) -> None:
    """weights_only loading: a pickled object other than tensors and plain containers is refused."""
    ckpt = Checkpointer(tmp_path, keep=1)
    path = ckpt.save({"evil": Path("/")}, 1)
    with pytest.raises(CheckpointError, match="cannot be read safely") as info:
        load(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)  # torch's advice is not shown


def test_final_line_round_trip() -> None:
    s = Summary(val_top1=0.97654, val_loss=0.08, epochs=8, steps=496, time_s=101.25, img_per_s=310.0,
                run_dir=Path("runs/demo"))
    line = s.final_line()
    assert line == ("FINAL val_top1=0.9765 val_loss=0.0800 epochs=8 steps=496 time_s=101.2 img_per_s=310.0 "
                    "run_dir=runs/demo skipped_images=0")
    assert parse_final_line(line) == {"val_top1": 0.9765, "val_loss": 0.08, "epochs": 8, "steps": 496,
                                      "time_s": 101.2, "img_per_s": 310.0, "run_dir": "runs/demo",
                                      "skipped_images": 0}
    assert parse_final_line(line.rsplit(" ", 1)[0])["steps"] == 496  # lines of older versions still parse


def test_metrics_csv_tensorboard_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = Metrics(tmp_path, total_steps=4, tensorboard=True, bar=False, extra_fields=("kfac_layers",))
    for step in (2, 4):
        m.log({"kind": "train", "step": step, "epoch": step / 4, "loss": 1.0 / step, "top1": 0.5, "lr": 0.1,
               "img_per_s": 100.0, "data_s": 0.01, "step_s": 0.1, "skipped_images": 0, "kfac_layers": 3})
    m.log({"kind": "val", "step": 4, "epoch": 1.0, "loss": 0.4, "top1": 0.9, "top5": 1.0, "skipped_images": 0})
    plot = m.close(plot=True)
    assert plot is not None and plot.stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["kind"] for r in rows] == ["train", "train", "val"] and rows[0]["kfac_layers"] == "3"
    assert any((tmp_path / "tensorboard").iterdir())
    out = capsys.readouterr().out
    assert "step 2/4" in out and "validation step 4" in out
