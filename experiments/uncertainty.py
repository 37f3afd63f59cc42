"""Uncertainty on the bundled data: Adam, MC-dropout, SGLD, VOGN, noisy K-FAC and IVON against SGD.

Every method trains cifar_resnet8 on MNIST-5k with ``mpirun -np 2 spngd train`` from
``configs/bayes_vogn_demo.yaml`` at the same global batch (64 distinct images per step) and epochs:
the point-estimate methods (SGD, Adam, MC-dropout, SGLD) as 2 data ranks x 32 images; the sampling
ones (VOGN, noisy K-FAC, IVON) as 2 Monte-Carlo sample groups x 64 images, i.e. 2 weight samples per
step, which doubles their compute per step, as a second sample does on any machine. Then
``spngd evaluate`` (2 ranks, ``--samples`` S, OOD set ``--ood``) scores the posterior predictive.
Per method and seed: validation accuracy, NLL, ECE, OOD AUROC (max-probability score), and the
epoch time (training seconds / epochs from ``summary.json``) as a ratio to SGD's epoch time of the
same seed, measured in the same invocation. The table is the mean (and standard deviation) over the
seeds; ``--plot`` overlays every method's mean ROC curve (from ``eval.json``'s fixed FPR grid).

Usage (the README's table)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/uncertainty.py --out runs/uncertainty --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from time_to_accuracy import cpu_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bayes_vogn_demo.yaml"
DATA_PARALLEL = ("bayes.mc_groups=1", "data.batch_size=32")  # 2 ranks x 32 = 64 images per step
METHODS: dict[str, tuple[str, ...]] = {
    "sgd": (*DATA_PARALLEL, "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true",
            "optim.weight_decay=5e-4"),
    "adam": (*DATA_PARALLEL, "optim.name=adam", "optim.lr=0.002", "optim.weight_decay=5e-4"),
    "mc_dropout": (*DATA_PARALLEL, "optim.name=adam", "optim.lr=0.002", "optim.weight_decay=5e-4",
                   "model.dropout=0.3"),
    "sgld": (*DATA_PARALLEL, "optim.name=sgld", "optim.lr=0.5", "bayes.ensemble_size=16"),  # no momentum
    "vogn": (),  # the config as it is
    "noisy_kfac": ("optim.name=noisy_kfac", "optim.lr=0.05", "bayes.tempering=0.01", "kfac.damping=0.003",
                   "kfac.kl_clip=0.001"),
    "ivon": ("optim.name=ivon", "optim.lr=0.5", "bayes.init_precision=0.1"),
}
COLUMNS = ("accuracy", "nll", "ece", "ood_auroc", "epoch_time_ratio")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"uncertainty: {what} failed (exit {proc.returncode})")


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Train and evaluate one (method, seed); a finished run (eval.json present) is reused with --reuse."""
    name = f"{method}-seed{seed}"
    run_dir = Path(args.out) / name
    launcher = [sys.executable, "-m", "app", "launch", *shlex.split(args.mpirun), "-np", "2", sys.executable, "-m",
                "app"]
    if not (args.reuse and (run_dir / "eval.json").exists()):
        shutil.rmtree(run_dir, ignore_errors=True)
        sets = [*METHODS[method], f"train.seed={seed}", f"train.epochs={args.epochs}", f"output.dir={args.out}",
                f"output.name={name}", "output.tensorboard=false", "output.progress=lines", "train.val_every=0"]
        _run([*launcher, "train", "--config", str(CONFIG), *[a for s in sets for a in ("--set", s)]],
             f"training {name}")
        _run([*launcher, "evaluate", "--run", str(run_dir), "--samples", str(args.samples), "--ood", args.ood],
             f"evaluating {name}")
    report = json.loads((run_dir / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"method": method, "seed": seed, **{k: report[k] for k in ("accuracy", "nll", "brier", "ece", "ood_auroc",
                                                                     "ood_aupr", "ood_fpr95", "samples")},
           "epoch_s": summary["time_s"] / summary["epochs"], "roc": report["roc"]["max_prob"], "run_dir": str(run_dir)}
    print(f"{name}: acc {row['accuracy']:.4f} nll {row['nll']:.4f} ece {row['ece']:.4f} auroc {row['ood_auroc']:.4f} "
          f"epoch {row['epoch_s']:.1f} s", flush=True)
    return row


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds; the epoch-time ratio is per seed against SGD's."""
    sgd = {r["seed"]: r["epoch_s"] for r in rows if r["method"] == "sgd"}
    table = []
    for method in methods:
        mine = [dict(r, epoch_time_ratio=r["epoch_s"] / sgd[r["seed"]]) for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"method": method, "seeds": len(mine)}
        for col in COLUMNS:
            values = [r[col] for r in mine]
            entry[col] = statistics.fmean(values)
            entry[f"{col}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: Sequence[dict[str, Any]]) -> str:
    head = "| method | accuracy | NLL | ECE | OOD AUROC | epoch time / SGD |\n|---|---|---|---|---|---|"
    lines = [f"| {t['method']} | " + " | ".join(f"{t[c]:.4f} ± {t[c + '_sd']:.4f}" if c != "epoch_time_ratio"
                                               else f"{t[c]:.2f}x" for c in COLUMNS) + " |" for t in table]
    return "\n".join([head, *lines])


def plot(path: Path, rows: Sequence[dict[str, Any]], methods: Sequence[str], ood: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 5))
    for method in methods:
        curves = [r["roc"] for r in rows if r["method"] == method]
        tpr = np.mean([c["tpr"] for c in curves], axis=0)
        auc = statistics.fmean(r["ood_auroc"] for r in rows if r["method"] == method)
        ax.plot(curves[0]["fpr"], tpr, label=f"{method} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set(xlabel="false positive rate (OOD accepted)", ylabel="true positive rate (MNIST accepted)",
           title=f"OOD detection, MNIST-5k vs {ood}, max probability")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _methods(text: str) -> list[str]:
    chosen = [m for m in text.split(",") if m]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or "sgd" not in chosen:
        raise argparse.ArgumentTypeError(f"methods: {', '.join(unknown) or 'sgd missing'} (known: {', '.join(METHODS)};"
                                         f" sgd is the time reference)")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/uncertainty", help="parent folder of the runs and the results")
    parser.add_argument("--seeds", default="1,2,3", type=lambda t: [int(s) for s in t.split(",") if s])
    parser.add_argument("--methods", default=",".join(METHODS), type=_methods)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=16, help="posterior samples of spngd evaluate")
    parser.add_argument("--ood", default="rotated", help="OOD set of spngd evaluate (rotated: MNIST turned 90 "
                        "degrees; sklearn's digits resized to 28 px are blurred digits a net is sure of)")
    parser.add_argument("--mpirun", default="mpirun --oversubscribe --bind-to none", help="launcher command")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already have eval.json")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, m, s) for s in args.seeds for m in args.methods]
    table = summarise(rows, args.methods)
    text = markdown(table)
    print(text)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "command": " ".join(sys.argv), "seeds": args.seeds, "epochs": args.epochs, "samples": args.samples,
            "ood": args.ood}
    (Path(args.out) / "uncertainty.json").write_text(json.dumps({"meta": meta, "table": table, "runs": rows}, indent=1))
    (Path(args.out) / "uncertainty.md").write_text(text + "\n")
    plot(Path(args.out) / "roc.png", rows, args.methods, args.ood)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
