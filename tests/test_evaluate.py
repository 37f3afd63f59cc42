"""``spngd evaluate`` (issue 12, deliver 5): the libraries it scores with cross-checked against each other
and against hand computations, the metric oracles, the OOD sets' pixels, and end-to-end runs: a trained
tiny run (its S = 1 evaluation equals the trainer's own validation), a Gaussian posterior at S > 1, the
same samples on 2 ranks and on 1, and one-line errors with exit 2 and no files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mpi_helpers import REPO, mpi_env, run_mpi, skip_unless_runnable
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from app import cli, config
from app.bayes import evaluate as ev
from app.bayes.posterior import Gaussian, Point, generator_for
from app.checkpoint import Checkpointer
from app.data import ood
from app.data.common import MEAN_255, PAD, STD_255, normalise
from app.errors import CheckpointError, DataError
from app.models import build_model

SPNGD = str(Path(sys.executable).parent / "spngd")
SMOKE = REPO / "configs" / "smoke.yaml"
TOP = ("accuracy", "nll", "brier", "ece", "ood_auroc", "ood_aupr", "ood_fpr95", "samples")


# -- the libraries, cross-checked ------------------------------------------------------------------------
def _sklearn_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label ECE from scikit-learn's calibration curve: sum over bins of n_b / N |acc_b - conf_b|."""
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(int)
    acc, mean_conf = calibration_curve(correct, conf, n_bins=bins)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], conf), minlength=bins)
    return float(np.sum(counts[counts > 0] / len(conf) * np.abs(acc - mean_conf)))


def test_torchmetrics_ece_matches_sklearn_on_random_predictions() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2000, 10, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, 10, (2000,), generator=gen)
    labels[:1200] = probs[:1200].argmax(1)  # 60 % + chance correct: bins of every kind
    ours = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1").item()
    theirs = _sklearn_ece(probs.numpy(), labels.numpy(), 15)
    assert ours > 0.05 and abs(ours - theirs) < 1e-6  # torchmetrics bins in float32


def _toy(groups: list[tuple[float, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """3-class predictions: per (confidence, images, correct) group, class 0 gets the confidence and the
    first ``correct`` images are labelled 0, the rest 1."""
    probs, labels = [], []
    for conf, n, correct in groups:
        probs += [[conf, (1 - conf) / 2, (1 - conf) / 2]] * n
        labels += [0] * correct + [1] * (n - correct)
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(labels)


def test_ece_by_hand_calibrated_and_miscalibrated() -> None:
    # 50 images at 0.62 confidence, 31 right: accuracy 0.62 in its bin -> ECE 0
    probs, labels = _toy([(0.62, 50, 31)])
    assert ev.predictive_metrics(probs, labels)["ece"] == pytest.approx(0.0, abs=1e-6)
    # 10 at 0.9 with 6 right (gap 0.3) and 10 at 0.5 with 5 right (gap 0): ECE = 0.5 x 0.3 = 0.15
    probs, labels = _toy([(0.9, 10, 6), (0.5, 10, 5)])
    assert ev.predictive_metrics(probs, labels)["ece"] == pytest.approx(0.15, abs=1e-6)
    assert _sklearn_ece(probs.numpy(), labels.numpy(), 15) == pytest.approx(0.15, abs=1e-12)


def test_torchmetrics_auroc_matches_sklearn_and_the_pair_count() -> None:
    rng = np.random.default_rng(1)
    in_score, out_score = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 200)
    truth = np.r_[np.ones(300), np.zeros(200)]
    score = np.r_[in_score, out_score]
    pairs = (in_score[:, None] > out_score[None, :]).mean()  # no ties in continuous draws
    tm = binary_auroc(torch.from_numpy(score), torch.from_numpy(truth).long()).item()
    assert roc_auc_score(truth, score) == pytest.approx(pairs, abs=1e-12)
    assert tm == pytest.approx(pairs, abs=1e-6) and 0.7 < pairs < 0.8
    assert ev.ood_metrics(in_score, out_score)[0]["auroc"] == pytest.approx(pairs, abs=1e-12)


def test_ood_metrics_by_hand() -> None:
    # in 0.9 0.8 0.4, out 0.7 0.4 0.1: pairs won 3 + 3 + (0 + tie 0.5 + 1) = 7.5 of 9
    m, fpr, tpr = ev.ood_metrics(np.array([0.9, 0.8, 0.4]), np.array([0.7, 0.4, 0.1]))
    assert m["auroc"] == pytest.approx(7.5 / 9, abs=1e-12)
    # precision 1 at recall 1/3 and 2/3, then 3/5 at recall 1 (0.4 takes one in, one out)
    assert m["aupr"] == pytest.approx((1 + 1 + 0.6) / 3, abs=1e-12)
    assert m["fpr95"] == pytest.approx(2 / 3, abs=1e-12)  # all in needs threshold 0.4: 0.7 and 0.4 pass
    assert fpr[0] == 0 and tpr[-1] == 1
    perfect = ev.ood_metrics(np.array([0.9, 0.8]), np.array([0.2, 0.1]))[0]
    assert perfect == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}


def test_accuracy_nll_brier_and_scores_by_hand() -> None:
    probs, labels = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64), torch.tensor([0, 0])
    m = ev.predictive_metrics(probs, labels)
    assert m["accuracy"] == 0.5
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.4)) / 2, abs=1e-12)
    assert m["brier"] == pytest.approx((0.08 + 0.72) / 2, abs=1e-12)
    s = ev.confidence_scores(probs)
    assert s["max_prob"].tolist() == [0.8, 0.6]
    assert s["entropy"][0] == pytest.approx(0.8 * math.log(0.8) + 0.2 * math.log(0.2), abs=1e-12)
    certain = ev.predictive_metrics(torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([0]))
    assert math.isfinite(certain["nll"]) and certain["nll"] > 700  # floored, JSON-safe


def test_checkpoint_without_posterior_is_point_or_dropout() -> None:
    cpu = torch.device("cpu")
    assert ev.posterior_of({}, config.load(None), cpu).kind == "point"
    assert ev.posterior_of({}, config.load(None, ["model.dropout=0.2"]), cpu).kind == "dropout"
    with pytest.raises(CheckpointError, match="posterior cannot be used"):
        ev.posterior_of({"posterior": {"kind": "gaussian"}}, config.load(None), cpu)


# -- OOD sets ------------------------------------------------------------------------------------------
class _Val:
    """A validation loader stand-in: two batches of uint8-exact images, the last one padded."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(2)
        self.pixels = torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = normalise(self.pixels)
        yield x[:4], torch.tensor([1, 2, 3, 4])
        yield x[4:], torch.tensor([5, PAD])


def _data(size: int = 8) -> config.DataConfig:
    return config.load(None, [f"data.image_size={size}", f"data.val_resize={size}", "data.batch_size=4"]).data


def _all(s: ood.OODSet) -> torch.Tensor:
    return torch.cat(list(s.batches()))


def test_ood_sets_in_the_runs_format() -> None:
    val = _Val()
    real = val.pixels[:5]  # the padded slot is no image
    inverted = ood.build("inverted", _data(), val, 5, torch.device("cpu"))  # type: ignore[arg-type]
    assert inverted.size == 5
    torch.testing.assert_close(_all(inverted), normalise(255 - real), atol=1e-5, rtol=0)
    rotated = _all(ood.build("rotated", _data(), val, 5, torch.device("cpu")))  # type: ignore[arg-type]
    torch.testing.assert_close(rotated, torch.rot90(normalise(real), 1, dims=(2, 3)), atol=0, rtol=0)
    assert rotated[0, 0, 0, 0] == normalise(real)[0, 0, 0, -1]  # counter-clockwise: top-left <- top-right
    noise = ood.build("noise", _data(), val, 5, torch.device("cpu"))  # type: ignore[arg-type]
    first = _all(noise)
    assert first.shape == (5, 3, 8, 8) and torch.equal(first, _all(noise))  # seeded: the same each pass
    pixels = first * torch.tensor(STD_255).view(1, 3, 1, 1) + torch.tensor(MEAN_255).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3 and abs(pixels.mean() - 127.5) < 8


def test_digits_are_sklearns_images_scaled_and_resized() -> None:
    from sklearn.datasets import load_digits

    at8 = ood.build("digits", _data(8), _Val(), 5, torch.device("cpu"))  # type: ignore[arg-type]
    images = _all(at8)
    assert at8.size == 1797 and images.shape == (1797, 3, 8, 8)
    expected = torch.from_numpy(np.rint(load_digits().images[:4] * 255 / 16).astype(np.uint8))
    torch.testing.assert_close(images[:4], normalise(expected[:, None].expand(4, 3, 8, 8)), atol=1e-5, rtol=0)
    assert _all(ood.build("digits", _data(28), _Val(), 5, torch.device("cpu"))).shape == (1797, 3, 28, 28)  # type: ignore[arg-type]


def test_unknown_ood_set_is_one_line() -> None:
    with pytest.raises(DataError, match=r"unknown OOD set 'mnist' \(known: digits, inverted, noise, rotated\)"):
        ood.build("mnist", _data(), _Val(), 5, torch.device("cpu"))  # type: ignore[arg-type]


# -- end to end ----------------------------------------------------------------------------------------
def _python(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=mpi_env(None), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-step cifar_resnet8 Adam run on the bundled MNIST-5k (point posterior; about 30 % accurate, so
    predictions vary), via ``python -m app train``."""
    out = tmp_path_factory.mktemp("runs")
    res = _python("train", "--config", str(SMOKE), "--set", f"output.dir={out}", "--set", "output.name=tiny",
                  "--set", "optim.name=adam", "--set", "optim.lr=0.003", "--set", "data.batch_size=32",
                  "--set", "train.max_steps=60", "--set", "output.plot=false")
    assert res.returncode == 0, res.stdout + res.stderr
    return out / "tiny"


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for name in ev.FILES:
        (to / name).unlink(missing_ok=True)
    return to


def _gaussian(run: Path, to: Path, std: float = 0.03) -> Path:
    """A copy of ``run`` whose checkpoint holds a Gaussian posterior around the trained weights."""
    run = _copy(run, to)
    ckpt = Checkpointer(run, keep=2)
    found = ckpt.load_latest()
    assert found is not None
    state, _ = found
    mean = {k: v for k, v in state["model"].items() if k.endswith(("weight", "bias"))}
    state["posterior"] = Gaussian(mean, {k: torch.full_like(v, std) for k, v in mean.items()}).export()
    ckpt.save(state, state["step"])
    return run


def _read(run: Path) -> dict[str, Any]:
    return json.loads((run / "eval.json").read_text())


def test_evaluate_a_trained_run(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "ckpt-00000060.pt"
    res = _python("evaluate", "--run", str(run), "--samples", "5", "--checkpoint", str(ckpt))
    assert res.returncode == 0, res.stdout + res.stderr
    report = _read(run)
    assert set(TOP) <= report.keys()
    assert report["samples"] == 1 and report["samples_requested"] == 5 and "samples_note" in report
    assert report["posterior"] == "point" and report["checkpoint"] == {"path": str(ckpt), "step": 60}
    assert report["images"] == {"val": 1000, "ood": 1797} and report["ood"]["set"] == "digits"
    for key in ("accuracy", "ece", "ood_auroc", "ood_aupr", "ood_fpr95"):
        assert 0.0 <= report[key] <= 1.0, key
    assert 0.0 <= report["brier"] <= 2.0 and report["nll"] > 0
    assert report["ood_auroc"] == report["ood"]["max_prob"]["auroc"] != report["ood"]["entropy"]["auroc"]
    # one deterministic sample is exactly the trainer's own validation of the same weights
    summary = json.loads((run / "summary.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["val_top1"], abs=1e-9)
    assert report["nll"] == pytest.approx(summary["val_loss"], rel=1e-5)
    for png in ("reliability.png", "roc.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[1].startswith("val (1000 images): accuracy") and "eval.json" in lines[-1]


def test_gaussian_posterior_samples_differ(trained: Path, tmp_path: Path) -> None:
    run = _gaussian(trained, tmp_path / "gauss")
    job = ev.open_run(run, 3, "noise")
    assert job.samples == 3
    cpu = torch.device("cpu")
    posterior = ev.posterior_of(job.state, job.cfg, cpu)
    assert posterior.kind == "gaussian" and posterior.stochastic
    model = build_model(job.cfg.model, 10)
    model.load_state_dict(job.state["model"])
    model.eval()
    x = [normalise(torch.randint(0, 256, (8, 3, 28, 28), generator=torch.Generator().manual_seed(3),
                                 dtype=torch.uint8))]

    def probs(post: Any, s: int) -> torch.Tensor:
        return ev.predict(model, post, generator_for(cpu, 0, *ev.EVAL_STREAM, s), torch.float32, x)[0]

    assert (probs(posterior, 0) - probs(posterior, 1)).abs().max() > 1e-3  # two draws, two predictions
    torch.testing.assert_close(probs(posterior, 1), probs(posterior, 1), atol=0, rtol=0)  # a draw reproduces
    torch.testing.assert_close(probs(Point(), 0), probs(Point(), 1), atol=0, rtol=0)  # the point has one
    res = _python("evaluate", "--run", str(run), "--samples", "3", "--ood", "noise")
    assert res.returncode == 0, res.stdout + res.stderr
    report = _read(run)
    assert report["samples"] == 3 and report["posterior"] == "gaussian" and "samples_note" not in report
    assert len(report["per_sample_accuracy"]) == 3 and report["images"] == {"val": 1000, "ood": 1000}


@pytest.mark.mpi
def test_samples_over_two_ranks_equal_one_rank(trained: Path, tmp_path: Path) -> None:
    skip_unless_runnable()
    one, two = _gaussian(trained, tmp_path / "one"), _gaussian(trained, tmp_path / "two")
    res = _python("evaluate", "--run", str(one), "--samples", "3", "--ood", "rotated")
    assert res.returncode == 0, res.stdout + res.stderr
    # rank 0 takes samples 0 and 2, rank 1 sample 1
    rc, out = run_mpi(2, SPNGD, "evaluate", "--run", str(two), "--samples", "3", "--ood", "rotated", timeout=300)
    assert rc == 0, out
    assert out.count("val (1000 images)") == 1  # the summary on rank 0 only
    a, b = _read(one), _read(two)
    assert (a["ranks"], b["ranks"]) == (1, 2) and a["samples"] == b["samples"] == 3
    assert len(set(a["per_sample_accuracy"])) > 1  # the three samples are not one
    # summed in another order only: float64 rounding (ECE bins in float32; AUROC ties may break anew)
    assert a["per_sample_accuracy"] == pytest.approx(b["per_sample_accuracy"], abs=1e-12)
    for key in ("accuracy", "nll", "brier", "ece", "ood_auroc", "ood_aupr", "ood_fpr95"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    for score in ("max_prob", "entropy"):
        assert a["ood"][score] == pytest.approx(b["ood"][score], abs=1e-6)


# -- one-line errors -----------------------------------------------------------------------------------
def _fails(capsys: pytest.CaptureFixture[str], *args: str, match: str) -> None:
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spngd: error: ") and match in err[0], err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, "--run", str(tmp_path / "absent"), match="no run directory")
    _fails(capsys, "--run", str(tmp_path), match="has no config.yaml")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained / "config.yaml", bare)
    _fails(capsys, "--run", str(bare), match="has no complete checkpoint")
    run = _copy(trained, tmp_path / "run")
    _fails(capsys, "--run", str(run), "--samples", "0", match="--samples=0 must be a positive integer")
    _fails(capsys, "--run", str(run), "--samples", "two", match="--samples='two' must be a positive integer")
    _fails(capsys, "--run", str(run), "--ood", "cifar", match="unknown OOD set 'cifar'")
    _fails(capsys, "--run", str(run), "--checkpoint", str(tmp_path / "x.pt"), match="does not exist")
    assert not any((d / f).exists() for d in (bare, run) for f in ev.FILES)


def test_roc_points_keep_the_curve_on_a_fixed_grid() -> None:
    """eval.json's ROC points (101 FPR values, TPR interpolated): the area under them is the exact AUROC
    to 0.01 on overlapping scores, and they start at TPR(0) and end at (1, 1)."""
    g = np.random.default_rng(0)
    inside, outside = g.normal(1.0, 1.0, 700), g.normal(0.0, 1.0, 500)
    detection, fpr, tpr = ev.ood_metrics(inside, outside)
    points = ev.roc_points(fpr, tpr)
    assert len(points["fpr"]) == len(points["tpr"]) == 101 and points["fpr"][-1] == points["tpr"][-1] == 1.0
    assert abs(np.trapezoid(points["tpr"], points["fpr"]) - detection["auroc"]) < 0.01
