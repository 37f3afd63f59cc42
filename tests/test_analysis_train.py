"""The training hook ``analysis.every_epochs`` and the grid of ``spngd analyze --grid``: rows at the
right steps, training itself untouched, resumption, one-line errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from app import cli, config, launch, study
from app.analysis.db import open_db
from app.checkpoint import Checkpointer
from app.comm import Comm
from app.config import ConfigError
from app.train import train

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "analysis" / "digits_mlp.yaml"  # an MLP on digits: 22 steps an epoch at batch 64
# 10 steps, spectra every 5 (0.23 of an epoch) on 16 examples
HOOK = ["train.max_steps=10", "train.log_every=1", "output.plot=false", "analysis.examples=16",
        "analysis.top_k=3", "analysis.matrices=[ggn, emp]", "analysis.approximations=[full, kfac]"]


def _train(world: tuple[launch.World, Comm], tmp: Path, name: str, *overrides: str) -> Path:
    torch.set_num_threads(1)
    cfg = config.load(BASE, [*HOOK, *overrides, f"output.dir={tmp}", f"output.name={name}"])
    train(cfg, world[0], world[1], torch.device("cpu"))
    return tmp / name


def _losses(run: Path) -> list[str]:
    with (run / "metrics.csv").open() as f:
        return [r["loss"] for r in csv.DictReader(f) if r["kind"] == "train"]


def test_hook_records_at_its_steps_and_leaves_training_unchanged(world: tuple[launch.World, Comm],
                                                                 tmp_path: Path) -> None:
    plain = _train(world, tmp_path, "plain", "analysis.every_epochs=0")
    hooked = _train(world, tmp_path, "hooked", "analysis.every_epochs=0.23")
    assert _losses(hooked) == _losses(plain)  # measuring draws no random numbers the training uses
    a, b = (Checkpointer(r, 2).load_latest() for r in (plain, hooked))
    assert a is not None and b is not None
    assert all(torch.equal(a[0]["model"][k], b[0]["model"][k]) for k in a[0]["model"])
    with open_db(hooked / "curvature.sqlite") as db:
        rows = db.rows(run="hooked")
        assert {(r.step, r.matrix, r.approximation) for r in rows} == \
            {(s, m, a) for s in (0, 5, 10) for m in ("ggn", "emp") for a in ("full", "kfac")}
        assert all(len(r.eigenvalues) == 3 and r.examples == 16 and r.epoch == r.step / 22 for r in rows)
        assert {r.step for r in db.snapshots(run="hooked")} == {0, 5, 10}
    assert not (plain / "curvature.sqlite").exists()
    again = _train(world, tmp_path, "hooked", "analysis.every_epochs=0.23", "checkpoint.resume=auto")
    with open_db(again / "curvature.sqlite") as db:  # resumed at the end: nothing measured twice
        assert len(db.rows(run="hooked")) == 12


@pytest.mark.parametrize(("override", "needle"), [
    ("analysis.matrices=[fisher]", "analysis.matrices=['fisher'] must name one or more of hessian"),
    ("analysis.approximations=[]", "analysis.approximations=[] must name"),
    ("analysis.every_epochs=-1", "analysis.every_epochs"),
    ("analysis.estimator=exact", "analysis.estimator"),
    ("data.backend=synthetic", "data.backend=synthetic serves one random batch"),
])
def test_bad_analysis_settings_are_one_config_line(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")) as err:
        config.load(BASE, [override])
    assert "\n" not in str(err.value)


def _grid(tmp: Path, body: str) -> Path:
    path = tmp / "g.yaml"
    path.write_text(f"name: tiny\nconfig: {BASE}\n{body}")
    return path


def test_grid_trains_each_trial_into_one_database_and_resumes(world: tuple[launch.World, Comm],
                                                             tmp_path: Path) -> None:
    torch.set_num_threads(1)
    path = _grid(tmp_path, "parameters:\n  optim.lr: {grid: [0.02, 0.05]}\n")
    sets = [*HOOK, "train.max_steps=4", "analysis.every_epochs=1", "analysis.matrices=[ggn]",
            "analysis.approximations=[full]", f"output.dir={tmp_path}"]
    plan = study.plan(path, None, sets)
    assert plan.db == tmp_path / "tiny.sqlite" and [t.run_dir.name for t in plan.trials] == ["trial-001", "trial-002"]
    lines: list[str] = []
    assert study.run(plan, world[0], world[1], torch.device("cpu"), lines.append) == (2, 0, 0)
    with open_db(plan.db) as db:
        rows = db.rows()
        assert {(r.run, r.step) for r in rows} == {(f"trial-00{i}", s) for i in (1, 2) for s in (0, 4)}
        assert {r.run: r.hparams["lr"] for r in rows} == {"trial-001": 0.02, "trial-002": 0.05}
    assert study.run(study.plan(path, None, sets), world[0], world[1], torch.device("cpu"), lines.append) == (0, 2, 0)


@pytest.mark.parametrize(("body", "sets", "needle"), [
    ("parameters:\n  optim.lr: {grid: [0.1]}\n", ["analysis.every_epochs=0"], "records nothing: set analysis"),
    ("parameters:\n  optim.lr: {grid: [0.1, 2000]}\n", ["analysis.every_epochs=1"], "trial 2 (optim.lr=2000)"),
])
def test_grid_refuses_before_training(tmp_path: Path, body: str, sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        study.plan(_grid(tmp_path, body), None, [*sets, f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="names no base configuration"):
        (tmp_path / "n.yaml").write_text("parameters:\n  optim.lr: {grid: [0.1]}\n")
        study.plan(tmp_path / "n.yaml", None, [])


def test_shipped_grids_plan_every_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """configs/analysis/grid.yaml is the full 2^5 factorial the granulated Kendall needs, grid_models.yaml
    datasets x models x lr; the grid file alone (its config:) is also a valid array job."""
    monkeypatch.chdir(REPO)
    plan = study.plan(REPO / "configs" / "analysis" / "grid.yaml", None, [f"output.dir={tmp_path}"])
    keys = [tuple(sorted(t.overrides)) for t in plan.trials]
    assert len(keys) == len(set(keys)) == 32 and plan.db == tmp_path / "curvature-digits.sqlite"
    assert all(t.cfg.analysis.every_epochs > 0 and t.cfg.data.bundled == "digits" for t in plan.trials)
    models = study.plan(REPO / "configs" / "analysis" / "grid_models.yaml", None, [f"output.dir={tmp_path}"])
    assert {(t.cfg.data.bundled, t.cfg.model.arch) for t in models.trials} == \
        {(d, m) for d in ("digits", "gmm") for m in ("mlp", "cnn", "cifar_resnet8")}
    capsys.readouterr()
    assert cli.main(["submit", "--system", "local-slurm", "--nodes", "1", "--sweep",
                     "configs/analysis/grid.yaml", "--dry-run"]) == 0
    assert "--array=1-32" in capsys.readouterr().out
