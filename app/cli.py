"""The ``spngd`` command: the only module that parses arguments and prints to the user.

The layers below take typed arguments and return data (``app.bench``, ``app.submit``,
``app.kfac.placement``, ``app.comm.bench``); this module turns parsed options into those arguments
and the results into text. Errors a user can fix (``app.errors.UserError``: bad config, missing
data, bad launcher environment) print ONE line, on rank 0 only since every rank sees the same
input, and exit 2. Anything else is a failure of one rank: it prints its error once and brings the
whole job down (``launch.abort_on_error``), so no rank waits in a collective for a peer that is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from app import config as config_mod
from app.errors import USAGE_EXIT, Diverged, UserError

if TYPE_CHECKING:
    import torch
    from _typeshed import DataclassInstance

    from app.comm import Comm
    from app.launch import World

    Options = TypeVar("Options", bound=DataclassInstance)


def fill(cls: type[Options], args: argparse.Namespace) -> Options:
    """The typed options ``cls`` (a dataclass) from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _options_epilog() -> str:
    rows = config_mod.describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["configuration keys (set in YAML or with --set key=value):"]
    lines += [f"  {k:<{width}}  {h} (default: {d!r})" for k, d, h in rows]
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML", help="YAML configuration (see configs/)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spngd", description="Distributed second-order (K-FAC / SP-NGD) training of ResNets. "
        "Launch with mpirun, srun or qsub; every rank runs the same command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a model (one process per GPU)",
        description="Train with data-parallel SGD/LARS/Adam or K-FAC. Example: "
        "mpirun -np 4 spngd train --config configs/demo.yaml --set optim.lr=0.2",
        epilog=_options_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(train)
    train.add_argument("--resume", metavar="auto|PATH",
                       help="resume from the newest complete checkpoint of the run (auto) or a file "
                       "(same as --set checkpoint.resume=...)")
    train.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       help="rank-0 log level (other ranks log warnings and errors only)")
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser(
        "launch", help="run mpirun/srun so that SIGTERM (scancel, qdel, preemption, kill) checkpoints the run",
        description="Run a launcher command with SIGTERM kept from it: Open MPI's mpirun kills the ranks 0.5 s "
        "after a TERM, before a checkpoint can be written. Each TERM (and USR2, Grid Engine's -notify) this "
        "process receives is passed on as USR1, so every rank checkpoints and the job exits with 85; USR1, INT "
        "and HUP are passed on unchanged. Exits with the launcher's status. Example: spngd launch mpirun -np 2 "
        "spngd train --config configs/demo.yaml")
    launch.add_argument("launcher", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                        help="the launcher and its arguments")
    launch.set_defaults(func=_cmd_launch)

    check = sub.add_parser(
        "check", help="finite-difference check of the configured model's gradients",
        description="Compares autograd gradients of the configured model with central finite "
        "differences in float64 on a small random batch (images of at most 64 px) and prints the "
        "maximum relative error per parameter tensor (the disagreement beyond the difference's float64 "
        "round-off; 0 = none). Coordinates whose +/- step crosses a ReLU or "
        "max-pool kink (where a difference mixes two slopes) are retried at smaller steps, then "
        "skipped and counted; a tensor left with no checkable coordinate is named as unchecked.")
    _add_config_args(check)
    check.add_argument("--batch", type=int, default=2, help="examples in the probe batch (default 2)")
    check.add_argument("--tolerance", type=float, default=1e-5,
                       help="fail (exit 1) when any relative error exceeds this (default 1e-5)")
    check.set_defaults(func=_cmd_check)

    submit = sub.add_parser(
        "submit", help="render a cluster job script from a system profile and submit it",
        description="Render jobscripts/<scheduler>.sh.tmpl for a system profile (jobscripts/systems/), write it "
        "next to the run's outputs and submit it with sbatch/qsub; prints the job id. Example: spngd submit "
        "--system abci3 --nodes 4 --group gxx00000 --config configs/imagenet_resnet50_sgd_bs8k.yaml")
    _add_config_args(submit)
    submit.add_argument("--system", required=True, metavar="NAME|FILE.yaml",
                        help="system profile: abci3, abci2-v100, tsubame4, tsubame3, slurm-v100, ... or a path")
    submit.add_argument("--nodes", required=True, type=int, metavar="N", help="whole nodes to use")
    submit.add_argument("--walltime", metavar="HH:MM:SS", help="time limit (default: the profile's)")
    submit.add_argument("--group", metavar="G", help="accounting group (ABCI/TSUBAME group, SLURM account)")
    submit.add_argument("--sweep", metavar="YAML", help="random search: one array job, one trial per index "
                        "(see configs/sweeps/demo_lr.yaml)")
    submit.add_argument("--trials", type=int, metavar="K", help="number of sweep trials (default: the sweep file's)")
    submit.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    submit.set_defaults(func=_cmd_submit)

    report = sub.add_parser(
        "sweep-report", help="rank the trials of a sweep by their FINAL lines",
        description="Reads DIR/sweep.yaml and the FINAL lines in DIR/logs/, writes DIR/report.csv and prints "
        "the trials ranked by the sweep's metric.")
    report.add_argument("dir", metavar="DIR", help="the sweep directory that `spngd submit --sweep` printed")
    report.add_argument("--metric", help="FINAL-line field to rank by (default: the sweep file's metric)")
    report.set_defaults(func=_cmd_sweep_report)

    placement = sub.add_parser(
        "placement", help="balance of K-FAC layer ownership over rank counts (no GPU, no data)",
        description="Assign a model's K-FAC layers to owner ranks with the same cost model and greedy LPT "
        "as training, and print per rank count the owners' cost max/mean, its lower bound (one indivisible "
        "layer may exceed the mean) and the owned factor memory. Example: spngd placement --model resnet50 "
        "--ranks 4,8,64,128,1024")
    placement.add_argument("--model", default="resnet50", help="model.arch (default resnet50)")
    placement.add_argument("--ranks", default="4,8,64,128,1024", metavar="LIST", help="rank counts (default "
                           "4,8,64,128,1024)")
    placement.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    placement.add_argument("--share", default="inverses", choices=("inverses", "gradients"),
                           help="kfac.share: with gradients, owners also precondition every step (default inverses)")
    placement.set_defaults(func=_cmd_placement)

    plan = sub.add_parser(
        "plan", help="K-FAC memory and bytes per rank at any rank count (no GPU, no ranks, no data)",
        description="Plan a model's K-FAC exchange at each rank count with the code the run uses (placement, "
        "factor buckets, allgather layout, per-collective traffic) and print, per rank count and kfac.share, the "
        "max and mean over the ranks of K-FAC memory (running factors, inverses, the step's statistics, exchange "
        "and allgather buffers; no caches are kept) and of the bytes each rank's collectives send and receive on a "
        "refresh-all step and on a plain step (torch backend). recv buffer = bytes written into the receive "
        "buffers a rank allocates; recv data = the real parts among them. Example: spngd plan --model resnet50 "
        "--ranks 64,256,1024 --config configs/imagenet_resnet50_kfac_bs32k.yaml --json")
    _add_config_args(plan)
    plan.add_argument("--model", metavar="ARCH", help="model.arch (default: the config's, resnet50)")
    plan.add_argument("--ranks", default="64,256,1024", metavar="LIST", help="rank counts (default 64,256,1024)")
    plan.add_argument("--num-classes", type=int, metavar="N",
                      help="classifier outputs (default: the config's model.num_classes, else 1000)")
    plan.add_argument("--share", default="inverses,gradients", metavar="LIST",
                      help="kfac.share values to plan (default inverses,gradients)")
    plan.add_argument("--per-rank", action="store_true", help="also give every rank's figures")
    plan.add_argument("--json", action="store_true", help='print {"model", "rows": [...]} as JSON instead')
    plan.set_defaults(func=_cmd_plan)

    bench = sub.add_parser(
        "bench", help="time SGD vs K-FAC training steps on synthetic data (ms/step, img/s, memory, phases)",
        description="Measure every case of the cross product of the comma-separated lists on one device: "
        "mean ms/step (synchronised only around the timed window), img/s, peak memory and a per-phase "
        "breakdown from a separate synchronised pass; prints a table and writes JSON rows with each K-FAC "
        "row's ratio to the SGD row of the same batch, precision and layout. --config/--set supply "
        "everything the bench options do not (e.g. --set kfac.inverse=eigen); optim.lr defaults to 1e-5, as timing "
        "does not depend on it and a real lr diverges on the repeated random batch. Example: spngd bench --model "
        "resnet50 --batch 32,128 --precision fp32,bf16 --channels-last on,off --optim sgd,kfac "
        "--factor-interval 1,10 --inverse-interval 1,100 --out results.json")
    _add_config_args(bench)
    bench.add_argument("--model", default="resnet50", metavar="LIST", help="model.arch values (default resnet50)")
    bench.add_argument("--batch", default="32", metavar="LIST", help="images per step (default 32)")
    bench.add_argument("--precision", default="fp32", metavar="LIST", help="fp32, bf16, fp16 autocast (default fp32)")
    bench.add_argument("--channels-last", default="off", metavar="LIST", help="on and/or off (default off)")
    bench.add_argument("--optim", default="sgd,kfac", metavar="LIST",
                       help="sgd (optim.name without preconditioner), kfac, adam, vogn, noisy_kfac (default "
                       "sgd,kfac); each row's ratio_to_sgd is against the sgd row of the same case")
    bench.add_argument("--factor-interval", default="1", metavar="LIST", help="K-FAC factor intervals (default 1)")
    bench.add_argument("--inverse-interval", default="1", metavar="LIST",
                       help="K-FAC inverse intervals (default 1); pairs that are not a multiple of the factor "
                       "interval are skipped")
    bench.add_argument("--steps", type=int, default=100, help="timed steps, at least (default 100)")
    bench.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    bench.add_argument("--image-size", type=int, default=224, help="square input size (default 224)")
    bench.add_argument("--classes", type=int, default=1000, help="synthetic classes (default 1000)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto = the first GPU if there is one, else cpu")
    bench.add_argument("--out", metavar="JSON", help="also write the rows and the run's metadata here")
    bench.set_defaults(func=_cmd_bench)

    evaluate = sub.add_parser(
        "evaluate", help="posterior predictive evaluation of a run: accuracy, NLL, Brier, ECE, OOD detection",
        description="Average the softmax over S weight samples of the run's posterior (newest verified "
        "checkpoint) on its validation set and an out-of-distribution set that needs no download, and write "
        "eval.json (accuracy, nll, brier, ece with 15 bins, ood_auroc / ood_aupr / ood_fpr95 with the "
        "in-distribution images as positives, for the max-probability and entropy scores), reliability.png and "
        "roc.png into the run directory. Samples are spread over the ranks; a deterministic model uses S = 1. "
        "OOD sets: digits (scikit-learn's 8x8 digits, resized), inverted, rotated (the validation images "
        "inverted / turned 90 degrees), noise (uniform noise). Example: mpirun -np 2 spngd evaluate --run "
        "runs/bayes_vogn_demo --samples 16 --ood digits")
    evaluate.add_argument("--run", required=True, metavar="DIR", help="the run directory spngd train wrote")
    evaluate.add_argument("--samples", metavar="S", help="weight samples (default: the run's bayes.eval_samples)")
    evaluate.add_argument("--ood", default="digits", metavar="NAME",
                          help="OOD set: digits, inverted, rotated or noise (default digits)")
    evaluate.add_argument("--checkpoint", metavar="PATH", help="evaluate this checkpoint instead of the newest")
    evaluate.set_defaults(func=_cmd_evaluate)

    analyze = sub.add_parser(
        "analyze", help="top eigenvalues and traces of a trained network's information matrices into SQLite",
        description="Hessian, GGN (= exact Fisher), MC Fisher, empirical Fisher and gradient covariance of the "
        "mean cross-entropy over the first --examples training images (no augmentation), each under the full, "
        "block-diagonal (per layer), K-FAC and diagonal approximations; top-k eigenvalues by dense eigh, Lanczos "
        "or the dual Gram matrix (auto: dense up to 2048 parameters per operator), traces exact or by "
        "Hutchinson. Products are spread over the ranks. One row per result in the table spectra of --db "
        "(schema: app/analysis/db.py); pairs already stored for this run, step and seed are skipped, so a "
        "killed analysis continues. Example: mpirun -np 2 spngd analyze --run runs/demo --matrices "
        "hessian,ggn,mc,emp,cov --approx full,block,kfac,diag --top-k 10 --db runs/curvature.sqlite. "
        "--plot DB draws the stored spectra over training; --measures DB ranks the generalisation measures of "
        "its models against their gap (Kendall tau and granulated Kendall, Jiang et al. 2020).")
    analyze.add_argument("--run", metavar="DIR", help="a run directory (its config and newest checkpoint)")
    analyze.add_argument("--config", metavar="FILE", help="or a config file, with --checkpoint")
    analyze.add_argument("--checkpoint", metavar="PATH", help="the checkpoint to analyse")
    analyze.add_argument("--matrices", "--matrix", default="ggn", type=_names,
                         help="comma-separated: hessian,ggn,mc,emp,cov (--measures: the one ranked)")
    analyze.add_argument("--approx", default="full", type=_names, help="comma-separated: full,block,kfac,diag")
    analyze.add_argument("--top-k", type=int, default=10, help="eigenvalues kept per result (default 10)")
    analyze.add_argument("--estimator", default="auto", help="auto, dense, lanczos or dual (default auto)")
    analyze.add_argument("--examples", type=int, default=256, help="training images analysed (default 256)")
    analyze.add_argument("--seed", type=int, default=0, help="MC labels, Lanczos start, Hutchinson probes")
    analyze.add_argument("--tolerance", type=float, default=1e-6, help="Lanczos relative tolerance")
    analyze.add_argument("--trace-samples", type=int, default=30, help="Hutchinson probes (default 30)")
    analyze.add_argument("--no-norms", dest="norms", action="store_false",
                         help="skip the snapshot measures (norms, PAC-Bayes flatness) of --measures")
    analyze.add_argument("--grid", metavar="YAML", help="the curvature study instead: train every trial of this "
                         "grid file (configs/analysis/grid.yaml) with analysis.every_epochs, all into one database "
                         "(--db, default <output.dir>/<grid name>.sqlite); finished trials are skipped")
    analyze.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="--grid: override one key of every trial's config (repeatable)")
    analyze.add_argument("--db", metavar="SQLITE", help="the database (created if absent)")
    analyze.add_argument("--plot", metavar="DB", help="instead: plot the spectra of DB over training (to --out)")
    analyze.add_argument("--out", metavar="PNG", help="--plot's file (default: <DB stem>_spectra.png beside DB)")
    analyze.add_argument("--measures", metavar="DB", help="instead: Kendall tau and granulated Kendall of every "
                         "generalisation measure in DB with the gap, for --matrix and --approx (default ggn, full)")
    analyze.add_argument("--json", action="store_true", help="--measures as JSON instead of a Markdown table")
    analyze.set_defaults(func=_cmd_analyze)

    comm_bench = sub.add_parser(
        "comm-bench", help="latency and bandwidth of every collective of the comm backend (run under mpirun)",
        description="Times one call (after warm-up) of each float32 collective of every given total size on "
        "every rank and prints the slowest rank's average, algbw and busbw (nccl-tests convention). Example: "
        "mpirun -np 4 spngd comm-bench --backend torch --sizes 4K,1M,16M --iters 5")
    comm_bench.add_argument("--backend", default="auto", choices=("auto", "torch", "horovod"))
    comm_bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    comm_bench.add_argument("--sizes", default="4K,1M,16M", type=_sizes,
                            help="comma-separated total sizes (default 4K,1M,16M)")
    comm_bench.add_argument("--iters", type=int, default=5, help="timed calls per row (default 5)")
    comm_bench.add_argument("--warmup", type=int, default=1, help="untimed calls per row (default 1)")
    comm_bench.set_defaults(func=_cmd_comm_bench)
    return parser


def _sizes(text: str) -> list[int]:
    from app.comm.bench import parse_size

    try:
        return [parse_size(x) for x in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_logging(rank: int, level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def _cmd_train(args: argparse.Namespace) -> int:
    from app import launch

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    world = launch.discover()
    _setup_logging(world.rank, args.log_level)
    cfg = config_mod.load(args.config, overrides)  # validated before any collective starts
    config_mod.check_output(cfg)
    with _ranks(world, cfg) as (device, comm):
        from app.checkpoint import DIVERGED_EXIT
        from app.train import train

        try:
            summary = train(cfg, world, comm, device)
            if comm.rank == 0:
                print("\n".join(summary.lines()), flush=True)
        except Diverged as exc:  # every rank at the same step: a clean exit, not an abort
            _report_once(comm.rank, exc)
            return DIVERGED_EXIT
    return 0


@contextlib.contextmanager
def _ranks(world: World, cfg: config_mod.Config) -> Iterator[tuple[torch.device, Comm]]:
    """This rank's device and world communicator for ``cfg`` (shut down after), inside
    ``abort_on_error``: what every SPMD command (train, evaluate) runs in."""
    from app import launch

    with launch.abort_on_error(world):
        device = launch.select_device(world, cfg.train.device)
        comm = launch.init_comm(world, cfg.comm, device)
        try:
            yield device, comm
        finally:
            comm.shutdown()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """``spngd evaluate``: one summary line per metric group on rank 0; the files are in the run directory."""
    from app import launch
    from app.bayes import evaluate

    samples = None
    if args.samples is not None:
        try:
            samples = int(args.samples)
        except ValueError:
            raise UserError(f"evaluate: --samples={args.samples!r} must be a positive integer") from None
    world = launch.discover()
    _setup_logging(world.rank, "INFO")
    job = evaluate.open_run(Path(args.run), samples, args.ood,
                            Path(args.checkpoint) if args.checkpoint else None)  # checked before any collective
    with _ranks(world, job.cfg) as (device, comm):
        r = evaluate.evaluate(job, comm, device)
        if r is not None:
            note = f" ({r['samples_note']})" if "samples_note" in r else ""
            print(f"evaluate: {job.checkpoint} (step {r['checkpoint']['step']}), {r['posterior']} posterior, "
                  f"{r['samples']} samples on {r['ranks']} ranks{note}")
            print(f"val ({r['images']['val']} images): accuracy {r['accuracy']:.4f}  nll {r['nll']:.4f}  "
                  f"brier {r['brier']:.4f}  ece {r['ece']:.4f}")
            for score in ("max_prob", "entropy"):
                d = r["ood"][score]
                print(f"ood {r['ood']['set']} ({r['images']['ood']} images), {score} score: auroc {d['auroc']:.4f}  "
                      f"aupr {d['aupr']:.4f}  fpr95 {d['fpr95']:.4f}")
            print(f"wrote {', '.join(str(job.run_dir / f) for f in evaluate.FILES)}", flush=True)
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_analyze(args: argparse.Namespace) -> int:
    """``spngd analyze``: one progress line per result on rank 0; the rows are in --db."""
    from app import launch
    from app.analysis import analyze

    if (args.plot or args.measures) and args.grid:
        raise UserError("analyze: --grid trains runs; --plot and --measures read a database: one at a time")
    if args.plot or args.measures:
        return _cmd_analyze_db(args)
    if args.grid:
        return _analyze_grid(args)
    if args.overrides:
        raise UserError("analyze: --set applies to --grid only")
    if not args.db:
        raise UserError("analyze: give --db SQLITE (or --plot DB / --measures DB to read one)")

    def path(p: str | None) -> Path | None:
        return Path(p) if p else None

    settings = analyze.Settings(args.matrices, args.approx, args.top_k, args.estimator, args.examples, args.seed,
                                args.tolerance, args.trace_samples, args.norms)
    req = analyze.Request(db=Path(args.db), run=path(args.run), config=path(args.config),
                          checkpoint=path(args.checkpoint), settings=settings)
    world = launch.discover()
    _setup_logging(world.rank, "INFO")
    job = analyze.check(req)  # every argument checked before any collective
    with _ranks(world, job.cfg) as (device, comm):
        def progress(line: str) -> None:
            if comm.rank == 0:
                print(line, flush=True)

        written = analyze.analyze(job, comm, device, progress)
        progress(f"analyze: {written} rows written to {args.db} (run {job.run_name}, checkpoint {job.checkpoint})")
    return 0


def _analyze_grid(args: argparse.Namespace) -> int:
    """``spngd analyze --grid``: the grid's trials one after the other on this job's ranks."""
    from app import launch, study

    if args.run or args.config or args.checkpoint:
        raise UserError("analyze: --grid trains its own runs; leave out --run, --config and --checkpoint")
    world = launch.discover()
    _setup_logging(world.rank, "INFO")
    grid = study.plan(Path(args.grid), Path(args.db) if args.db else None, args.overrides)  # before any collective
    with _ranks(world, grid.trials[0].cfg) as (device, comm):
        def progress(line: str) -> None:
            if comm.rank == 0:
                print(line, flush=True)

        done, skipped, diverged = study.run(grid, world, comm, device, progress)
        progress(f"grid: {done} trials trained, {skipped} already done, {diverged} diverged; database {grid.db}")
    return 0


def _cmd_analyze_db(args: argparse.Namespace) -> int:
    """``spngd analyze --plot DB`` / ``--measures DB``: read a database, on one process."""
    from app.analysis import measures
    from app.analysis.db import open_db

    mode = "--plot" if args.plot else "--measures"
    given = {"--measures": args.plot and args.measures, "--run": args.run, "--config": args.config,
             "--checkpoint": args.checkpoint, "--db": args.db, "--out": args.out and not args.plot,
             "--json": args.json and not args.measures}
    clash = [flag for flag, value in given.items() if value]
    if clash:
        raise UserError(f"analyze: {mode} reads a database; it does not take {', '.join(clash)}")
    path = Path(args.plot or args.measures)
    if not path.is_file():
        raise UserError(f"analyze: no database {path}")
    with open_db(path) as db:
        if args.plot:
            out = measures.plot_spectra(db, Path(args.out) if args.out else path.with_name(f"{path.stem}_spectra.png"))
            print(f"analyze: wrote {out}")
            return 0
        if len(args.matrices) != 1 or len(args.approx) != 1:
            raise UserError("analyze: --measures ranks one --matrix and one --approx at a time")
        table = measures.measure_table(db, matrix=args.matrices[0], approximation=args.approx[0])
    print(measures.render_json(table) if args.json else measures.render_markdown(table))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from app.preempt import run_launcher

    return run_launcher(args.launcher)


def _cmd_check(args: argparse.Namespace) -> int:
    from app.gradcheck import check_config

    if args.batch <= 0:
        raise UserError(f"--batch={args.batch} must be a positive integer")
    if args.tolerance <= 0:
        raise UserError(f"--tolerance={args.tolerance} must be > 0")
    logging.basicConfig(level=logging.WARNING)
    cfg = config_mod.load(args.config, args.overrides)
    results, probe = check_config(cfg, batch=args.batch)
    capped = (f" (data.image_size={cfg.data.image_size} is capped: the same operators at a bounded cost)"
              if probe.image_size != cfg.data.image_size else "")
    print(f"probe: {args.batch} random {probe.image_size}x{probe.image_size} images{capped}, "
          f"up to {probe.per_tensor} coordinates per tensor")
    width = max(map(len, results))
    for name, r in results.items():
        note = "" if r.checked else "  NOT CHECKED: every sampled coordinate crossed a kink, even at eps/100"
        print(f"{name:<{width}}  max_rel_err={r.max_rel_err:.3e} checked={r.checked} skipped={r.skipped} "
              f"step={r.step:.0e}{note}")
    worst = max(r.max_rel_err for r in results.values())
    unchecked = [name for name, r in results.items() if not r.checked]
    skipped = sum(r.skipped for r in results.values())
    tried = skipped + sum(r.checked for r in results.values())
    # An unchecked tensor is a named gap, not a disagreement; a check that checked nothing fails.
    verdict = "OK" if worst <= args.tolerance and len(unchecked) < len(results) else "FAIL"
    gap = f" unchecked={len(unchecked)} ({', '.join(unchecked[:3])}{', ...' if len(unchecked) > 3 else ''})"
    print(f"CHECK {verdict} tensors={len(results)} max_rel_err={worst:.3e} tolerance={args.tolerance:g} "
          f"skipped={skipped}/{tried} (crossed a ReLU/max-pool kink)" + (gap if unchecked else ""))
    return 0 if verdict == "OK" else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    """``spngd bench``: progress on stderr as each case is measured, then the table on stdout."""
    from app import bench  # torch is imported only by the commands that need it

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    run = bench.Bench(fill(bench.Options, args))
    for i, (case, row) in enumerate(run.rows(), 1):
        ratio = "" if row["ratio_to_sgd"] is None else f" ({row['ratio_to_sgd']:.2f}x SGD)"
        print(f"bench: [{i}/{len(run.cases)}] {case.label}: {row['ms_per_step']:.1f} ms/step{ratio}",
              file=sys.stderr, flush=True)
    print(run.header())
    print(bench.table(run.doc["rows"]))
    return 0


def _cmd_comm_bench(args: argparse.Namespace) -> int:
    from app import launch
    from app.comm import bench as comm_bench
    from app.config import CommConfig

    world = launch.discover()
    with launch.abort_on_error(world):
        device = launch.select_device(world, args.device)
        comm = launch.init_comm(world, CommConfig(backend=args.backend), device)
        rows = comm_bench.run(comm, args.sizes, args.iters, args.warmup)
        if comm.rank == 0:
            print(f"comm bench: backend={type(comm).__name__} ranks={comm.size} device={device} "
                  f"iters={args.iters}")
            print(comm_bench.table(rows), flush=True)
        comm.shutdown()
    return 0


def _rank_counts(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise UserError(f"--ranks={text!r} must be comma-separated integers, e.g. 4,8,64") from None
    if not ranks or min(ranks) < 1:
        raise UserError(f"--ranks={text!r} must list positive rank counts")
    return ranks


def _cmd_plan(args: argparse.Namespace) -> int:
    """``spngd plan``: K-FAC memory and traffic per rank for any rank count."""
    import json

    from app.kfac import plan

    ranks = _rank_counts(args.ranks)
    overrides = list(args.overrides) + ([f"model.arch={args.model}"] if args.model else [])
    cfg = config_mod.load(args.config, overrides)
    shares = [s for s in args.share.split(",") if s]
    if not shares or any(s not in ("inverses", "gradients") for s in shares):
        raise UserError(f"--share={args.share!r} must list inverses and/or gradients")
    classes = args.num_classes if args.num_classes is not None else cfg.model.num_classes or 1000
    if classes < 1:
        raise UserError(f"--num-classes={classes} must be a positive integer")
    rows = plan.table_rows(cfg, classes, ranks, shares, per_rank=args.per_rank)
    doc = {"model": cfg.model.arch, "num_classes": classes, "config": args.config, "rows": rows}
    print(json.dumps(doc, indent=1) if args.json else plan.table(doc), flush=True)
    return 0


def _cmd_placement(args: argparse.Namespace) -> int:
    """``spngd placement``: the ownership balance of a model's real factor shapes."""
    from app.kfac.placement import balance_table, model_factor_shapes

    ranks = _rank_counts(args.ranks)
    if args.num_classes < 1:
        raise UserError(f"--num-classes={args.num_classes} must be a positive integer")
    try:
        shapes = model_factor_shapes(args.model, args.num_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    factors = sum(len(s) for s in shapes.values())
    print(f"{args.model}: {len(shapes)} K-FAC layers, {factors} factors, largest "
          f"{max(s[-1] for ss in shapes.values() for s in ss)}; share={args.share}, every factor refreshed every step")
    print("memory: one fp32 copy of the owned factors (owners also keep the inverse, and with adaptive "
          "intervals the previous factors)")
    print(f"{'ranks':>6} {'cost max/mean':>14} {'lower bound':>12} {'mem max MiB':>12} {'mem mean MiB':>13} "
          f"{'idle ranks':>11}")
    for row in balance_table(list(shapes.values()), ranks, precondition=args.share == "gradients"):
        print(f"{row['ranks']:>6} {row['cost_max_over_mean']:>14.3f} {row['lower_bound']:>12.3f} "
              f"{row['mem_max_mib']:>12.1f} {row['mem_mean_mib']:>13.1f} {row['idle_ranks']:>11}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """``spngd submit``: print the job script (--dry-run), or write it next to the run and submit it."""
    from app import submit

    request = fill(submit.Request, args)
    job, sweep = submit.build_job(request, workdir=Path.cwd(), python_bin=Path(sys.executable).parent,
                                  now=datetime.now())
    text = submit.render.render(job)
    if request.dry_run:
        print(text, end="")
        return 0
    job_id = submit.write_and_submit(job, sweep, text)
    print(f"spngd: submitted {job.script_path} to {job.profile.name}; logs in {job.log_dir}/"
          + (f"; report with: spngd sweep-report {job.run_dir}" if sweep else ""), file=sys.stderr)
    print(job_id)
    return 0


def _cmd_sweep_report(args: argparse.Namespace) -> int:
    """``spngd sweep-report``: print the ranked table of a sweep directory (its report.csv is written)."""
    from app.submit import sweep

    print(sweep.report(Path(args.dir), args.metric))
    return 0


#: How long the other ranks wait after a user error (every rank sees the same one) for rank 0 to print it
#: and exit: under contention rank 0 can be seconds behind, and its launcher kills it when a peer exits.
_RANK0_GRACE_S = 10.0


def _report_once(rank: int, exc: BaseException) -> None:
    """Print an error every rank raised alike on rank 0 only; the others wait for it first, since mpirun
    ends the job at the first non-zero exit and rank 0 must get to print its line."""
    if rank == 0:
        print(f"spngd: error: {exc}", file=sys.stderr, flush=True)
    else:
        time.sleep(_RANK0_GRACE_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        from app.launch import global_rank  # from the rank variables alone: right even when discovery failed

        _report_once(global_rank(), exc)
        return USAGE_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
