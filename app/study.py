"""``spngd analyze --grid``: the curvature study, a grid of training runs that each record their
spectra every few epochs (``analysis.every_epochs``) into one database.

The grid file is a sweep file (``app.submit.sweep``) whose ``config:`` names the base
configuration and whose ``{grid: [...]}`` keys span datasets x models x hyperparameters, so the
same file runs here, one trial after the other on the ranks of this job, or as an array job
through ``spngd submit --sweep FILE``. Trial i trains in ``<output.dir>/<grid name>/trial-<iii>`` (as in an array job);
a trial whose run finished (its ``summary.json`` exists) is skipped, and an interrupted one
resumes from its newest checkpoint, so a killed grid run again continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app import config as config_mod
from app.comm.base import Comm
from app.config import Config
from app.errors import ConfigError, Diverged
from app.launch import World
from app.submit import sweep as sweep_mod
from app.train import train


@dataclass(frozen=True)
class Trial:
    index: int
    overrides: tuple[str, ...]  # the grid's values for this trial
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.dir) / self.cfg.output.name


@dataclass(frozen=True)
class Plan:
    sweep: sweep_mod.Sweep
    db: Path
    trials: tuple[Trial, ...]


def plan(path: Path, db: Path | None, overrides: Sequence[str] = ()) -> Plan:
    """Every trial's configuration, validated before any run starts (one ``ConfigError`` line)."""
    sweep = sweep_mod.load_sweep(path)
    if not sweep.config:
        raise ConfigError(f"grid: {path} names no base configuration (add config: configs/....yaml)")
    if sweep.trials < 1:
        raise ConfigError(f"grid: {path} has no {{grid: [...]}} key and no trials count")
    base = config_mod.load(sweep.config, overrides)
    target = db or (Path(base.analysis.db) if base.analysis.db else Path(base.output.dir) / f"{sweep.name}.sqlite")
    trials = []
    for i in range(1, sweep.trials + 1):
        values = sweep_mod.overrides(sweep, i)
        try:
            cfg = config_mod.load(sweep.config, [*overrides, *values, f"output.dir={base.output.dir}/{sweep.name}",
                                                 f"output.name=trial-{i:03d}", f"analysis.db={target}",
                                                 "checkpoint.resume=auto"])
        except ConfigError as exc:
            raise ConfigError(f"grid: trial {i} ({', '.join(values)}) is refused: {exc}") from None
        if cfg.analysis.every_epochs <= 0:
            raise ConfigError(f"grid: trial {i} records nothing: set analysis.every_epochs > 0 in {sweep.config}")
        trials.append(Trial(i, values, cfg))
    config_mod.check_output(trials[0].cfg)
    return Plan(sweep, target, tuple(trials))


def run(grid: Plan, world: World, comm: Comm, device: torch.device,
        progress: Callable[[str], None]) -> tuple[int, int, int]:
    """Train the grid's trials in order (collective); (finished now, skipped as done, diverged).

    A diverged trial is reported and the grid goes on: its spectra up to the divergence stay in
    the database, and the generalisation measures only rank runs that finished."""
    done = skipped = diverged = 0
    for t in grid.trials:
        if (t.run_dir / "summary.json").is_file():
            skipped += 1
            continue
        progress(f"grid: trial {t.index}/{len(grid.trials)} ({', '.join(t.overrides)}) -> {t.run_dir}")
        try:
            summary = train(t.cfg, world, comm, device)
        except Diverged as exc:
            diverged += 1
            progress(f"grid: trial {t.index} diverged ({exc}); going on")
            continue
        done += 1
        progress(f"grid: trial {t.index} val_top1 {summary.val_top1:.4f} in {summary.time_s:.1f} s")
    return done, skipped, diverged


__all__ = ["Plan", "Trial", "plan", "run"]
