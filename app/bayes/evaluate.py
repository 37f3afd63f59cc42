"""Posterior predictive evaluation of a finished run (``spngd evaluate``): calibration and OOD detection.

The predictive distribution is the softmax averaged over S weight samples of the run's posterior
(``posterior.sampled_params``), on the validation set and on an out-of-distribution set
(``app.data.ood``). Sample s runs on rank ``s % world`` and covers the whole validation and OOD sets
(they are small); the ranks' sums of probabilities meet in one allreduce, and rank 0 scores them
and writes ``eval.json``, ``reliability.png`` and ``roc.png`` into the run directory.

Sample s draws from ``generator_for(device, train.seed, 2**32 - 1, 2**32 - 1, s)`` (``EVAL_STREAM``):
training's samples use (seed, step, sample), and NumPy's SeedSequence pads short entropy with zero
words, so this stream equals a training one only at step 2**32 - 1 and sample index 2**32 - 1 (four
billion steps of four billion samples each), i.e. never; and it is the same whatever the rank layout.
A posterior whose draws are all alike (``Posterior.stochastic`` False: SGD, Adam, averaged SGD) is
evaluated with S = 1 whatever was asked, and ``eval.json`` says so.

Libraries do the scoring: torchmetrics' top-label calibration error (15 equal-width bins, L1) and
scikit-learn's ROC AUC, average precision (AUPR), ROC curve (for FPR at 95% TPR) and calibration
curve (the reliability diagram). In-distribution images are the positive class of the OOD task,
scored by the maximum probability and by minus the predictive entropy (higher = more in-distribution).
Evaluation runs in ``train.dtype`` without autocast: NLL needs the small probabilities accurately.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app import config as config_mod
from app.bayes.posterior import KINDS, Dropout, Point, Posterior, from_export, generator_for, sampled_params
from app.checkpoint import Checkpointer
from app.checkpoint import load as load_checkpoint
from app.comm import Comm
from app.config import Config
from app.data import PAD, build_loaders, ood
from app.errors import CheckpointError, ConfigError, UserError
from app.metrics import pyplot, save_figure
from app.models import build_model
from app.storage import write_atomic

EVAL_STREAM = (2**32 - 1, 2**32 - 1)
BINS = 15
FILES = ("eval.json", "reliability.png", "roc.png")
# posterior kinds registered by a module that evaluation does not otherwise import
_KIND_MODULES = {"matrix_normal": "app.bayes.noisy_kfac"}


@dataclass(frozen=True)
class Job:
    """A run checked and loaded for evaluation (no collective started yet)."""

    run_dir: Path
    cfg: Config
    state: dict[str, Any]
    checkpoint: Path
    samples: int  # as asked; a deterministic posterior uses 1
    ood: str


def open_run(run_dir: Path, samples: int | None = None, ood_set: str = "digits",
             checkpoint: Path | None = None) -> Job:
    """Check the request and load the run's config and checkpoint (the newest verified one unless
    ``checkpoint`` names one); every problem is one ``UserError`` line, raised before any collective."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"evaluate: no run directory {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"evaluate: {run_dir} has no config.yaml (not a run directory of spngd train)")
    cfg = config_mod.load(run_dir / "config.yaml")
    samples = cfg.bayes.eval_samples if samples is None else samples
    if samples < 1:
        raise UserError(f"evaluate: --samples={samples} must be a positive integer")
    ood.check(ood_set, cfg.data)
    if checkpoint is None:
        found = Checkpointer(run_dir, cfg.checkpoint.keep).load_latest()
        if found is None:
            raise CheckpointError(f"evaluate: {run_dir} has no complete checkpoint in {run_dir / 'checkpoints'}")
        state, checkpoint = found
    else:
        state = load_checkpoint(checkpoint)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {checkpoint} was not written by spngd train (it has no model state dict)")
    return Job(run_dir, cfg, state, Path(checkpoint), samples, ood_set)


def posterior_of(state: Mapping[str, Any], cfg: Config, device: torch.device) -> Posterior:
    """The checkpoint's posterior on ``device``; without one, MC-dropout when the model has dropout, else
    the point estimate (checkpoints of runs before the Bayesian mode)."""
    export = state.get("posterior")
    if export is None:
        return Dropout() if cfg.model.dropout > 0 else Point()
    kind = export.get("kind") if isinstance(export, Mapping) else None
    if kind not in KINDS and kind in _KIND_MODULES:
        importlib.import_module(_KIND_MODULES[kind])
    try:
        return from_export(_to(export, device))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: its posterior cannot be used: {exc}") from None


def _to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in its dicts and lists moved to ``device`` (draws happen there)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def predict(model: nn.Module, posterior: Posterior, generator: torch.Generator, dtype: torch.dtype,
            *image_sets: Iterable[Tensor]) -> list[Tensor]:
    """One weight sample's float64 softmax (images x classes) on each image set, all at the same draw;
    the model's modes are the caller's (eval: BatchNorm uses its running statistics)."""
    with torch.no_grad(), sampled_params(model, posterior, generator):
        return [torch.cat([model(x.to(dtype)).double().softmax(1) for x in images]) for images in image_sets]


def predictive_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLL (probabilities floored at float64's tiny, so a certain mistake costs 708, not
    infinity), multiclass Brier score (sum over classes of the squared error, 0..2) and ECE."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = probs.double().clamp(0.0, 1.0)
    picked = probs.gather(1, labels[:, None])[:, 0]
    onehot = nn.functional.one_hot(labels, probs.shape[1]).double()
    ece = multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=BINS, norm="l1")
    return {"accuracy": (probs.argmax(1) == labels).double().mean().item(),
            "nll": -picked.clamp_min(torch.finfo(torch.float64).tiny).log().mean().item(),
            "brier": (probs - onehot).pow(2).sum(1).mean().item(),
            "ece": ece.item()}


def confidence_scores(probs: Tensor) -> dict[str, np.ndarray]:
    """Per-image in-distribution scores: the maximum probability and minus the predictive entropy."""
    probs = probs.double()
    entropy = -(probs * probs.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(1)
    return {"max_prob": probs.max(1).values.cpu().numpy(), "entropy": (-entropy).cpu().numpy()}


def ood_metrics(in_score: np.ndarray, out_score: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """AUROC, AUPR and FPR at 95% TPR with the in-distribution images as positives; and the ROC curve
    (fpr, tpr) with every threshold kept, so the 95% crossing is not skipped."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve  # type: ignore[import-untyped]

    truth = np.concatenate([np.ones(len(in_score)), np.zeros(len(out_score))])
    score = np.concatenate([in_score, out_score])
    fpr, tpr, _ = roc_curve(truth, score, drop_intermediate=False)
    return ({"auroc": float(roc_auc_score(truth, score)), "aupr": float(average_precision_score(truth, score)),
             "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}, fpr, tpr)


def roc_points(fpr: np.ndarray, tpr: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """The ROC curve on a fixed FPR grid (TPR interpolated): small enough for eval.json, and the same grid
    for every run, so experiments can average or overlay curves without the scores."""
    grid = np.linspace(0.0, 1.0, points)
    return {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).tolist()}


def evaluate(job: Job, comm: Comm, device: torch.device) -> dict[str, Any] | None:
    """Evaluate ``job`` (collective: every rank calls it); rank 0 writes the files and gets the report."""
    cfg = job.cfg
    dtype = getattr(torch, cfg.train.dtype)
    _, val, info = build_loaders(cfg, 0, 1, device, seed=cfg.train.seed)  # every rank: the whole set
    try:
        model = build_model(cfg.model, info.num_classes, info.input_shape)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model.to(device=device, dtype=dtype)
    try:
        model.load_state_dict(job.state["model"])
    except RuntimeError:
        raise CheckpointError(f"checkpoint {job.checkpoint} does not fit the run's model ({cfg.model.arch}, "
                              f"{info.num_classes} classes)") from None
    model.eval()
    posterior = posterior_of(job.state, cfg, device)
    samples = job.samples if posterior.stochastic else 1
    labels = torch.cat([y[y != PAD] for _, y in val.epoch(0)])
    oodset = ood.build(job.ood, cfg.data, val, len(labels), device)
    n, m, c = len(labels), oodset.size, info.num_classes
    # one buffer, one allreduce: summed val and OOD probabilities, then each sample's own accuracy
    buf = torch.zeros(n * c + m * c + samples, dtype=torch.float64, device=device)
    val_sum, ood_sum, hits = buf[:n * c].view(n, c), buf[n * c:(n + m) * c].view(m, c), buf[(n + m) * c:]
    for s in range(comm.rank, samples, comm.size):
        generator = generator_for(device, cfg.train.seed, *EVAL_STREAM, s)
        p_val, p_ood = predict(model, posterior, generator, dtype, ood.val_images(val), oodset.batches())
        val_sum += p_val
        ood_sum += p_ood
        hits[s] = (p_val.argmax(1) == labels).double().mean()
    comm.allreduce(buf, op="sum", name="evaluate")
    if comm.rank != 0:
        return None
    return _report(job, posterior, samples, labels, val_sum / samples, ood_sum / samples, hits, comm.size)


def _report(job: Job, posterior: Posterior, samples: int, labels: Tensor, p_val: Tensor, p_ood: Tensor,
            hits: Tensor, ranks: int) -> dict[str, Any]:
    """Score the averaged probabilities, write the plots and then ``eval.json`` (its presence means done)."""
    metrics = predictive_metrics(p_val, labels)
    in_scores, out_scores = confidence_scores(p_val), confidence_scores(p_ood)
    detection, curves = {}, {}
    for name in in_scores:
        detection[name], *curves[name] = ood_metrics(in_scores[name], out_scores[name])
    report: dict[str, Any] = {
        **metrics,
        "ood_auroc": detection["max_prob"]["auroc"],
        "ood_aupr": detection["max_prob"]["aupr"],
        "ood_fpr95": detection["max_prob"]["fpr95"],
        "samples": samples,
        "samples_requested": job.samples,
        "posterior": posterior.kind,
        "checkpoint": {"path": str(job.checkpoint), "step": job.state.get("step")},
        "images": {"val": len(labels), "ood": len(p_ood)},
        "ood": {"set": job.ood, "about": ood.ABOUT[job.ood], "positive": "in-distribution",
                "max_prob": detection["max_prob"], "entropy": detection["entropy"],
                "scores": "max_prob: the largest class probability; entropy: minus the predictive entropy"},
        "roc": {name: roc_points(fpr, tpr) for name, (fpr, tpr) in curves.items()},
        "ece_bins": BINS,
        "per_sample_accuracy": hits.tolist(),
        "ranks": ranks,
    }
    if samples != job.samples:
        report["samples_note"] = (f"the {posterior.kind} posterior draws the same weights every time: "
                                  f"1 sample is exact ({job.samples} asked)")
    confidence = in_scores["max_prob"]
    correct = (p_val.argmax(1) == labels).cpu().numpy()
    _plot_reliability(correct, confidence, metrics["ece"], job.run_dir / "reliability.png")
    _plot_roc(curves, detection, job.ood, job.run_dir / "roc.png")
    text = json.dumps(report, indent=1).encode()
    write_atomic(job.run_dir / "eval.json", lambda f: f.write(text))
    return report


def _plot_reliability(correct: np.ndarray, confidence: np.ndarray, ece: float, path: Path) -> None:
    """Accuracy against confidence per bin: scikit-learn's calibration curve on the ECE's 15 equal-width
    bins (it closes them on the right, torchmetrics on the left with 1.0 in a bin of its own: the two
    differ only for confidences exactly on an edge)."""
    from sklearn.calibration import calibration_curve  # type: ignore[import-untyped]

    accuracy, mean_conf = calibration_curve(correct.astype(np.int64), confidence, n_bins=BINS, pos_label=1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    width = 1.0 / BINS
    left = np.minimum(np.floor(mean_conf / width), BINS - 1) * width  # the bin each mean lies in
    ax.bar(left, accuracy, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(mean_conf, accuracy, "o", color="black", markersize=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"reliability: ECE = {ece:.4f} ({BINS} bins)")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def _plot_roc(curves: dict[str, list[np.ndarray]], detection: dict[str, dict[str, float]], ood_set: str,
              path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr) in curves.items():
        d = detection[name]
        ax.plot(fpr, tpr, label=f"{name}: AUROC {d['auroc']:.3f}, FPR@95 {d['fpr95']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (OOD called in-distribution)",
           ylabel="true positive rate (in-distribution)", title=f"OOD detection: validation vs {ood_set}")
    ax.legend(loc="best")
    save_figure(fig, path)
