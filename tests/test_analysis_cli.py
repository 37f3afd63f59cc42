"""``spngd analyze`` end to end on a trained digits MLP, in process: rows in the database, resume,
one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import cli
from app.analysis.db import open_db


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", "--config", "configs/analysis/digits_mlp.yaml", "--set", f"output.dir={out}",
                     "--set", "output.name=mlp", "--set", "train.max_steps=4", "--set", "analysis.every_epochs=0",
                     "--set", "model.width=32"]) == 0
    return out / "mlp"


def test_analyze_writes_rows_and_resumes(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "c.sqlite"
    args = ["analyze", "--run", str(run_dir), "--matrices", "ggn,emp", "--approx", "full,diag,kfac",
            "--examples", "12", "--top-k", "4", "--db", str(db)]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "7 rows written" in capsys.readouterr().out  # 6 spectra and the snapshot measures
    with open_db(db) as d:
        assert [(s.run, s.step, s.examples) for s in d.snapshots()] == [("mlp", 4, 12)]
        rows = d.rows(run="mlp")
        assert len(rows) == 6 and {r.matrix for r in rows} == {"ggn", "emp"}
        for r in rows:
            assert len(r.eigenvalues) == 4 and r.step == 4 and r.examples == 12 and r.trace > 0
            assert r.gap == pytest.approx(r.train_acc - r.val_acc)
            assert r.eigenvalues[0] <= r.trace + 1e-9
        kfac = [r for r in rows if r.approximation == "kfac"]
        assert all(r.estimator == "kronecker" for r in kfac)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "0 rows written" in out and "skipped" in out


@pytest.mark.parametrize(("extra", "needle"), [
    (["--matrices", "fisher"], "unknown matrix fisher"),
    (["--approx", "kron"], "unknown approximation kron"),
    (["--top-k", "0"], "must be positive"),
    (["--estimator", "dual", "--matrices", "hessian"], "Gram matrix"),
    (["--set", "optim.lr=0.1"], "--set applies to --grid only"),
])
def test_bad_arguments_one_line_exit_2(run_dir: Path, tmp_path: Path, extra: list[str], needle: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli.main(["analyze", "--run", str(run_dir), "--db", str(tmp_path / "c.sqlite"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.sqlite").exists()  # refused before the database is touched
