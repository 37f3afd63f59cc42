"""The command line as a user meets it: help texts, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
