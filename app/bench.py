"""``spngd bench``: time SGD, K-FAC, Adam, VOGN and noisy K-FAC training steps on synthetic data, one
process, one device.

The Bayesian optimisers (vogn, noisy_kfac) are built by ``build_bayes_optimizer`` as the trainer builds
them and stepped through ``app.train.sample_passes``: ``bayes.samples`` forward/backward passes per step
at sampled weights (``--set bayes.samples=K``; the other rows run at 1), K-FAC told as many micro-batches,
and ``KFAC.step`` left to noisy K-FAC's own ``step``. Their phases are only ``forward_backward`` (with the
sampling and, for noisy K-FAC, the factor capture) and ``optimizer`` (for noisy K-FAC including all of
its K-FAC step, over the instrumented steps' mix of factor/inverse updates).

Every case of the cross product (model x batch x precision x layout x optimiser x intervals) is
built the way ``app.train`` builds a run (``build_loaders`` with the synthetic backend,
``build_model``, ``build_optimizer``, ``KFAC``) and stepped through the same public calls
(``begin_step``, forward, ``fisher_backward``, backward, ``step(lr)``, ``optimizer.step()``), at a
tiny learning rate by default (``BENCH_LR``) so that the repeated random batch never diverges.

**Headline ms/step.** ``--warmup`` steps, then ``timed`` steps back to back with one device
synchronisation before and one after: no per-phase synchronisation perturbs the number. For K-FAC
``timed`` is ``--steps`` rounded up to a multiple of the inverse interval, so the window holds
exactly ``timed / factor_interval`` factor updates and ``timed / inverse_interval`` inversions
(the same mix as a long run).

**Phases** come from a separate instrumented pass on the same model that synchronises the device
at every phase boundary. ``KFAC.step`` does factors, inversion and preconditioning in one call, so
they are separated from the outside: a probe ``KFAC`` with intervals 2/4 runs a cycle of steps that
refresh factors and inverses (step % 4 == 0), factors only (step % 4 == 2) and neither (odd steps),
and differences give each phase's cost per occurrence::

    forward_backward = fwd+bwd of a step without factors
    factor_stats     = (fwd+bwd with capture hooks - forward_backward) + (step(F) - step(none))
    inversion        = step(F+I) - step(F)
    preconditioning  = step(none)
    optimizer        = optimizer.step() + zero_grad()

``factor_stats`` and ``inversion`` are then divided by the case's intervals (ms per step,
amortised), so the phases add up to the headline ms/step up to synchronisation overhead and noise;
a difference below zero (noise) counts as 0.

**Peak memory** of the headline pass: on CUDA ``torch.cuda.max_memory_allocated`` (reset before
each case). On CPU the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
minus its RSS once the case is freed again (after ``gc`` and ``malloc_trim``): model, optimiser and
K-FAC state, batch and activations, without the library caches and thread pools the process keeps
for good (the first case would otherwise carry ~100 MB of them). Approximate; ``null`` without ``/proc``.
``kfac_mem_mib`` is K-FAC's own share, ``KFAC.memory()`` summed (factors, inverses, the largest step
statistics and buffers): the figure ``spngd plan`` gives for one rank.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from torch import Tensor, nn

from app import config as config_mod
from app import launch
from app.bayes.builder import Sampling, build_bayes_optimizer
from app.bayes.grid import SampleGrid
from app.comm.solo import SoloComm
from app.config import Config, ModelConfig, TrainConfig
from app.data import build_loaders
from app.errors import UserError
from app.kfac import KFAC
from app.models import build_model
from app.optim import build_criterion, build_optimizer
from app.train import autocast_for, loss_precision, loss_scale, sample_passes

PHASES = ("forward_backward", "factor_stats", "inversion", "preconditioning", "optimizer")
OPTIMS = ("sgd", "kfac", "adam", "vogn", "noisy_kfac")
INTERVAL_OPTIMS = ("kfac", "noisy_kfac")  # crossed with the K-FAC intervals
PROBE_FACTOR_INTERVAL, PROBE_INVERSE_INTERVAL = 2, 4
BENCH_LR = 1e-5
"""The default ``optim.lr`` (``--set`` changes it): timing does not depend on it, but training one
repeated random batch at a real lr diverges within a few K-FAC steps and then times NaN paths."""
MAX_PROBE_CYCLES = 4  # instrumented 4-step cycles per case: enough to average, cheap next to --steps

log = logging.getLogger(__name__)

Lap = Callable[[str], None]


def _no_lap(name: str) -> None:
    """The headline pass: phase boundaries cost nothing."""


@dataclass(frozen=True)
class Case:
    """One configuration of the cross product; the intervals are None for SGD."""

    model: str
    batch: int
    precision: str
    channels_last: bool
    optim: str
    factor_interval: int | None = None
    inverse_interval: int | None = None

    @property
    def label(self) -> str:
        intervals = f" {self.factor_interval}/{self.inverse_interval}" if self.optim in INTERVAL_OPTIMS else ""
        return (f"{self.model} batch={self.batch} {self.precision} {'NHWC' if self.channels_last else 'NCHW'} "
                f"{self.optim}{intervals}")

    @property
    def group(self) -> tuple[str, int, str, bool]:
        """Cases sharing this key are compared with one SGD row."""
        return self.model, self.batch, self.precision, self.channels_last

    def overrides(self, image_size: int, classes: int) -> list[str]:
        """``--set`` overrides that turn a base configuration into this case."""
        out = [f"model.arch={self.model}", "data.backend=synthetic", f"data.image_size={image_size}",
               f"data.val_resize={image_size}", f"data.batch_size={self.batch}",
               f"data.synthetic_samples={self.batch}", f"data.synthetic_classes={classes}",
               f"train.precision={self.precision}", f"model.channels_last={self.channels_last}",
               f"optim.preconditioner={'kfac' if self.optim == 'kfac' else 'none'}"]
        if self.optim not in ("sgd", "kfac"):  # sgd and kfac keep the base configuration's optim.name
            out.append(f"optim.name={self.optim}")
        if self.optim not in config_mod.SAMPLING_OPTIMISERS:  # --set bayes.samples=K is for the sampling rows
            out.append("bayes.samples=1")
        if self.optim in INTERVAL_OPTIMS:
            out += [f"kfac.factor_interval={self.factor_interval}", f"kfac.inverse_interval={self.inverse_interval}"]
        return out


# -- options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """The ``spngd bench`` options as typed (lists are comma-separated; defaults and help in ``app.cli``)."""

    model: str
    batch: str
    precision: str
    channels_last: str
    optim: str
    factor_interval: str
    inverse_interval: str
    steps: int
    warmup: int
    image_size: int
    classes: int
    device: str
    out: str | None
    config: str | None
    overrides: Sequence[str]


def _items(flag: str, text: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise UserError(f"bench: {flag} {text!r} has an empty item")
    return list(dict.fromkeys(items))


def _ints(flag: str, text: str) -> list[int]:
    out: list[int] = []
    for item in _items(flag, text):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise UserError(f"bench: {flag} {text!r}: {item!r} is not a positive integer")
        out.append(value)
    return out


def _choices(flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    items = _items(flag, text)
    for item in items:
        if item not in allowed:
            raise UserError(f"bench: {flag} {text!r}: {item!r} is not one of {', '.join(allowed)}")
    return items


def _config_choices(section: type, key: str) -> tuple[str, ...]:
    """The values ``app.config`` allows for a key, so bench accepts exactly what training does."""
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == key)


def plan(args: Options) -> list[tuple[Case, Config]]:
    """The cases of the ``spngd bench`` options, each with its validated configuration. Every input error
    surfaces here, before any work. Within a group the SGD case comes first, so each K-FAC row's ratio is
    known as soon as the row is."""
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"bench: need --steps >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    models = _choices("--model", args.model, _config_choices(ModelConfig, "arch"))
    batches = _ints("--batch", args.batch)
    precisions = _choices("--precision", args.precision, _config_choices(TrainConfig, "precision"))
    layouts = [v == "on" for v in _choices("--channels-last", args.channels_last, ("on", "off"))]
    optims = sorted(_choices("--optim", args.optim, OPTIMS), key=OPTIMS.index)
    factor = _ints("--factor-interval", args.factor_interval)
    inverse = _ints("--inverse-interval", args.inverse_interval)
    intervals = [(f, i) for f in factor for i in inverse if i % f == 0]
    if set(INTERVAL_OPTIMS) & set(optims) and not intervals:
        raise UserError(f"bench: no --inverse-interval ({args.inverse_interval}) is a multiple of a "
                        f"--factor-interval ({args.factor_interval})")
    cases: list[Case] = []
    for group in itertools.product(models, batches, precisions, layouts):
        if "sgd" in optims:
            cases.append(Case(*group, "sgd"))
        for optim in optims[1:] if "sgd" in optims else optims:
            cases += [Case(*group, optim, f, i) for f, i in intervals] if optim in INTERVAL_OPTIMS \
                else [Case(*group, optim)]
    base = [f"optim.lr={BENCH_LR}", *args.overrides]
    planned = [(c, config_mod.load(args.config, [*base, *c.overrides(args.image_size, args.classes)])) for c in cases]
    if any(cfg.kfac.adaptive_lambda > 0 for c, cfg in planned if c.optim in INTERVAL_OPTIMS):
        raise UserError("bench: kfac.adaptive_lambda > 0 is not supported (its per-layer intervals cannot be "
                        "amortised into phases); time fixed --factor-interval/--inverse-interval instead")
    return planned


# -- one case ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """One case's model, optimiser, K-FAC and synthetic batch on the device."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    kfac: KFAC | None
    x: Tensor
    y: Tensor
    device: torch.device
    sampler: Sampling | None
    grid: SampleGrid

    @property
    def samples(self) -> int:
        """Forward/backward passes per step: ``bayes.samples`` for a sampling optimiser, else 1."""
        return self.grid.samples if self.sampler is not None else 1

    @classmethod
    def build(cls, cfg: Config, device: torch.device) -> _Run:
        """Built as ``app.train.Trainer`` builds a single-process run (same seed, same builders; the Bayesian
        optimisers see the synthetic batch as their whole dataset, which changes their values, not their cost)."""
        torch.manual_seed(cfg.train.seed)
        dtype = getattr(torch, cfg.train.dtype)
        loader, _, info = build_loaders(cfg, 0, 1, device, seed=cfg.train.seed)
        x, y = next(iter(loader.epoch(0)))
        x = x.to(dtype)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model = build_model(cfg.model, info.num_classes, info.input_shape).to(device=device, dtype=dtype)
        kfac = KFAC(model, cfg.kfac) if cfg.optim.preconditioner == "kfac" or cfg.optim.name == "noisy_kfac" \
            else None
        optimizer: torch.optim.Optimizer
        if cfg.optim.name in config_mod.BAYESIAN_OPTIMISERS:
            optimizer = build_bayes_optimizer(model, cfg, SoloComm(device), train_images=info.train_size,
                                              global_batch=cfg.data.batch_size, steps_per_epoch=1, total_steps=1,
                                              kfac=kfac)
        else:
            optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
        return cls(cfg, model, optimizer, build_criterion(cfg.optim),
                   torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"), kfac, x, y, device,
                   optimizer if isinstance(optimizer, Sampling) else None,
                   SampleGrid(1, 0, cfg.bayes.mc_groups, cfg.bayes.samples))

    def step(self, step: int, lap: Lap = _no_lap) -> None:
        """``Trainer._train_step`` for one micro-batch and one rank (its weight samples through the same
        ``sample_passes``); ``lap`` marks the phase ends."""
        if self.kfac is not None:
            self.kfac.begin_step(step, micro_batches=self.samples, loss_scale=loss_scale(self.scaler))
        for sampled in sample_passes(self.sampler, self.grid, self.device, self.cfg.train.seed, step):
            with sampled:
                with autocast_for(self.cfg, self.device):
                    out = self.model(self.x)
                    loss = self.criterion(loss_precision(out), self.y) / self.samples
                if self.kfac is not None:
                    self.kfac.fisher_backward(out)
                self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        lap("forward_backward")
        if self.kfac is not None and not getattr(self.optimizer, "calls_kfac", False):
            self.kfac.step(self.optimizer.param_groups[0]["lr"])
        lap("kfac")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lap("optimizer")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, steps: range) -> float:
        """Seconds for ``steps``, synchronised only before and after."""
        self.sync()
        start = time.perf_counter()
        for s in steps:
            self.step(s)
        self.sync()
        return time.perf_counter() - start

    def laps(self, steps: range) -> list[dict[str, float]]:
        """Per-step phase seconds, synchronising at every phase boundary."""
        out: list[dict[str, float]] = []
        for s in steps:
            times: dict[str, float] = {}
            self.sync()
            last = time.perf_counter()

            def lap(name: str, times: dict[str, float] = times) -> None:  # this step's dict, bound now
                nonlocal last
                self.sync()
                now = time.perf_counter()
                times[name], last = now - last, now

            self.step(s, lap)
            out.append(times)
        return out


def amortised_phases(laps: Sequence[dict[str, float]], first_step: int, factor_interval: int,
                     inverse_interval: int) -> dict[str, float]:
    """Phase seconds per step of a K-FAC case from the probe's laps (see the module docstring).

    ``laps[k]`` is probe step ``first_step + k``; the probe must cover every step kind at least once.
    """
    kinds: dict[str, list[dict[str, float]]] = {"FI": [], "F": [], "none": []}
    for k, times in enumerate(laps):
        s = first_step + k
        kind = "FI" if s % PROBE_INVERSE_INTERVAL == 0 else "F" if s % PROBE_FACTOR_INTERVAL == 0 else "none"
        kinds[kind].append(times)

    def mean(kind: str, phase: str) -> float:
        return fmean(t[phase] for t in kinds[kind])

    fwd_bwd = mean("none", "forward_backward")
    capture = fmean(t["forward_backward"] for t in kinds["F"] + kinds["FI"]) - fwd_bwd
    fold = mean("F", "kfac") - mean("none", "kfac")
    return {"forward_backward": fwd_bwd,
            "factor_stats": max(0.0, capture + fold) / factor_interval,
            "inversion": max(0.0, mean("FI", "kfac") - mean("F", "kfac")) / inverse_interval,
            "preconditioning": mean("none", "kfac"),
            "optimizer": fmean(t["optimizer"] for t in laps)}


class _PeakMemory:
    """Peak memory of one case (see the module docstring for what is counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _settle()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._proc = True
        except OSError:
            self._proc = False

    def peak(self) -> int | None:
        """Bytes: the CUDA allocator's peak, or the process's peak RSS, since construction."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM") if self._proc else None

    def case_gib(self, peak: int | None) -> float | None:
        """``peak`` in GiB; on CPU minus the RSS left once the case is freed (call after freeing it),
        so what the process keeps for good (library caches first used by this case) is not charged."""
        if peak is None or self.device.type == "cuda":
            return None if peak is None else peak / 2**30
        _settle()
        return max(0, peak - _proc_status_bytes("VmRSS")) / 2**30


def _settle() -> None:
    """Free what the previous case left: K-FAC hooks form reference cycles, and glibc keeps freed heap."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {key}")


def measure(case: Case, cfg: Config, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """One JSON row, without ``ratio_to_sgd`` (which needs the group's SGD row)."""
    memory = _PeakMemory(device)
    run = _Run.build(cfg, device)
    timed = steps
    if run.kfac is not None:
        timed = math.ceil(steps / cfg.kfac.inverse_interval) * cfg.kfac.inverse_interval
    for s in range(warmup):
        run.step(s)
    seconds = run.timed(range(warmup, warmup + timed)) / timed
    peak = memory.peak()
    kfac_mem = None if run.kfac is None else sum(run.kfac.memory().values()) / 2 ** 20
    if run.kfac is not None:
        stats = run.kfac.stats
        fallbacks = {k: stats[k] for k in ("kfac_nan_skips", "kfac_fp64_retries", "kfac_damping_retries")
                     if stats.get(k)}
        if fallbacks:
            log.warning("bench: warning: %s took K-FAC fallback paths during timing, so its times are not "
                        "representative (diverged? lower --set optim.lr): %s", case.label, fallbacks)
    phase_s = _phase_seconds(run, cfg, steps, warmup + timed)
    del run  # before case_gib: the CPU figure subtracts what remains afterwards
    peak_gib = memory.case_gib(peak)
    return {"model": case.model, "batch": case.batch, "precision": case.precision,
            "channels_last": case.channels_last, "optim": case.optim,
            "factor_interval": case.factor_interval, "inverse_interval": case.inverse_interval,
            "ms_per_step": round(seconds * 1e3, 3), "img_per_s": round(case.batch / seconds, 2),
            "peak_mem_gib": None if peak_gib is None else round(peak_gib, 4),
            "kfac_mem_mib": None if kfac_mem is None else round(kfac_mem, 3),
            "phases": {k: round(v * 1e3, 3) for k, v in phase_s.items()},
            "ratio_to_sgd": None, "timed_steps": timed}


def _phase_seconds(run: _Run, cfg: Config, steps: int, next_step: int) -> dict[str, float]:
    """The instrumented pass, after the headline one (so the model is warm). Noisy K-FAC calls its
    ``KFAC.step`` inside ``optimizer.step()`` and holds that KFAC, so no probe can stand in for it: its
    ``optimizer`` phase includes all of K-FAC's step (factors, inversion, preconditioning, over the steps
    ``next_step`` on) and ``forward_backward`` the sampling and the factor capture."""
    n = PROBE_INVERSE_INTERVAL * max(1, min(MAX_PROBE_CYCLES, steps // PROBE_INVERSE_INTERVAL))
    if run.kfac is None or getattr(run.optimizer, "calls_kfac", False):
        laps = run.laps(range(next_step, next_step + n))
        return {"forward_backward": fmean(t["forward_backward"] for t in laps),
                "factor_stats": 0.0, "inversion": 0.0, "preconditioning": 0.0,
                "optimizer": fmean(t["kfac"] + t["optimizer"] for t in laps)}
    run.kfac.close()
    run.kfac = KFAC(run.model, dataclasses.replace(cfg.kfac, factor_interval=PROBE_FACTOR_INTERVAL,
                                                   inverse_interval=PROBE_INVERSE_INTERVAL))
    for s in range(PROBE_INVERSE_INTERVAL):  # one untimed cycle: the probe's first factors and inverses
        run.step(s)
    laps = run.laps(range(PROBE_INVERSE_INTERVAL, PROBE_INVERSE_INTERVAL + n))
    run.kfac.close()
    return amortised_phases(laps, PROBE_INVERSE_INTERVAL, cfg.kfac.factor_interval, cfg.kfac.inverse_interval)


# -- output ------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, torch threads={torch.get_num_threads()})"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (phases in ms per step)."""
    head = ["model", "batch", "precision", "layout", "optim", "intervals", "ms/step", "img/s", "peak GiB",
            "K-FAC MiB", "x SGD", "fwd+bwd", "factors", "inverse", "precond", "optimizer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        intervals = "-" if r["factor_interval"] is None else f"{r['factor_interval']}/{r['inverse_interval']}"
        cells = [r["model"], str(r["batch"]), r["precision"], "NHWC" if r["channels_last"] else "NCHW", r["optim"],
                 intervals, f"{r['ms_per_step']:.1f}", f"{r['img_per_s']:.1f}", _fmt(r["peak_mem_gib"], ".3f"),
                 _fmt(r.get("kfac_mem_mib"), ".1f"), _fmt(r["ratio_to_sgd"], ".2f"),
                 *(f"{r['phases'][p]:.1f}" for p in PHASES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Atomic rewrite after every row, so an interrupted sweep keeps what it measured."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _command(args: Options) -> str:
    """The command line that reproduces this run, however it was invoked."""
    parts = ["spngd", "bench"]
    for key in ("model", "batch", "precision", "channels_last", "optim", "factor_interval", "inverse_interval",
                "steps", "warmup", "image_size", "classes", "device"):
        parts += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    if args.config:
        parts += ["--config", args.config]
    for text in args.overrides:
        parts += ["--set", text]
    return shlex.join(parts)


class Bench:
    """One ``spngd bench`` run: the planned cases (every input error surfaces on construction, before
    any work), the device, and the JSON document that ``rows`` fills."""

    def __init__(self, args: Options) -> None:
        self.args = args
        self.cases = plan(args)
        self.device = launch.select_device(launch.World(0, 1, 0, 1, "single"), args.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # autotuned during warm-up, as a tuned training run would be
        self.doc: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": _device_name(self.device),
            "torch": torch.__version__, "command": _command(args), "steps": args.steps,
            "warmup": args.warmup, "image_size": args.image_size, "classes": args.classes, "rows": []}
        self.out = Path(args.out) if args.out else None
        if self.out is not None:
            try:
                _write(self.out, self.doc)
            except OSError as exc:
                raise UserError(f"bench: cannot write --out {args.out}: {exc.strerror}") from None

    def rows(self) -> Iterator[tuple[Case, dict[str, Any]]]:
        """Measure every case in order; each row is in the document (and the --out file) when yielded."""
        sgd_ms: dict[tuple[str, int, str, bool], float] = {}
        for case, cfg in self.cases:
            row = measure(case, cfg, self.device, self.args.steps, self.args.warmup)
            if case.optim == "sgd":
                sgd_ms[case.group] = row["ms_per_step"]
            if case.group in sgd_ms:
                row["ratio_to_sgd"] = round(row["ms_per_step"] / sgd_ms[case.group], 3)
            self.doc["rows"].append(row)
            if self.out is not None:
                _write(self.out, self.doc)
            yield case, row

    def header(self) -> str:
        """The line above the table: device, torch, input and step counts."""
        a = self.args
        return (f"# {self.doc['device']}, torch {self.doc['torch']}, {a.image_size}x{a.image_size}, "
                f"{a.classes} classes, >= {a.steps} timed steps after {a.warmup} warm-up; phases in ms/step")
