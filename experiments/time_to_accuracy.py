"""Steps and wall time to a training-accuracy target on the bundled data: SGD vs K-FAC.

The recipe (shared with ``tests/test_convergence.py``, which imports ``steps_to_target`` and the
constants from here): the real training path (``Trainer.steps``: the bundled MNIST-5k JPEGs through
the torch loader, one process, one thread), cifar_resnet8 with zero-initialised residual BN gammas,
batch 256, 0.2-epoch linear warm-up then polynomial (power 2) decay over ``--max-steps``, crop
augmentation off (``min_crop_area=1``: the measure is how fast each optimiser fits the training set).
"Training accuracy" is the mean batch accuracy over the last 5 steps (1,280 images). ``train.seed``
sets both the initial weights and the data order.

Contenders, every seed:

* SGD (Nesterov 0.9, weight decay 5e-4) at every lr of its grid; the best lr per seed is reported;
* K-FAC (emp Fisher, damping 1e-3, KL clip 1e-3, lr 0.2) refreshing factors and inverses every
  step, at fixed intervals 10/100, and with adaptive intervals (lambda 0.25).

Wall time is measured around the training steps only (from the first batch request to the step
that reaches the target); building the model and loaders is excluded. Step counts do not depend on
the machine's load; wall times do. Usage (the README's table)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/time_to_accuracy.py --out runs/time_to_accuracy.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from app import config, launch
from app.train import Trainer

TARGET, WINDOW, SCHEDULE_STEPS = 0.97, 5, 100
SGD_LRS = (0.4, 0.8, 1.6, 3.2)
KFAC_LR = 0.2
SEEDS = (1, 2, 3)

RECIPE = (
    "data.backend=torch", "data.path=", "data.bundled=mnist5k", "data.image_size=28", "data.val_resize=28",
    "data.min_crop_area=1.0", "data.random_mirror=false", "data.batch_size=256", "data.workers=0",
    "model.arch=cifar_resnet8", "model.zero_init_residual=true", "model.channels_last=false",
    "optim.name=sgd", "optim.base_batch=0", "optim.momentum=0.9", "optim.nesterov=true",
    "optim.weight_decay=5.0e-4", "optim.warmup_epochs=0.2", "optim.schedule=poly", "optim.power=2.0",
    "optim.end_lr=0.0", "optim.label_smoothing=0.0", "optim.grad_accum=1",
    "train.epochs=1000", "train.precision=fp32", "train.device=cpu", "train.dtype=float32",
    "output.tensorboard=false", "output.plot=false")
"""Every key the outcome depends on, explicit: later changes of defaults or of the demo config do
not move the benchmark or the test."""

KFAC = ("optim.preconditioner=kfac", "kfac.fisher=emp", "kfac.damping=0.001", "kfac.kl_clip=0.001",
        "kfac.stat_decay=0.95", "kfac.inverse=cholesky", "kfac.batchnorm=true", "kfac.skip=[]")
"""K-FAC's settings, explicit for the same reason; the variants below add the refresh intervals."""

KFAC_VARIANTS: dict[str, tuple[str, ...]] = {
    "K-FAC every step": ("kfac.factor_interval=1", "kfac.inverse_interval=1", "kfac.adaptive_lambda=0"),
    "K-FAC fixed 10/100": ("kfac.factor_interval=10", "kfac.inverse_interval=100", "kfac.adaptive_lambda=0"),
    "K-FAC adaptive 0.25": ("kfac.factor_interval=1", "kfac.inverse_interval=1", "kfac.adaptive_lambda=0.25"),
}


class Reached(NamedTuple):
    """Outcome of one run: the step that reached the target (None: not within the cap) and the
    seconds spent in training steps until then (or until the cap)."""

    steps: int | None
    seconds: float


def overrides(seed: int, lr: float, kfac: Sequence[str] = (), schedule_steps: int = SCHEDULE_STEPS) -> list[str]:
    """The full recipe for one run; ``kfac`` empty = plain SGD."""
    return [*RECIPE, *(list(KFAC) + list(kfac) if kfac else ["optim.preconditioner=none"]),
            f"optim.lr={lr}", f"train.seed={seed}", f"train.max_steps={schedule_steps}"]


def steps_to_target(settings: Sequence[str], cap: int, out_dir: Path, target: float = TARGET) -> Reached:
    """Train with ``settings`` (``--set`` strings) until the mean accuracy of the last WINDOW steps
    reaches ``target``, or for at most ``cap`` steps; one process, in this interpreter."""
    cfg = config.load(None, [*settings, f"output.dir={out_dir}"])
    world = launch.discover()
    device = torch.device("cpu")
    comm = launch.init_comm(world, cfg.comm, device)
    try:
        trainer = Trainer(cfg, world, comm, device)
        recent: deque[float] = deque(maxlen=WINDOW)
        start = time.perf_counter()
        for _, acc, _ in trainer.steps():
            recent.append(acc.item())
            if len(recent) == WINDOW and sum(recent) / WINDOW >= target:
                return Reached(trainer.pos.step, time.perf_counter() - start)
            if trainer.pos.step >= cap:
                break
        return Reached(None, time.perf_counter() - start)
    finally:
        comm.shutdown()


def cpu_model() -> str:
    """lscpu's "Model name" (the platform's processor string where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} must be comma-separated integers") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} must be integers >= 0")
    return seeds


def _parse_target(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--target {text} must be in (0, 1]")
    return value


def _parse_steps(text: str) -> int:
    value = int(text)
    if value < WINDOW:
        raise argparse.ArgumentTypeError(f"--max-steps {text} must be >= {WINDOW} (the accuracy window)")
    return value


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in text.split(","))
    if not methods or not set(methods) <= {"sgd", "kfac"}:
        raise argparse.ArgumentTypeError(f"--methods {text!r} must be sgd, kfac or sgd,kfac")
    return methods


def run_all(seeds: Sequence[int], target: float, max_steps: int, sgd_lrs: Sequence[float],
            out_dir: Path, methods: Sequence[str] = ("sgd", "kfac")) -> list[dict[str, object]]:
    """One row per run: method, seed, lr, steps (None = not reached within its cap), seconds.

    Only SGD's best lr per seed is reported, so each SGD run stops at the fewest steps another lr
    of the same seed needed (a run that has not reached the target by then cannot be the best);
    the previous seed's best lr runs first (the grid's middle for the first seed)."""
    rows: list[dict[str, object]] = []

    def record(method: str, seed: int, lr: float, reached: Reached) -> None:
        rows.append({"method": method, "seed": seed, "lr": lr, "steps": reached.steps,
                     "seconds": round(reached.seconds, 2)})
        outcome = f"reached in {reached.steps} steps" if reached.steps is not None else "not reached"
        print(f"# seed {seed} {method} lr={lr}: {outcome} ({reached.seconds:.1f} s)", file=sys.stderr, flush=True)

    first = sgd_lrs[len(sgd_lrs) // 2]
    for seed in seeds:
        best: int | None = None
        for lr in sorted(sgd_lrs, key=lambda x: x != first) if "sgd" in methods else ():
            reached = steps_to_target(overrides(seed, lr, schedule_steps=max_steps), best or max_steps, out_dir,
                                      target)
            record("SGD", seed, lr, reached)
            if reached.steps is not None and (best is None or reached.steps < best):
                best, first = reached.steps, lr
        for name, kfac in KFAC_VARIANTS.items() if "kfac" in methods else ():
            record(name, seed, KFAC_LR, steps_to_target(overrides(seed, KFAC_LR, kfac, max_steps), max_steps,
                                                        out_dir, target))
    return rows


def summarise(rows: Sequence[dict[str, object]], max_steps: int) -> list[dict[str, str]]:
    """Per method: the best run of each seed (fewest steps; SGD's best lr), and the medians over
    seeds; a seed that never reached the target counts as ``> max_steps`` (and as max_steps + 1 in
    the median, which is then a lower bound, written with ``>``)."""
    table: list[dict[str, str]] = []
    for method in dict.fromkeys(str(r["method"]) for r in rows):
        best: list[dict[str, object]] = []
        ours = [r for r in rows if r["method"] == method]
        for seed in dict.fromkeys(r["seed"] for r in ours):
            mine = [r for r in ours if r["seed"] == seed]
            hit = [r for r in mine if r["steps"] is not None]
            best.append(min(hit, key=lambda r: (int(str(r["steps"])), float(str(r["seconds"])))) if hit
                        else {**mine[0], "lr": "-"})
        steps = [int(str(b["steps"])) if b["steps"] is not None else max_steps + 1 for b in best]
        secs = [float(str(b["seconds"])) for b in best if b["steps"] is not None]
        median = statistics.median(steps)
        table.append({
            "method": method,
            "median_steps": f"> {max_steps}" if median > max_steps else f"{median:g}",
            "median_seconds": f"{statistics.median(secs):.1f}" if len(secs) == len(best) else "-",
            "per_seed": "; ".join(f"seed {b['seed']}: " + (
                f"{b['steps']} steps, {float(str(b['seconds'])):.1f} s, lr {b['lr']}" if b["steps"] is not None
                else f"> {max_steps} steps") for b in best)})
    return table


def markdown(table: Sequence[dict[str, str]], header: str) -> str:
    lines = [header, "", "| method | median steps | median s | per seed (steps, s, lr) |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['median_steps']} | {r['median_seconds']} | {r['per_seed']} |" for r in table]
    return "\n".join(lines)


def merged(paths: Sequence[Path], target: float, max_steps: int) -> tuple[list[dict[str, object]], str]:
    """The runs of earlier ``--out`` JSON files (e.g. one process per seed on a many-core machine)
    and where and when they ran; every file must have the same target and step cap."""
    rows: list[dict[str, object]] = []
    where: list[str] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"time_to_accuracy: cannot read {path}: {exc}") from None
        if (data.get("target", target), data.get("max_steps", max_steps)) != (target, max_steps):
            raise SystemExit(f"time_to_accuracy: {path} has target {data.get('target')} and max steps "
                             f"{data.get('max_steps')}, not {target} and {max_steps}")
        rows += data["runs"]
        where.append(str(data["header"]).split("; ", 1)[1])
    return rows, " / ".join(dict.fromkeys(where))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_parse_seeds, default=SEEDS, help="comma-separated (default 1,2,3)")
    parser.add_argument("--target", type=_parse_target, default=TARGET, help="windowed train accuracy (0.97)")
    parser.add_argument("--max-steps", type=_parse_steps, default=SCHEDULE_STEPS,
                        help="schedule length and cap of every run (100)")
    parser.add_argument("--sgd-lrs", type=lambda t: tuple(float(x) for x in t.split(",")), default=SGD_LRS,
                        help="SGD's lr grid (0.4,0.8,1.6,3.2)")
    parser.add_argument("--out", type=Path, help="write the runs and the table here (.json, or .csv for the runs)")
    parser.add_argument("--quick", action="store_true", help="one seed (the first), for a smoke check")
    parser.add_argument("--methods", type=_parse_methods, default=("sgd", "kfac"),
                        help="sgd, kfac (its three variants) or both (default): to split seeds and methods "
                             "over processes, then --merge")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="tabulate the runs of earlier --out JSON files instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        rows, where = merged(args.merge, args.target, args.max_steps)
    else:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
            rows = run_all(args.seeds[:1] if args.quick else args.seeds, args.target, args.max_steps, args.sgd_lrs,
                           Path(tmp), args.methods)
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        where = f"{cpu_model()}, torch threads {torch.get_num_threads()}, {when}"
    table = summarise(rows, args.max_steps)
    seeds = ",".join(str(s) for s in dict.fromkeys(r["seed"] for r in rows))
    header = (f"Steps and training seconds to {args.target:g} windowed train accuracy ({WINDOW} steps), "
              f"max {args.max_steps} steps, seeds {seeds}; {where}")
    print(markdown(table, header))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".csv":
            with args.out.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["method", "seed", "lr", "steps", "seconds"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            args.out.write_text(json.dumps({"header": header, "target": args.target, "max_steps": args.max_steps,
                                            "runs": rows, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
