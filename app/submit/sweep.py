"""Random hyperparameter search and its report.

Random search beats grid search when only a few of the hyperparameters matter (Bergstra & Bengio,
JMLR 2012): every trial tries a new value of each one. A sweep file names distributions over
config keys; trial ``i`` of a sweep draws from a generator seeded with (sweep seed, i, key), so a
trial's values depend on nothing else: the job script, ``sweep-report`` and a rerun all agree, and
adding a parameter to the file leaves the others' draws unchanged.

    name: demo-lr                 # optional, default: the file name
    seed: 2012
    metric: val_top1              # a FINAL-line field that sweep-report ranks by
    goal: max                     # max | min
    parameters:
      optim.lr: {log_uniform: [0.01, 1.0]}
      optim.momentum: {uniform: [0.8, 0.95]}
      optim.nesterov: {choice: [true, false]}
    trials: 8                     # optional; --trials overrides it

A parameter given as ``{grid: [a, b, ...]}`` is swept exhaustively instead: trial i takes
combination (i - 1) mod G of the grid keys (G = the product of their lengths, the first key
varying slowest), and ``trials`` defaults to G and must be a multiple of it (repeats then differ
in their random keys, e.g. the seed). ``config:`` names the base configuration, so that
``spngd analyze --grid FILE`` (the curvature study) and ``spngd submit --sweep FILE`` need no
``--config``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import typing
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from app import config as config_mod
from app.errors import ConfigError
from app.metrics import parse_final_line

Kind = Literal["uniform", "log_uniform", "choice", "grid"]
SPEC_NAME = "sweep.yaml"        # the normalised sweep file kept in the sweep directory
REPORT_NAME = "report.csv"
_TRIAL_DIR = re.compile(r"trial-(\d+)$")


@dataclass(frozen=True)
class Param:
    key: str
    kind: Kind
    values: tuple[Any, ...]     # (low, high), or the choices
    type: Any                   # the config field's Python type (int, float, bool, str, list[...])


@dataclass(frozen=True)
class Sweep:
    name: str
    seed: int
    metric: str
    goal: Literal["max", "min"]
    params: tuple[Param, ...]
    trials: int                 # 0 = not given in the file (then --trials decides)
    config: str = ""            # the base configuration, when the file names one

    @property
    def combinations(self) -> int:
        """G, the grid's size (1 without grid keys)."""
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "metric": self.metric, "goal": self.goal,
                "trials": self.trials, "parameters": {p.key: {p.kind: list(p.values)} for p in self.params},
                **({"config": self.config} if self.config else {})}


def _key_type(key: str) -> Any:
    node: Any = config_mod.Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise ConfigError(f"sweep: {key!r} is not a configuration key (see `spngd train --help`)")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"sweep: {key!r} is a section; name one of its keys")
    # A key that takes a number or a schedule (kfac.damping, optim.momentum) is swept as a number:
    # a trial's draw is the constant value, which the config loader accepts as it accepts any number.
    return float if node == float | config_mod.Schedule else node


def _param(key: str, spec: Any) -> Param:
    where = f"sweep: parameters.{key}"
    kinds = typing.get_args(Kind)
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds):
        raise ConfigError(f"{where} must be one of {{uniform: [low, high]}}, {{log_uniform: [low, high]}}, "
                          "{choice: [a, b, ...]}, {grid: [a, b, ...]}")
    kind, values = next(iter(spec.items()))
    tp = _key_type(key)
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        return Param(key, kind, tuple(values), tp)
    if tp not in (int, float):
        raise ConfigError(f"{where}: {kind} needs a numeric key, and {key} is not one (use choice)")
    if not (isinstance(values, list) and len(values) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{where}: {kind} needs [low, high] as two numbers")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ConfigError(f"{where}: low={values[0]} must be below high={values[1]}")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0")
    return Param(key, kind, (values[0], values[1]), tp)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file's structure; values are checked against a config by ``check``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep: file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"sweep: {p} is not valid YAML") from None
    known = {"name", "seed", "metric", "goal", "parameters", "trials", "config"}
    if not isinstance(data, dict) or set(data) - known:
        extra = sorted(set(data) - known) if isinstance(data, dict) else ["(not a mapping)"]
        raise ConfigError(f"sweep: {p}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"sweep: seed={seed!r} must be a non-negative integer")
    goal = data.get("goal", "max")
    if goal not in ("max", "min"):
        raise ConfigError(f"sweep: goal={goal!r} is not one of max, min")
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError("sweep: parameters must map config keys to distributions")
    trials = data.get("trials", 0)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"sweep: trials={trials!r} must be a positive integer")
    name = str(data.get("name") or p.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"sweep: name={name!r} may use letters, digits, '_', '.', '-'")
    config = data.get("config", "")
    if not isinstance(config, str):
        raise ConfigError(f"sweep: config={config!r} must be the path of a configuration file")
    sweep = Sweep(name, seed, str(data.get("metric", "val_top1")), goal,
                  tuple(_param(str(k), v) for k, v in params.items()), trials, config)
    return resolve_trials(sweep, trials)


def resolve_trials(sweep: Sweep, trials: int | None) -> Sweep:
    """``sweep`` with ``trials`` (0/None: the file's, else the grid's size) checked against its grid."""
    grid = any(p.kind == "grid" for p in sweep.params)
    n = trials or sweep.trials or (sweep.combinations if grid else 0)
    if n and n % sweep.combinations:
        raise ConfigError(f"sweep: trials={n} must be a multiple of the grid's {sweep.combinations} combinations")
    return dataclasses.replace(sweep, trials=n)


def _round(value: float, tp: Any) -> int | float:
    """Integers for integer keys; four significant digits otherwise (readable, and what runs)."""
    return round(value) if tp is int else float(f"{value:.4g}")


def sample(sweep: Sweep, index: int) -> dict[str, Any]:
    """Trial ``index``'s values, from (seed, index, key) alone."""
    out: dict[str, Any] = {}
    combination = (index - 1) % sweep.combinations
    for p in reversed(sweep.params):  # mixed radix, the first grid key the most significant digit
        if p.kind == "grid":
            combination, digit = divmod(combination, len(p.values))
            out[p.key] = p.values[digit]
    for p in sweep.params:
        rng = np.random.default_rng([sweep.seed, index, zlib.crc32(p.key.encode())])
        if p.kind == "grid":
            out[p.key] = out.pop(p.key)  # the file's key order
        elif p.kind == "choice":
            out[p.key] = p.values[int(rng.integers(len(p.values)))]
        elif p.kind == "uniform":
            out[p.key] = _round(rng.uniform(float(p.values[0]), float(p.values[1])), p.type)
        else:
            low, high = math.log(float(p.values[0])), math.log(float(p.values[1]))
            out[p.key] = _round(math.exp(rng.uniform(low, high)), p.type)
    return out


def _text(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML scalars; lists in flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def overrides(sweep: Sweep, index: int) -> tuple[str, ...]:
    return tuple(f"{k}={_text(v)}" for k, v in sample(sweep, index).items())


def check(sweep: Sweep, config: str, base: Sequence[str]) -> None:
    """Validate every trial's full configuration through app.config (types, ranges and the rules
    between keys), so a bad sweep fails at submit time and not in trial 37."""
    for i in range(1, sweep.trials + 1):
        trial = overrides(sweep, i)
        try:
            config_mod.load(config, [*base, *trial])
        except ConfigError as exc:
            raise ConfigError(f"sweep: trial {i} ({', '.join(trial)}) is refused: {exc}") from None


@dataclass(frozen=True)
class TrialResult:
    index: int
    params: dict[str, Any]
    final: dict[str, float | int | str] | None  # None: no FINAL line yet (pending, running or failed)


def collect(sweep_dir: Path) -> tuple[Sweep, list[TrialResult]]:
    """Each trial's values and its FINAL line from the sweep's job logs (the last one wins, so a
    trial that was requeued or rerun reports its finished run)."""
    spec = sweep_dir / SPEC_NAME
    if not spec.is_file():
        raise ConfigError(f"sweep-report: {sweep_dir} has no {SPEC_NAME}; give the directory `spngd submit "
                          "--sweep` printed")
    sweep = load_sweep(spec)
    if sweep.trials <= 0:
        raise ConfigError(f"sweep-report: {spec} does not record how many trials were submitted")
    finals: dict[int, dict[str, float | int | str]] = {}
    logs = sorted((p for p in (sweep_dir / "logs").glob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("FINAL "):
                final = parse_final_line(line)
                m = _TRIAL_DIR.search(str(final.get("run_dir", "")))
                if m:
                    finals[int(m.group(1))] = final
    return sweep, [TrialResult(i, sample(sweep, i), finals.get(i)) for i in range(1, sweep.trials + 1)]


def report(sweep_dir: Path, metric: str | None = None) -> str:
    """Rank the trials by ``metric`` (default: the sweep's), write ``report.csv`` and return a table.
    Trials without a FINAL line (pending, running, failed) are listed last, unranked."""
    sweep, results = collect(sweep_dir)
    metric = metric or sweep.metric
    for r in results:
        if r.final is not None and metric not in r.final:
            raise ConfigError(f"sweep-report: metric {metric!r} is not in the FINAL line "
                              f"(fields: {', '.join(r.final)})")
    done = sorted((r for r in results if r.final is not None), key=lambda r: float((r.final or {})[metric]),
                  reverse=sweep.goal == "max")
    ordered = done + [r for r in results if r.final is None]
    shown = [metric, *(k for k in ("val_top1", "val_loss", "steps", "time_s") if k != metric)]
    header = ["rank", "trial", *shown, *(p.key for p in sweep.params)]
    rows = [[str(n) if r.final else "-", str(r.index), *(_text((r.final or {}).get(k, "")) for k in shown),
             *(_text(r.params[p.key]) for p in sweep.params)] for n, r in enumerate(ordered, start=1)]
    with (sweep_dir / REPORT_NAME).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*header, "run_dir"])
        writer.writerows([*row, (r.final or {}).get("run_dir", "")] for row, r in zip(rows, ordered, strict=True))
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in (header, *rows)]
    summary = (f"{len(done)} of {len(results)} trials finished; ranked by {metric} ({sweep.goal}); "
               f"csv: {sweep_dir / REPORT_NAME}")
    return "\n".join([*lines, summary])
