"""``spngd submit`` and ``spngd sweep-report``: cluster job scripts from system profiles, and
random-search sweeps as one array job (see README, "Running on clusters"). The command line and
its output live in ``app.cli``; this package checks a ``Request``, renders and submits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from app import config as config_mod
from app.errors import UserError
from app.submit import render, schedulers
from app.submit import sweep as sweep_mod

#: Keys the job script sets itself, so that a requeued or chained run finds its checkpoints.
_SCRIPT_KEYS = ("output.dir", "output.name")


@dataclass(frozen=True)
class Request:
    """The ``spngd submit`` options as typed (help in ``app.cli``)."""

    system: str
    nodes: int
    walltime: str | None
    group: str | None
    config: str | None
    overrides: Sequence[str]
    sweep: str | None
    trials: int | None
    dry_run: bool


def build_job(args: Request, *, workdir: Path, python_bin: Path,
              now: datetime) -> tuple[render.Job, sweep_mod.Sweep | None]:
    """Check every input (one line per problem) and describe the job; no files, no scheduler."""
    profile = render.load_profile(args.system)
    if args.nodes <= 0:
        raise UserError(f"submit: --nodes={args.nodes} must be a positive integer")
    walltime = args.walltime or profile.walltime
    render.parse_walltime(walltime)
    if profile.group == "required" and not args.group:
        raise UserError(f"submit: system {profile.name} charges a group: add --group <your group>")
    if profile.group == "unsupported" and args.group:
        raise UserError(f"submit: system {profile.name} takes no --group")
    sweep = None
    if args.sweep:
        sweep = sweep_mod.resolve_trials(sweep_mod.load_sweep(args.sweep), args.trials)
        if sweep.trials < 2:
            raise UserError(f"submit: a sweep needs --trials >= 2 (got {sweep.trials})")
        args = dataclasses.replace(args, config=args.config or sweep.config or None)
    if not args.config:
        raise UserError("submit: --config is required")
    cfg = config_mod.load(args.config, args.overrides)
    if sweep:
        sweep_mod.check(sweep, args.config, args.overrides)
    elif args.trials:
        raise UserError("submit: --trials needs --sweep FILE")
    stamp = f"{now:%Y%m%d-%H%M%S}"
    staged = bool(profile.stage_data and profile.scratch and cfg.data.path and cfg.data.backend != "synthetic")
    job = render.Job(
        profile=profile, nodes=args.nodes, walltime=walltime, group=args.group or "", config=args.config,
        overrides=tuple(o for o in args.overrides if o.split("=", 1)[0].strip() not in _SCRIPT_KEYS),
        output_dir=cfg.output.dir,
        run_name=f"{sweep.name}-{stamp}" if sweep else cfg.output.name or f"{cfg.name}-{stamp}",
        data_path=cfg.data.path if staged else "", workdir=workdir, python_bin=python_bin,
        trials=tuple(render.Trial(i, sweep_mod.overrides(sweep, i)) for i in range(1, sweep.trials + 1))
        if sweep else (),
        sweep_seed=sweep.seed if sweep else 0)
    return job, sweep


def write_and_submit(job: render.Job, sweep: sweep_mod.Sweep | None, text: str) -> str:
    """Write the rendered script (and the sweep's spec) next to the run, submit it; the job id."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(text)
    job.script_path.chmod(0o755)
    if sweep:
        (job.run_dir / sweep_mod.SPEC_NAME).write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
    return schedulers.submit(job)
