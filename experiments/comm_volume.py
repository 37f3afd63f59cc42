"""Table 1 of the adaptive-interval paper, in shape, at small scale: K-FAC factor traffic and accuracy
per adaptive-interval threshold lambda.

For every lambda and seed this launches ``mpirun -np NP spngd train`` (K-FAC, ``kfac.adaptive_lambda``
set; ``none`` = 0, refresh every step) and reads the run's metrics.csv: the end-of-run validation
top-1 and the last ``kfac_bytes_total``, the factor bytes each rank handed to the reduce-scatter
over the run (the same on every rank). ``--reuse`` takes runs already finished under ``--out``
instead of repeating them (to add a lambda, or to go on after an interruption). It writes, under
``--out``:

* ``runs.csv``: one row per run;
* ``comm_volume.csv``: one row per lambda: mean top-1 over the seeds, factor bytes per rank, and
  their share of the lambda=none volume;
* ``comm_volume.png``: both against lambda.

The README's table (the bundled MNIST-5k, 4 ranks, batch 512, exact Fisher, 30 epochs; run as
root? export OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, as the Makefile
does)::

    python experiments/comm_volume.py --np 4 --lambdas none,0.2,0.25,0.3,0.4 --seeds 1,2 \\
        --set model.arch=cifar_resnet8 --set train.epochs=30 --set data.workers=0 \\
        --set data.batch_size=128 --set optim.base_batch=128 --set kfac.fisher=exact \\
        --set kfac.kl_clip=0.001 --set kfac.damping=0.003 --set train.val_every=0
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


FIELDS = ("lambda", "top1_mean_pct", "top1_per_seed_pct", "factor_bytes_per_rank", "share_of_none_pct",
          "inverse_bytes_per_rank", "train_s")


def parse_lambdas(text: str) -> list[float]:
    """``none,0.2`` -> [0.0, 0.2]; ``none`` (or 0) is K-FAC refreshing every step."""
    out = []
    for item in text.split(","):
        value = 0.0 if item.strip().lower() == "none" else float(item)
        if value < 0:
            raise SystemExit(f"comm_volume: lambda {item!r} must be 'none' or >= 0")
        out.append(value)
    return out


def label(lam: float) -> str:
    return "none" if lam == 0 else f"{lam:g}"


def finished(run_dir: Path) -> dict[str, dict[str, str]] | None:
    """The last training row and the end-of-run validation row of a completed run, else None."""
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        return None
    rows = list(csv.DictReader(metrics.open()))
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    if not train or not val or val[-1]["step"] != train[-1]["step"]:
        return None
    return {"train": train[-1], "val": val[-1]}


def run_one(args: argparse.Namespace, lam: float, seed: int) -> dict[str, float | str]:
    name = f"lambda-{label(lam)}-seed{seed}"
    run_dir = Path(args.out) / name
    done = finished(run_dir) if args.reuse else None
    proc = None
    if done is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not appended to a stale one
        cmd = [*shlex.split(args.mpirun), "-np", str(args.np), sys.executable, "-m", "app", "train",
               "--config", args.config, "--set", "optim.preconditioner=kfac",
               "--set", f"kfac.adaptive_lambda={lam}", "--set", f"train.seed={seed}",
               "--set", f"output.dir={args.out}", "--set", f"output.name={name}",
               "--set", "output.tensorboard=false", "--set", "output.progress=lines",
               *[a for s in args.overrides for a in ("--set", s)]]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        done = finished(run_dir)
        if proc.returncode != 0 or done is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"comm_volume: run {name} failed (exit {proc.returncode})")
    row = done["train"]
    out: dict[str, float | str] = {"lambda": label(lam), "seed": seed, "top1_pct": 100 * float(done["val"]["top1"]),
                                   "factor_bytes_per_rank": float(row["kfac_bytes_total"]),
                                   "inverse_bytes_per_rank": float(row["kfac_share_bytes_total"]),
                                   "interval_mean": float(row["kfac_interval_mean"]),
                                   "train_s": float(done["val"]["time_s"]), "run_dir": str(run_dir)}
    print(f"{name}: top-1 {out['top1_pct']:.2f} %, factor bytes/rank {out['factor_bytes_per_rank']:.4g}, "
          f"mean interval {out['interval_mean']:.2f}, {out['train_s']:.0f} s"
          f"{' (reused)' if proc is None else ''}", flush=True)
    return out


def summarise(runs: list[dict[str, float | str]], lambdas: list[float]) -> list[dict[str, float | str]]:
    table = []
    for lam in lambdas:
        mine = [r for r in runs if r["lambda"] == label(lam)]
        table.append({"lambda": label(lam),
                      "top1_mean_pct": round(statistics.mean(float(r["top1_pct"]) for r in mine), 2),
                      "top1_per_seed_pct": ";".join(f"{float(r['top1_pct']):.2f}" for r in mine),
                      "factor_bytes_per_rank": statistics.mean(float(r["factor_bytes_per_rank"]) for r in mine),
                      "inverse_bytes_per_rank": statistics.mean(float(r["inverse_bytes_per_rank"]) for r in mine),
                      "train_s": round(sum(float(r["train_s"]) for r in mine), 1)})
    none = next((float(r["factor_bytes_per_rank"]) for r in table if r["lambda"] == "none"), None)
    for r in table:
        r["share_of_none_pct"] = round(100 * float(r["factor_bytes_per_rank"]) / none, 1) if none else ""
    return table


def write_csv(path: Path, rows: list[dict[str, float | str]], fields: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, table: list[dict[str, float | str]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["lambda"]) for r in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    shares = [float(r["share_of_none_pct"] or 0) for r in table]
    left.bar(labels, shares, color="tab:blue")
    for x, s in enumerate(shares):
        left.text(x, s, f"{s:.1f}%", ha="center", va="bottom")
    left.set(xlabel="lambda", ylabel="factor bytes per rank (% of none)", title="K-FAC factor traffic")
    right.plot(labels, [float(r["top1_mean_pct"]) for r in table], "o-", color="tab:green", label="mean")
    for x, r in enumerate(table):
        seeds = [float(v) for v in str(r["top1_per_seed_pct"]).split(";")]
        right.plot([x] * len(seeds), seeds, "x", color="gray", label="seeds" if x == 0 else None)
    right.set(xlabel="lambda", ylabel="validation top-1 (%)", title="accuracy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="training YAML")
    parser.add_argument("--np", type=int, default=4, help="ranks per run (default 4)")
    parser.add_argument("--lambdas", default="none,0.2,0.25,0.3", help="thresholds; none = every step")
    parser.add_argument("--seeds", default="1,2", help="train.seed values; top-1 is their mean")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--mpirun", default="mpirun --oversubscribe --bind-to none", help="launcher command")
    parser.add_argument("--out", default=str(REPO / "runs" / "comm_volume"), help="output folder")
    parser.add_argument("--reuse", action="store_true",
                        help="take finished runs already under --out (same names) instead of re-running them; "
                             "only meaningful with the same settings")
    args = parser.parse_args(argv)
    lambdas = parse_lambdas(args.lambdas)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args, lam, seed) for lam in lambdas for seed in seeds]
    write_csv(out / "runs.csv", runs, ("lambda", "seed", "top1_pct", "factor_bytes_per_rank",
                                       "inverse_bytes_per_rank", "interval_mean", "train_s", "run_dir"))
    table = summarise(runs, lambdas)
    write_csv(out / "comm_volume.csv", table, FIELDS)
    plot(out / "comm_volume.png", table)
    print(f"{'lambda':>7} {'top-1 %':>8} {'bytes/rank':>12} {'% of none':>10}")
    for r in table:
        print(f"{r['lambda']:>7} {float(r['top1_mean_pct']):>8.2f} {float(r['factor_bytes_per_rank']):>12.4g} "
              f"{r['share_of_none_pct']:>10}")
    print(f"wrote {out / 'comm_volume.csv'} and {out / 'comm_volume.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
