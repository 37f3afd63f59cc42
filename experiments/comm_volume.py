"""Table 1 of the adaptive-interval paper, in shape, at small scale: K-FAC factor traffic and accuracy
per adaptive-interval threshold lambda.

For every lambda and seed this launches ``mpirun -np NP spngd train`` (K-FAC, ``kfac.adaptive_lambda``
set; ``none`` = 0, refresh every step), reads the FINAL line (validation top-1) and the last
``kfac_bytes_total`` of metrics.csv: the factor bytes each rank handed to the reduce-scatter over
the run (the same on every rank). It writes, under ``--out``:

* ``runs.csv``: one row per run;
* ``comm_volume.csv``: one row per lambda: mean top-1 over the seeds, factor bytes per rank, and
  their share of the lambda=none volume;
* ``comm_volume.png``: both against lambda.

Example (the bundled MNIST-5k, 4 ranks; run as root? export OMPI_ALLOW_RUN_AS_ROOT=1 and
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, as the Makefile does)::

    python experiments/comm_volume.py --config configs/demo.yaml --np 4 --seeds 1,2 \\
        --set model.arch=cifar_resnet8 --set train.epochs=2
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.metrics import parse_final_line  # noqa: E402

FIELDS = ("lambda", "top1_mean_pct", "top1_per_seed_pct", "factor_bytes_per_rank", "share_of_none_pct",
          "inverse_bytes_per_rank", "wall_s")


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


def last_train_row(metrics: Path) -> dict[str, str]:
    rows = [r for r in csv.DictReader(metrics.open()) if r["kind"] == "train"]
    if not rows:
        raise SystemExit(f"comm_volume: no training rows in {metrics}")
    return rows[-1]


def run_one(args: argparse.Namespace, lam: float, seed: int) -> dict[str, float | str]:
    name = f"lambda-{label(lam)}-seed{seed}"
    cmd = [*shlex.split(args.mpirun), "-np", str(args.np), sys.executable, "-m", "app", "train",
           "--config", args.config, "--set", "optim.preconditioner=kfac",
           "--set", f"kfac.adaptive_lambda={lam}", "--set", f"train.seed={seed}",
           "--set", f"output.dir={args.out}", "--set", f"output.name={name}",
           "--set", "output.tensorboard=false", "--set", "output.progress=lines",
           *[a for s in args.overrides for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    finals = [line for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    if proc.returncode != 0 or not finals:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"comm_volume: run {name} failed (exit {proc.returncode})")
    final = parse_final_line(finals[-1])
    row = last_train_row(Path(str(final["run_dir"])) / "metrics.csv")
    out: dict[str, float | str] = {"lambda": label(lam), "seed": seed, "top1_pct": 100 * float(final["val_top1"]),
                                   "factor_bytes_per_rank": float(row["kfac_bytes_total"]),
                                   "inverse_bytes_per_rank": float(row["kfac_share_bytes_total"]),
                                   "interval_mean": float(row["kfac_interval_mean"]), "wall_s": round(wall, 1),
                                   "run_dir": str(final["run_dir"])}
    print(f"{name}: top-1 {out['top1_pct']:.2f} %, factor bytes/rank {out['factor_bytes_per_rank']:.4g}, "
          f"mean interval {out['interval_mean']:.2f}, {wall:.0f} s", flush=True)
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
                      "wall_s": round(sum(float(r["wall_s"]) for r in mine), 1)})
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
    args = parser.parse_args(argv)
    lambdas = parse_lambdas(args.lambdas)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args, lam, seed) for lam in lambdas for seed in seeds]
    write_csv(out / "runs.csv", runs, ("lambda", "seed", "top1_pct", "factor_bytes_per_rank",
                                       "inverse_bytes_per_rank", "interval_mean", "wall_s", "run_dir"))
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
