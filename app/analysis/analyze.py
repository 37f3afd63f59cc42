"""``spngd analyze``: the spectra of a trained network's information matrices into the database.

Every rank holds a contiguous shard of the first ``examples`` training images (file order, the
validation transform: the training set as a measurement sees it, with no augmentation), so the
products of large models spread over the job. Rank 0 owns the database: it says which
(matrix, approximation) pairs are already stored for this (run, step, seed) — a killed analysis
run again continues where it stopped — and writes one row per result as soon as it is computed.
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
from app.analysis.db import SpectrumRow, git_commit, open_db
from app.analysis.operators import MATRICES, Curvature
from app.analysis.spectra import APPROXIMATIONS, ESTIMATORS, HESSIAN_DIAG_LIMIT, KFAC_MATRICES, spectrum
from app.checkpoint import Checkpointer
from app.checkpoint import load as load_checkpoint
from app.comm.base import Comm
from app.config import Config
from app.data import PAD, build_loaders
from app.errors import CheckpointError, UserError
from app.models import build_model

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Request:
    """What to analyse; ``check`` turns it into a ``Job`` or one ``UserError`` line."""

    db: Path
    run: Path | None = None  # a run directory: its config.yaml and newest verified checkpoint
    config: Path | None = None  # or a config file and ``checkpoint``
    checkpoint: Path | None = None
    matrices: Sequence[str] = ("ggn",)
    approximations: Sequence[str] = ("full",)
    top_k: int = 10
    estimator: str = "auto"
    examples: int = 256
    seed: int = 0
    tolerance: float = 1e-6
    trace_samples: int = 30


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


def check(req: Request) -> Job:
    """Validate every argument and load the run (no collective yet)."""
    _choices("matrix", req.matrices, MATRICES)
    _choices("approximation", req.approximations, APPROXIMATIONS)
    if req.estimator not in ESTIMATORS:
        raise UserError(f"analyze: unknown estimator {req.estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if req.top_k < 1 or req.examples < 1 or req.trace_samples < 1:
        raise UserError("analyze: --top-k, --examples and --trace-samples must be positive integers")
    if not 0 < req.tolerance < 1:
        raise UserError(f"analyze: --tolerance={req.tolerance} must be in (0, 1)")
    if req.estimator == "dual" and "hessian" in req.matrices:
        raise UserError("analyze: the estimator dual needs a Gram matrix; the Hessian has none (use auto)")
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
    sums = torch.zeros(3, dtype=torch.float64)
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


def analyze(job: Job, comm: Comm, device: torch.device, progress: Callable[[str], None] | None = None) -> int:
    """Compute and store every requested (matrix, approximation) not yet in the database
    (collective); returns the rows written (on every rank)."""
    req, cfg = job.request, job.cfg
    dtype = getattr(torch, cfg.train.dtype)
    train, val, info = build_loaders(cfg, 0, 1, device, seed=cfg.train.seed, eval_train=True)
    try:
        model = build_model(cfg.model, info.num_classes, info.input_shape).to(device=device, dtype=dtype)
        model.load_state_dict(job.state["model"])
    except (ValueError, RuntimeError):
        raise CheckpointError(f"checkpoint {job.checkpoint} does not fit the run's model ({cfg.model.arch})") from None
    model.eval()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if "hessian" in req.matrices and "diag" in req.approximations and params > HESSIAN_DIAG_LIMIT:
        raise UserError(f"analyze: the exact Hessian diagonal takes one product per parameter ({params}); "
                        "leave diag out for the Hessian's run or use --approx full,block")
    step = int(job.state.get("step", 0))
    steps_per_epoch = max(1, info.train_size // (cfg.data.batch_size * int(job.state.get("world_size", 1))
                                                  * cfg.optim.grad_accum))
    x_all, y_all = _images(train, None)
    xv, yv = _images(val, None)
    part, vpart = _shard(len(x_all), comm.rank, comm.size), _shard(len(xv), comm.rank, comm.size)
    train_loss, train_acc = _loss_acc(model, x_all[part].to(dtype), y_all[part], comm, cfg.data.batch_size)
    val_loss, val_acc = _loss_acc(model, xv[vpart].to(dtype), yv[vpart], comm, cfg.data.batch_size)
    n = min(req.examples, len(x_all))
    mine = _shard(n, comm.rank, comm.size)
    run = job.run_name
    pairs = [(m, a) for m in req.matrices for a in req.approximations if a != "kfac" or m in KFAC_MATRICES]
    todo = torch.ones(len(pairs), dtype=torch.int64)
    db = open_db(req.db) if comm.rank == 0 else None
    if db is not None:
        for i, (m, a) in enumerate(pairs):
            todo[i] = 0 if db.has(run, step, m, a, None, req.seed) else 1
    comm.broadcast(todo, root=0, name="analyze_todo")
    commit = git_commit(REPO) if comm.rank == 0 else ""
    written = 0
    try:
        for (matrix, approximation), due in zip(pairs, todo.tolist()):
            if not due:
                if progress:
                    progress(f"analyze: {matrix}/{approximation} already in {req.db}, skipped")
                continue
            started = time.perf_counter()
            curv = Curvature(model, x_all[mine].to(dtype), y_all[mine], matrix, comm, total=n, offset=mine.start,
                             seed=req.seed, chunk=cfg.data.batch_size)
            s = spectrum(curv, approximation, req.top_k, req.estimator, tol=req.tolerance, seed=req.seed,
                         trace_samples=req.trace_samples)
            seconds = time.perf_counter() - started
            if db is not None:
                db.insert(SpectrumRow(
                    run=run, step=step, epoch=step / steps_per_epoch, dataset=_dataset(cfg), model=cfg.model.arch,
                    matrix=matrix, approximation=approximation, estimator=s.estimator, k=s.k,
                    eigenvalues=tuple(s.eigenvalues), trace=s.trace, trace_estimator=s.trace_estimator,
                    tolerance=s.tolerance, seed=s.seed, examples=n, train_loss=train_loss, train_acc=train_acc,
                    val_loss=val_loss, val_acc=val_acc, params=params,
                    hparams=_hparams(cfg), git_commit=commit, seconds=seconds))
            written += 1
            if progress:
                top = ", ".join(f"{v:.4g}" for v in s.eigenvalues[:3])
                progress(f"analyze: {matrix}/{approximation} [{s.estimator}] top {top} trace {s.trace:.4g} "
                         f"({s.products} products, {seconds:.1f} s)")
    finally:
        if db is not None:
            db.close()
    return written


def _dataset(cfg: Config) -> str:
    if cfg.data.backend == "synthetic":
        return "synthetic"
    return Path(cfg.data.path).name if cfg.data.path else cfg.data.bundled


def _hparams(cfg: Config) -> dict[str, Any]:
    """The hyperparameters the generalisation study varies."""
    return {"lr": cfg.optim.lr, "batch_size": cfg.data.batch_size, "weight_decay": cfg.optim.weight_decay,
            "optimizer": cfg.optim.name, "preconditioner": cfg.optim.preconditioner, "arch": cfg.model.arch,
            "epochs": cfg.train.epochs, "seed": cfg.train.seed}


__all__ = ["Job", "Request", "analyze", "check"]
