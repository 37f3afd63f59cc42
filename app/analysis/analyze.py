"""``spngd analyze`` and the training hook ``analysis.every_epochs``: the spectra of a network's
information matrices, and the snapshot measures, into the database.

Every rank holds a contiguous shard of the first ``examples`` training images, so the products of
large models spread over the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app import config as config_mod
from app.analysis.db import SnapshotRow, SpectrumRow, git_commit, open_db
from app.analysis.measures import snapshot_norms
from app.analysis.operators import MATRICES, Curvature
from app.analysis.spectra import APPROXIMATIONS, ESTIMATORS, HESSIAN_DIAG_LIMIT, KFAC_MATRICES, spectrum
from app.checkpoint import Checkpointer
from app.checkpoint import load as load_checkpoint
from app.comm.base import Comm
from app.config import AnalysisConfig, Config
from app.data import PAD, build_loaders
from app.errors import CheckpointError, UserError
from app.models import build_model

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """What each measurement computes: the ``analysis`` config section (training hook) and the
    ``spngd analyze`` flags are both this."""

    matrices: Sequence[str] = ("ggn",)
    approximations: Sequence[str] = ("full",)
    top_k: int = 10
    estimator: str = "auto"
    examples: int = 256
    seed: int = 0
    tolerance: float = 1e-6
    trace_samples: int = 30
    norms: bool = True

    @classmethod
    def from_config(cls, a: AnalysisConfig) -> Settings:
        return cls(tuple(a.matrices), tuple(a.approximations), a.top_k, a.estimator, a.examples, a.seed,
                   a.tolerance, a.trace_samples, a.norms)

    def check(self) -> Settings:
        """One ``UserError`` line for the first bad value."""
        _choices("matrix", self.matrices, MATRICES)
        _choices("approximation", self.approximations, APPROXIMATIONS)
        if self.estimator not in ESTIMATORS:
            raise UserError(f"analyze: unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATORS)}")
        if self.top_k < 1 or self.examples < 1 or self.trace_samples < 1:
            raise UserError("analyze: --top-k, --examples and --trace-samples must be positive integers")
        if not 0 < self.tolerance < 1:
            raise UserError(f"analyze: --tolerance={self.tolerance} must be in (0, 1)")
        if self.estimator == "dual" and "hessian" in self.matrices:
            raise UserError("analyze: the estimator dual needs a Gram matrix; the Hessian has none (use auto)")
        return self

    def check_model(self, model: nn.Module) -> None:
        """What only the network decides: the exact Hessian diagonal's cost."""
        params = _params(model)
        if "hessian" in self.matrices and "diag" in self.approximations and params > HESSIAN_DIAG_LIMIT:
            raise UserError(f"analyze: the exact Hessian diagonal takes one product per parameter ({params}); "
                            "leave diag out for the Hessian's run or use --approx full,block")


@dataclass(frozen=True)
class Request:
    """A checkpoint to analyse; ``check`` turns it into a ``Job`` or one ``UserError`` line."""

    db: Path
    run: Path | None = None  # a run directory: its config.yaml and newest verified checkpoint
    config: Path | None = None  # or a config file and ``checkpoint``
    checkpoint: Path | None = None
    settings: Settings = Settings()


@dataclass
class Job:
    request: Request
    cfg: Config
    state: dict[str, Any]
    checkpoint: Path

    @property
    def run_name(self) -> str:
        """The run directory's name (checkpoints live in <run>/checkpoints/)."""
        run = self.request.run or self.checkpoint.resolve().parent.parent
        return run.resolve().name


def _choices(kind: str, given: Sequence[str], known: Sequence[str]) -> list[str]:
    bad = [g for g in given if g not in known]
    if bad or not given:
        raise UserError(f"analyze: unknown {kind} {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(given))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check(req: Request) -> Job:
    """Validate every argument and load the run (no collective yet)."""
    req.settings.check()
    if (req.run is None) == (req.config is None):
        raise UserError("analyze: give --run DIR, or --config FILE with --checkpoint PATH")
    if req.run is not None:
        if not (req.run / "config.yaml").is_file():
            raise UserError(f"analyze: {req.run} is not a run directory of spngd train (no config.yaml)")
        cfg = config_mod.load(req.run / "config.yaml")
    else:
        assert req.config is not None
        if req.checkpoint is None:
            raise UserError("analyze: --config needs --checkpoint PATH (or give --run DIR)")
        cfg = config_mod.load(req.config)
    if cfg.data.backend == "synthetic":
        raise UserError("analyze: the run trained on data.backend=synthetic (one random batch); there is no "
                        "training set to measure")
    if req.checkpoint is None:
        assert req.run is not None
        found = Checkpointer(req.run, cfg.checkpoint.keep).load_latest()
        if found is None:
            raise CheckpointError(f"analyze: {req.run} has no complete checkpoint")
        state, path = found
    else:
        if not req.checkpoint.is_file():
            raise CheckpointError(f"analyze: no checkpoint file {req.checkpoint}")
        state, path = load_checkpoint(req.checkpoint), req.checkpoint
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} was not written by spngd train (no model state dict)")
    open_db(req.db).close()  # a bad or newer database fails here, before any collective
    return Job(req, cfg, state, Path(path))


def _images(loader: Any, limit: int | None) -> tuple[Tensor, Tensor]:
    xs, ys, n = [], [], 0
    for x, y in loader.epoch(0):
        keep = y != PAD
        xs.append(x[keep])
        ys.append(y[keep])
        n += int(keep.sum())
        if limit is not None and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def _loss_acc(model: nn.Module, x: Tensor, y: Tensor, comm: Comm, batch: int) -> tuple[float, float]:
    """Mean loss and accuracy over all ranks' shards (one allreduce)."""
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # the communicator's device (NCCL: CUDA)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            sums[0] += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
            sums[1] += float((out.argmax(1) == y[i:i + batch]).sum())
    sums[2] = len(x)
    comm.allreduce(sums, op="sum", name="analyze_metrics")
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _shard(n: int, rank: int, size: int) -> slice:
    return slice(n * rank // size, n * (rank + 1) // size)


class Recorder:
    """Measures one run's network at chosen steps into the database (collective).

    The data is read once: every rank keeps its shard of the training set (file order, the
    validation transform: the training set as a measurement sees it, with no augmentation) and of
    the validation set, so training can call ``record`` every few epochs without reloading.
    Rank 0 owns the database: it says which results are already stored for this (run, step,
    seed) — a killed analysis run again continues where it stopped — and writes each row as
    soon as it is computed.
    """

    def __init__(self, cfg: Config, settings: Settings, db: Path, run: str, comm: Comm,
                 device: torch.device) -> None:
        self.cfg, self.settings, self.db, self.run, self.comm = cfg, settings, db, run, comm
        self.dtype = getattr(torch, cfg.train.dtype)
        train, val, self.info = build_loaders(cfg, 0, 1, device, seed=cfg.train.seed, eval_train=True)
        x, y = _images(train, None)
        xv, yv = _images(val, None)
        part, vpart = _shard(len(x), comm.rank, comm.size), _shard(len(xv), comm.rank, comm.size)
        self.train_set = (x[part].to(self.dtype), y[part])
        self.val_set = (xv[vpart].to(self.dtype), yv[vpart])
        self.examples = min(settings.examples, len(x))
        mine = _shard(self.examples, comm.rank, comm.size)
        self.offset = mine.start
        self.analysed = (x[mine].to(self.dtype), y[mine])
        self.commit = git_commit(REPO) if comm.rank == 0 else ""

    def record(self, model: nn.Module, step: int, epoch: float,
               progress: Callable[[str], None] | None = None) -> int:
        """Every requested (matrix, approximation) and the snapshot measures of ``model`` at
        ``step`` that the database lacks; returns the rows written (on every rank). The model
        is measured in eval mode and given back in the mode it came in."""
        training = model.training
        model.eval()
        try:
            return self._record(model, step, epoch, progress)
        finally:
            model.train(training)

    def _record(self, model: nn.Module, step: int, epoch: float, progress: Callable[[str], None] | None) -> int:
        s, comm, cfg = self.settings, self.comm, self.cfg
        pairs = [(m, a) for m in s.matrices for a in s.approximations if a != "kfac" or m in KFAC_MATRICES]
        todo = torch.ones(len(pairs) + 1, dtype=torch.int64)  # the last one: the snapshot measures
        db = open_db(self.db) if comm.rank == 0 else None
        try:
            if db is not None:
                for i, (m, a) in enumerate(pairs):
                    todo[i] = 0 if db.has(self.run, step, m, a, None, s.seed) else 1
                todo[-1] = int(s.norms and not db.has_snapshot(self.run, step, s.seed))
            comm.broadcast(todo, root=0, name="analyze_todo")
            if not any(todo.tolist()):
                if progress:
                    progress(f"analyze: step {step}: every result already in {self.db}, skipped")
                return 0
            train_loss, train_acc = _loss_acc(model, *self.train_set, comm, cfg.data.batch_size)
            val_loss, val_acc = _loss_acc(model, *self.val_set, comm, cfg.data.batch_size)
            common: dict[str, Any] = dict(
                run=self.run, step=step, epoch=epoch, dataset=_dataset(cfg), model=cfg.model.arch, seed=s.seed,
                examples=self.examples, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                val_acc=val_acc, params=_params(model), hparams=_hparams(cfg), git_commit=self.commit)
            written = 0
            for (matrix, approximation), due in zip(pairs, todo.tolist()):
                if not due:
                    if progress:
                        progress(f"analyze: {matrix}/{approximation} at step {step} already in {self.db}, skipped")
                    continue
                started = time.perf_counter()
                sp = spectrum(self._operator(model, matrix), approximation, s.top_k, s.estimator,
                              tol=s.tolerance, seed=s.seed, trace_samples=s.trace_samples)
                seconds = time.perf_counter() - started
                if db is not None:
                    db.insert(SpectrumRow(
                        **common, matrix=matrix, approximation=approximation, estimator=sp.estimator, k=sp.k,
                        eigenvalues=tuple(sp.eigenvalues), trace=sp.trace, trace_estimator=sp.trace_estimator,
                        tolerance=sp.tolerance, seconds=seconds))
                written += 1
                if progress:
                    top = ", ".join(f"{v:.4g}" for v in sp.eigenvalues[:3])
                    progress(f"analyze: step {step} {matrix}/{approximation} [{sp.estimator}] top {top} trace "
                             f"{sp.trace:.4g} ({sp.products} products, {seconds:.1f} s)")
            if todo[-1]:
                started = time.perf_counter()
                norms: dict[str, Any] = snapshot_norms(model, *self.analysed, comm, total=self.examples, seed=s.seed,
                                       chunk=cfg.data.batch_size)
                seconds = time.perf_counter() - started
                if db is not None:
                    db.insert_snapshot(SnapshotRow(**common, **norms, seconds=seconds))
                written += 1
                if progress:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in norms.items())
                    progress(f"analyze: step {step} snapshot {shown} ({seconds:.1f} s)")
            return written
        finally:
            if db is not None:
                db.close()

    def _operator(self, model: nn.Module, matrix: str) -> Curvature:
        x, y = self.analysed
        return Curvature(model, x, y, matrix, self.comm, total=self.examples, offset=self.offset,
                         seed=self.settings.seed, chunk=self.cfg.data.batch_size)


def analyze(job: Job, comm: Comm, device: torch.device, progress: Callable[[str], None] | None = None) -> int:
    """Measure the job's checkpoint (collective); returns the rows written (on every rank)."""
    cfg, settings = job.cfg, job.request.settings
    recorder = Recorder(cfg, settings, job.request.db, job.run_name, comm, device)
    try:
        model = build_model(cfg.model, recorder.info.num_classes, recorder.info.input_shape)
        model.to(device=device, dtype=recorder.dtype).load_state_dict(job.state["model"])
    except (ValueError, RuntimeError):
        raise CheckpointError(f"checkpoint {job.checkpoint} does not fit the run's model ({cfg.model.arch})") from None
    settings.check_model(model)
    step = int(job.state.get("step", 0))
    steps_per_epoch = max(1, recorder.info.train_size // (cfg.data.batch_size * int(job.state.get("world_size", 1))
                                                           * cfg.optim.grad_accum))
    return recorder.record(model, step, step / steps_per_epoch, progress)


def _dataset(cfg: Config) -> str:
    if cfg.data.backend == "synthetic":
        return "synthetic"
    return Path(cfg.data.path).name if cfg.data.path else cfg.data.bundled


def _hparams(cfg: Config) -> dict[str, Any]:
    """The hyperparameters the generalisation study varies (width and depth as configured: 0 is
    the arch's default)."""
    return {"lr": cfg.optim.lr, "batch_size": cfg.data.batch_size, "weight_decay": cfg.optim.weight_decay,
            "optimizer": cfg.optim.name, "preconditioner": cfg.optim.preconditioner, "arch": cfg.model.arch,
            "width": cfg.model.width, "depth": cfg.model.depth, "epochs": cfg.train.epochs, "seed": cfg.train.seed}


__all__ = ["Job", "Recorder", "Request", "Settings", "analyze", "check"]
