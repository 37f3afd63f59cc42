"""``spngd analyze`` end to end on a trained smoke run: rows in the database, resume, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.analysis.db import open_db

REPO = Path(__file__).resolve().parents[1]


def spngd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    r = spngd("train", "--config", "configs/smoke.yaml", "--set", f"output.dir={out}", "--set", "output.name=smoke",
              "--set", "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "smoke"


@pytest.mark.slow
def test_analyze_writes_rows_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    args = ["analyze", "--run", str(run_dir), "--matrices", "ggn,emp", "--approx", "full,diag,kfac",
            "--examples", "12", "--top-k", "4", "--db", str(db)]
    first = spngd(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "7 rows written" in first.stdout  # 6 spectra and the snapshot measures
    with open_db(db) as d:
        assert [(s.run, s.step, s.examples) for s in d.snapshots()] == [("smoke", 4, 12)]
        rows = d.rows(run="smoke")
        assert len(rows) == 6 and {r.matrix for r in rows} == {"ggn", "emp"}
        for r in rows:
            assert len(r.eigenvalues) == 4 and r.step == 4 and r.examples == 12 and r.trace > 0
            assert r.gap == pytest.approx(r.train_acc - r.val_acc)
            assert r.eigenvalues[0] <= r.trace + 1e-9
        kfac = [r for r in rows if r.approximation == "kfac"]
        assert all(r.estimator == "kronecker" for r in kfac)
    again = spngd(*args)
    assert again.returncode == 0 and "0 rows written" in again.stdout and "skipped" in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "needle"), [
    (["--matrices", "fisher"], "unknown matrix fisher"),
    (["--approx", "kron"], "unknown approximation kron"),
    (["--top-k", "0"], "must be positive"),
    (["--estimator", "dual", "--matrices", "hessian"], "Gram matrix"),
])
def test_bad_arguments_one_line_exit_2(run_dir: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    r = spngd("analyze", "--run", str(run_dir), "--db", str(tmp_path / "c.sqlite"), *extra)
    assert r.returncode == 2 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "c.sqlite").exists() or "Gram" not in needle
