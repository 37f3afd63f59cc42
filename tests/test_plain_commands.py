"""``spngd train`` and ``spngd analyze`` on an in-memory bundled set, in process (a separate module from
tests/test_plain_training.py: the commands start their own communicator, which its ``world`` fixture holds),
and ``spngd evaluate``'s refusal of an OOD set such data cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app import cli
from app.analysis.db import open_db
from app.config import load
from app.data import ood
from app.errors import DataError


def test_spngd_train_then_analyze_on_digits(tmp_path: Path) -> None:
    """A digits MLP run (100 steps: measured 0.88 val accuracy; the learning claims are
    tests/test_plain_training.py's) and two of its spectra in the database under dataset digits, model mlp."""
    assert cli.main(["train", "--config", "configs/smoke.yaml", "--set", f"output.dir={tmp_path}", "--set",
                     "output.name=mlp", "--set", "output.plot=false", "--set", "data.bundled=digits", "--set",
                     "model.arch=mlp", "--set", "model.width=64", "--set", "train.epochs=10", "--set",
                     "train.max_steps=100"]) == 0
    summary = json.loads((tmp_path / "mlp" / "summary.json").read_text())
    assert summary["val_top1"] > 0.5 and summary["steps"] == 100
    db = tmp_path / "c.sqlite"
    assert cli.main(["analyze", "--run", str(tmp_path / "mlp"), "--matrices", "emp", "--approx", "full,kfac",
                     "--estimator", "dual", "--examples", "16", "--top-k", "3", "--db", str(db)]) == 0
    with open_db(db) as d:
        rows = d.rows(run="mlp")
    assert sorted((r.dataset, r.model, r.approximation) for r in rows) == [("digits", "mlp", "full"),
                                                                            ("digits", "mlp", "kfac")]
    assert all(len(r.eigenvalues) == 3 and r.trace > 0 and r.val_acc == summary["val_top1"] for r in rows)


def test_evaluate_refuses_an_ood_set_the_in_memory_data_cannot_take() -> None:
    digits = load(None, ["data.bundled=digits"]).data
    ood.check("rotated", digits)  # 8x8 tensors rotate like the run's own images
    for name in ("digits", "noise", "inverted"):
        with pytest.raises(DataError, match="use --ood rotated"):
            ood.check(name, digits)
    with pytest.raises(DataError, match="1x50 tensors .it has no OOD set"):
        ood.check("rotated", load(None, ["data.bundled=gmm", "data.gmm_dim=50"]).data)
