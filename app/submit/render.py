"""System profiles + template families -> one batch script.

A profile (``jobscripts/systems/NAME.yaml``) holds only what a site changes: scheduler family,
GPUs per node, site resource directives, modules, scratch, communication knobs. Every profile
starts from ``_base.yaml`` and may ``inherits:`` another, so a new site is a few lines. The script
text lives in ``jobscripts/<family>.sh.tmpl``, which extend the shared ``common.sh.tmpl``; the
checkpoint/requeue protocol therefore exists once for SLURM, Grid Engine and PBS alike.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from app.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
JOBSCRIPTS = REPO / "jobscripts"
SYSTEMS = JOBSCRIPTS / "systems"

Family = Literal["slurm", "sge", "pbs"]
Launcher = Literal["mpirun", "srun"]
Group = Literal["required", "optional", "unsupported"]

_WALLTIME = re.compile(r"(\d+):([0-5]\d):([0-5]\d)")


@dataclass(frozen=True)
class EnvKnob:
    """One exported variable and the reason it is set (rendered as its comment)."""

    name: str
    value: str
    why: str


@dataclass(frozen=True)
class Profile:
    """A resolved system profile; see ``jobscripts/systems/_base.yaml`` for what each key means."""

    name: str
    description: str
    scheduler: Family
    gpus_per_node: int
    ranks_per_node: int
    cpus_per_rank: int
    resources: tuple[str, ...]
    launcher: Launcher
    mpirun_args: tuple[str, ...]
    hostfile: str
    scratch: str
    stage_data: bool
    modules: tuple[str, ...]
    group: Group
    walltime: str
    warn_s: int
    env: tuple[EnvKnob, ...]


def _profile_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"submit: system name {name!r} is not a profile name or a .yaml path")
    return SYSTEMS / f"{name}.yaml"


def available_systems() -> list[str]:
    return sorted(p.stem for p in SYSTEMS.glob("*.yaml") if not p.stem.startswith("_"))


def _read(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
    """The profile's own keys merged over its parent's (``inherits``), down to ``_base``."""
    path = _profile_path(name)
    if not path.is_file():
        raise ConfigError(f"submit: unknown system {name!r} (known: {', '.join(available_systems())}; "
                          "or give a path to a profile .yaml)")
    if name in chain:
        raise ConfigError(f"submit: profile {name!r} inherits from itself ({' -> '.join((*chain, name))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"submit: profile {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"submit: profile {path} must be a mapping")
    parent_name = data.pop("inherits", "_base" if name != "_base" else None)
    if parent_name is None:
        return data
    parent = _read(str(parent_name), (*chain, name))
    env = {**parent.get("env", {}), **(data.pop("env", None) or {})}
    return {**parent, **data, "env": env}


def load_profile(name: str) -> Profile:
    """Resolve a profile by name (``jobscripts/systems/NAME.yaml``) or by path."""
    data = _read(name, ())
    where = f"submit: profile {name}"
    known = {f.name for f in fields(Profile)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    missing = sorted(known - set(data))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    for key, allowed in (("scheduler", Family), ("launcher", Launcher), ("group", Group)):
        if data[key] not in get_args(allowed):
            raise ConfigError(f"{where}: {key}={data[key]!r} is not one of {', '.join(get_args(allowed))}")
    for key, least in (("gpus_per_node", 0), ("ranks_per_node", 0), ("cpus_per_rank", 1), ("warn_s", 1)):
        if type(data[key]) is not int or data[key] < least:
            raise ConfigError(f"{where}: {key}={data[key]!r} must be an integer >= {least}")
    if not isinstance(data["stage_data"], bool):
        raise ConfigError(f"{where}: stage_data={data['stage_data']!r} must be true or false")
    ranks_per_node = data["ranks_per_node"] or data["gpus_per_node"]
    if ranks_per_node == 0:
        raise ConfigError(f"{where}: set gpus_per_node, or ranks_per_node for CPU nodes")
    if not isinstance(data["walltime"], str):  # YAML reads an unquoted 4:00:00 as 14400
        raise ConfigError(f"{where}: walltime must be a quoted \"HH:MM:SS\", not {data['walltime']!r}")
    parse_walltime(data["walltime"])
    env = []
    for var, spec in data["env"].items():
        if not (isinstance(spec, dict) and set(spec) == {"value", "why"}):
            raise ConfigError(f"{where}: env.{var} must be {{value: ..., why: ...}}")
        env.append(EnvKnob(str(var), str(spec["value"]), str(spec["why"])))
    lists = {k: tuple(str(v) for v in data[k] or ()) for k in ("resources", "mpirun_args", "modules")}
    return Profile(**{**data, **lists, "name": Path(name).stem, "ranks_per_node": ranks_per_node,
                      "env": tuple(env), "description": str(data["description"]),
                      "hostfile": str(data["hostfile"] or ""), "scratch": str(data["scratch"] or "")})


def parse_walltime(text: str) -> int:
    """``HH:MM:SS`` (hours may exceed 24) -> seconds; anything else is a one-line error."""
    m = _WALLTIME.fullmatch(text.strip())
    seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)) if m else 0
    if seconds <= 0:
        raise ConfigError(f"submit: walltime {text!r} is not HH:MM:SS (e.g. 01:30:00)")
    return seconds


@dataclass(frozen=True)
class Trial:
    """One array index and the ``key=value`` overrides it trains with."""

    index: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """Everything a script depends on; rendering is a pure function of it (golden files)."""

    profile: Profile
    nodes: int
    walltime: str
    group: str
    config: str                   # as the user gave it, relative to workdir or absolute
    overrides: tuple[str, ...]    # the user's --set, minus output.dir/name (the script sets those)
    output_dir: str
    run_name: str                 # the run directory name, or the sweep directory name
    data_path: str                # dataset to stage to node-local scratch ('' = nothing to stage)
    workdir: Path
    python_bin: Path              # bin/ of the environment spngd runs from
    trials: tuple[Trial, ...] = ()
    sweep_seed: int = 0

    @property
    def run_dir(self) -> Path:
        return self.workdir / self.output_dir / self.run_name

    @property
    def train_output_dir(self) -> str:
        """``output.dir`` of the run(s): a sweep's trials live inside the sweep directory."""
        return f"{self.output_dir}/{self.run_name}" if self.trials else self.output_dir

    @property
    def script_path(self) -> Path:
        kind = "sweep" if self.trials else "job"
        return self.run_dir / f"{kind}-{self.profile.name}.sh"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def job_name(self) -> str:
        """Scheduler-safe: letters first, no '/', short enough for every family."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"spngd-{self.run_name}")[:63]


def _expand(job: Job, text: str) -> str:
    p = job.profile
    values = {"nodes": job.nodes, "ranks": job.nodes * p.ranks_per_node, "ranks_per_node": p.ranks_per_node,
              "gpus_per_node": p.gpus_per_node, "cpus_per_rank": p.cpus_per_rank}
    try:
        return text.format_map(values)
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"submit: profile {p.name}: {text!r} uses an unknown placeholder ({exc}); "
                          f"known: {', '.join('{' + k + '}' for k in values)}") from None


def render(job: Job) -> str:
    """The batch script for ``job`` (no side effects)."""
    import jinja2

    from app.checkpoint import REQUEUE_EXIT  # imports torch: only when a script is rendered
    from app.submit import schedulers

    p = job.profile
    if re.search(r"\s", str(job.log_dir)):
        raise ConfigError(f"submit: {job.log_dir} contains whitespace, which scheduler directives cannot quote")
    family = schedulers.FAMILIES[p.scheduler]
    walltime_s = parse_walltime(job.walltime)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(JOBSCRIPTS), undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False,
        comment_start_string="{##", comment_end_string="##}")  # bash's ${#array[@]} must stay text
    env.filters["q"] = lambda v: shlex.quote(str(v))
    knobs = [EnvKnob(k.name, _expand(job, k.value), k.why) for k in p.env]
    return env.get_template(f"{p.scheduler}.sh.tmpl").render(
        job=job, p=p, f=family, nodes=job.nodes, rpn=p.ranks_per_node, ranks=job.nodes * p.ranks_per_node,
        walltime=job.walltime, walltime_s=walltime_s,
        # Short debug jobs still get their warning: never more than a quarter of the walltime.
        warn_s=max(1, min(p.warn_s, walltime_s // 4)),
        resources=[_expand(job, r) for r in p.resources], knobs=knobs,
        exported=["PATH", *(["LD_LIBRARY_PATH"] if p.modules else []), *(k.name for k in knobs)],
        hostfile=p.hostfile or family.hostfile, requeue_exit=REQUEUE_EXIT,
        again=schedulers.again_command(job),
        submit_command=" ".join(shlex.quote(a) for a in schedulers.submit_argv(job)))
