"""The SPMD training loop: every rank runs this same code on its shard of each global batch."""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app import config as config_mod
from app.bayes.builder import Sampling, build_bayes_optimizer
from app.bayes.grid import SampleGrid
from app.bayes.posterior import Dropout, Point, Posterior
from app.bayes.posterior import save as save_posterior
from app.checkpoint import REQUEUE_EXIT, Checkpointer, StopSignal
from app.checkpoint import load as load_checkpoint
from app.comm import Comm
from app.comm.grad_sync import GradientAverager
from app.config import Config
from app.data import build_loaders
from app.errors import CheckpointError, Diverged
from app.launch import World
from app.metrics import Metrics, Summary
from app.models import build_model
from app.optim import build_criterion, build_momentum, build_optimizer, build_schedule
from app.optim.averaging import TailAverage
from app.storage import full_disk_as_error

log = logging.getLogger(__name__)


class Requeue(SystemExit):
    """Raised after a signal-triggered checkpoint; exits with the code job scripts requeue on."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT)


class LossWatch:
    """``train.divergence_factor``'s rule on the rank-averaged step loss; every rank feeds it the same values.

    The median of the last ``WINDOW`` steps (of all of them from the third step on, while fewer) rather
    than the step loss, so a few bad batches of a noisy small-batch run cannot trip it, while an
    explosion in the first steps is still measured against the loss at the start; and it must exceed
    the first median as well as ``factor`` x the best, so a well-trained model whose loss is tiny is not
    "diverged" by noise of a few hundredths.
    """

    WINDOW, FIRST = 9, 3

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=self.WINDOW)
        self.first: float | None = None
        self.best = math.inf

    def check(self, step: int, loss: float, weights_finite: bool = True) -> None:
        """Raise ``Diverged`` when ``loss`` (of optimiser step ``step``) or the weights that step made are
        non-finite, or the median exploded."""
        if not (math.isfinite(loss) and weights_finite):
            what = "is not finite" if not math.isfinite(loss) else "but the weights it led to are not finite"
            raise Diverged(f"training diverged at step {step}: loss {loss:.3g} {what}; no checkpoint written")
        self.recent.append(loss)
        if len(self.recent) < self.FIRST:
            return
        median = statistics.median(self.recent)
        self.first = median if self.first is None else self.first
        self.best = min(self.best, median)
        if self.factor > 0 and median > max(self.factor * self.best, self.first):
            raise Diverged(f"training diverged at step {step}: loss {loss:.3g} (median of the last "
                           f"{len(self.recent)} steps {median:.3g}) > {self.factor:g} x best {self.best:.3g} "
                           f"(train.divergence_factor); no checkpoint written")


@dataclass
class _Position:
    step: int = 0


def _broadcast_text(comm: Comm, text: str) -> str:
    """Rank 0's string on every rank (run directory names must agree)."""
    buf = torch.zeros(1024, dtype=torch.uint8, device=comm.device)
    raw = text.encode()[:1024]
    if comm.rank == 0:
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    comm.broadcast(buf, root=0, name="setup")
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def make_run_dir(cfg: Config, comm: Comm) -> Path:
    run_dir = Path(cfg.output.dir) / _broadcast_text(comm, config_mod.run_name(cfg))
    if comm.rank == 0:
        with full_disk_as_error(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, run_dir / "config.yaml")
    comm.barrier()
    return run_dir


def autocast_for(cfg: Config, device: torch.device) -> Any:
    if cfg.train.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_scale(scaler: torch.amp.GradScaler) -> float:
    """The factor ``scaler`` multiplies the loss by before backward (1 when fp16 scaling is off)."""
    return scaler.get_scale() if scaler.is_enabled() else 1.0


def loss_precision(out: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (autocast may give bf16/fp16; float64 stays)."""
    return out.to(torch.promote_types(out.dtype, torch.float32))


def sample_passes(sampler: Sampling | None, grid: SampleGrid, device: torch.device, seed: int,
                  step: int) -> Iterator[AbstractContextManager[None]]:
    """One micro-batch's forward/backward contexts at ``step``: one per weight sample of this rank, or one
    no-op for a point-estimate optimiser. Fresh generators on every call, so sample j is the same weights
    in every micro-batch of the step; each context is made only once the previous one has exited.
    ``spngd bench`` steps through this too, so it times what training runs."""
    if sampler is None:
        yield nullcontext()
        return
    for generator in grid.generators(device, seed, step):
        yield sampler.sampled_params(generator)


def _accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits, valid count), ignoring padded entries (label -1)."""
    valid = labels >= 0
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return ((hits[:, 0] & valid).sum(), (hits.any(dim=1) & valid).sum(), valid.sum())


class Trainer:
    """Owns the model, optimiser, preconditioner and loaders of one run."""

    def __init__(self, cfg: Config, world: World, comm: Comm, device: torch.device) -> None:
        self.cfg, self.world, self.comm, self.device = cfg, world, comm, device
        self.dtype = getattr(torch, cfg.train.dtype)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        # Data x Monte-Carlo-sample grid: ranks of different sample groups read the same shards.
        self.grid = SampleGrid(comm.size, comm.rank, cfg.bayes.mc_groups, cfg.bayes.samples)
        self.train_loader, self.val_loader, self.info = build_loaders(
            cfg, self.grid.data_rank, self.grid.data_size, device, seed=cfg.train.seed)
        try:
            self.model = build_model(cfg.model, self.info.num_classes, self.info.input_shape)
        except ValueError as exc:  # the model does not fit the data, e.g. model.num_classes too small
            raise config_mod.ConfigError(str(exc)) from None
        self.model.to(device=device, dtype=self.dtype)
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            comm.broadcast(tensor.data, root=0, name="setup")
        self.criterion = build_criterion(cfg.optim)
        self.accum = cfg.optim.grad_accum
        self.global_batch = cfg.data.batch_size * self.grid.data_size * self.accum  # distinct images
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise config_mod.ConfigError(
                f"config: data.batch_size={cfg.data.batch_size} x {self.grid.data_size} data ranks x optim.grad_accum="
                f"{self.accum} leaves no full step in an epoch of {self.info.train_size} images")
        self.total_steps = max(1, round(cfg.train.epochs * self.steps_per_epoch))
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.kfac = None
        if cfg.optim.preconditioner == "kfac" or cfg.optim.name == "noisy_kfac":
            from app.kfac import KFAC
            self.kfac = KFAC(self.model, cfg.kfac, comm if comm.size > 1 else None, seed=cfg.train.seed,
                             steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        self.ngd = None
        if cfg.optim.preconditioner == "ngd_dual":
            from app.analysis.ngd_dual import NGDDual
            self.ngd = NGDDual(self.model, comm, cfg.optim.ngd_damping, cfg.optim.ngd_matrix)
        self.analysis = None
        if cfg.analysis.every_epochs > 0:  # checked here, before the first step, not at the first record
            from app.analysis.analyze import Settings
            self.analysis = Settings.from_config(cfg.analysis).check()
            self.analysis.check_model(self.model)
        self.optimizer: torch.optim.Optimizer
        if cfg.optim.name in config_mod.BAYESIAN_OPTIMISERS:
            self.optimizer = build_bayes_optimizer(
                self.model, cfg, comm, train_images=self.info.train_size, global_batch=self.global_batch,
                steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps, kfac=self.kfac)
        else:
            self.optimizer = build_optimizer(self.model, cfg.optim, self.global_batch)
        self.sampler = self.optimizer if isinstance(self.optimizer, Sampling) else None
        self.schedule = build_schedule(self.optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        self.momentum = build_momentum(self.optimizer, cfg.optim, self.schedule, self.steps_per_epoch,
                                       self.total_steps)
        self.tail = TailAverage(self.model, cfg.optim.tail_average, self.total_steps) \
            if cfg.optim.tail_average > 0 else None
        # VOGN averages gradients and their squares itself, in one collective
        self.averager = None if getattr(self.optimizer, "reduces_gradients", False) else \
            GradientAverager(self.model, comm, bucket_mb=cfg.comm.bucket_mb)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        # Per-rank global stream, checkpointed, for model code that draws from it (dropout); the loaders
        # and K-FAC's mc labels draw from generators of their own, so nothing else shifts it.
        torch.manual_seed(cfg.train.seed * 100_003 + comm.rank + 1)
        self._bn_stats = _running_stats(self.model)
        self.pos = _Position()
        self._watched = [t for t in [*self.model.parameters(), *self.model.buffers()] if t.is_floating_point()]
        # unreadable images replaced so far, summed over ranks at each metrics log / validation
        self.skipped_images: dict[str, int] = {"train": 0, "val": 0}

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """Everything a resume needs, on rank 0 (the writer); collective, None on the other ranks.

        Per rank: the RNG state and the BatchNorm running statistics (``batchnorm``, flat), gathered
        to rank 0 only; ``model`` holds the ranks' average of the latter, computed there, what a
        resume on another world size or any use of the weights alone gets (see ``sync_batchnorm``).
        """
        one_each = [1] * self.comm.size  # equal parts: no length exchange
        rng = self.comm.gather(torch.get_rng_state().to(self.device)[None], 0, name="checkpoint",
                               lengths=one_each)
        bn_parts = None
        if self._bn_stats:
            flat = torch.cat([t.reshape(-1) for t in self._bn_stats.values()])
            bn_parts = self.comm.gather(flat[None], 0, name="checkpoint", lengths=one_each)
        kfac = self.kfac.state_dict() if self.kfac is not None else {}
        optimizer = self.optimizer.state_dict()  # collective for VOGN (its state lives on the layers' owners)
        if rng is None or kfac is None:
            return None
        model = self.model.state_dict()
        bn = [part[0].cpu() for part in bn_parts] if bn_parts is not None else []
        if bn:
            model.update(_unflatten(torch.stack(bn).mean(0), self._bn_stats))
        return {
            "step": self.pos.step,
            "world_size": self.comm.size,
            "model": model,
            "batchnorm": bn,
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "kfac": kfac,
            "posterior": self.posterior().export(),  # every rank holds it: built on the writer only
            "tail_average": self.tail.state_dict() if self.tail is not None else {},
            "rng": [r[0].cpu().clone() for r in rng],  # own storage: set_rng_state needs offset 0
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same_size = state["world_size"] == self.comm.size
        if not same_size:
            log.warning("checkpoint was written by %d ranks, resuming on %d: per-rank random streams "
                        "restart, BatchNorm statistics start from the ranks' average", state["world_size"],
                        self.comm.size)
        self.model.load_state_dict(state["model"])
        if same_size and state.get("batchnorm"):  # absent in checkpoints written before it was saved
            with torch.no_grad():
                for key, value in _unflatten(state["batchnorm"][self.comm.rank], self._bn_stats).items():
                    self._bn_stats[key].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.kfac is not None and state["kfac"]:
            self.kfac.load_state_dict(state["kfac"])
        if self.tail is not None and state.get("tail_average"):
            self.tail.load_state_dict(state["tail_average"])
        if same_size:
            torch.set_rng_state(state["rng"][self.comm.rank].clone())
        self.pos.step = state["step"]

    # -- loop ------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The ``accum`` micro-batches of each step from the current position to the end."""
        while self.pos.step < self.total_steps:
            epoch, in_epoch = divmod(self.pos.step, self.steps_per_epoch)
            it = self.train_loader.epoch(epoch, start_batch=in_epoch * self.accum)
            for _ in range(in_epoch, self.steps_per_epoch):
                group = [next(it) for _ in range(self.accum)]
                yield group
                if self.pos.step >= self.total_steps:
                    return

    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """Train from the current position to the end, one optimiser step per item: yields this
        rank's (loss, accuracy, seconds waited for data). ``run`` adds logging, validation and
        checkpoints around it; experiments can drive it directly and stop early."""
        batches = self._micro_batches()
        while self.pos.step < self.total_steps:
            waited = time.monotonic()
            group = next(batches)
            waited = time.monotonic() - waited
            loss, acc = self._train_step(group)
            self.pos.step += 1
            yield loss, acc, waited

    def _train_step(self, group: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.pos.step
        lr = self.schedule.set_step(step)
        if self.momentum is not None:
            self.momentum.set_step(step)
        samples = self.grid.samples if self.sampler is not None else 1
        if self.kfac is not None:  # one fisher_backward per (micro-batch, sample) pass
            self.kfac.begin_step(step, micro_batches=len(group) * samples, loss_scale=loss_scale(self.scaler))
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        hits = torch.zeros((), device=self.device, dtype=torch.float64)
        shares = self.accum * samples  # (micro-batch, sample) pairs the step's gradient averages over
        for i, (x, y) in enumerate(group):
            x = x.to(self.dtype)
            if self.cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for k, sampled in enumerate(sample_passes(self.sampler, self.grid, self.device, self.cfg.train.seed, step)):
                last = i == len(group) - 1 and k == samples - 1
                with self._sync(last), sampled:
                    with autocast_for(self.cfg, self.device):
                        out = self.model(x)
                        loss = self.criterion(loss_precision(out), y) / shares
                    if self.kfac is not None:
                        self.kfac.fisher_backward(out)
                    self.scaler.scale(loss).backward()
                loss_sum += loss.detach().double()
                hits += (out.detach().argmax(1) == y).sum().double()
        if self.averager is not None:
            self.averager.wait()
        self.scaler.unscale_(self.optimizer)
        if self.kfac is not None and not getattr(self.optimizer, "calls_kfac", False):
            self.kfac.step(lr)  # noisy K-FAC calls it in its step, after adding the prior term
        if self.ngd is not None:  # loss gradient only: the optimiser adds weight decay afterwards
            self.ngd.precondition(*group[0])  # optim.grad_accum=1: the step's one micro-batch
        self.scaler.step(self.optimizer)
        if self.tail is not None:
            self.tail.update(step + 1)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, hits / (shares * group[0][1].shape[0])

    def _sync(self, last: bool) -> AbstractContextManager[None]:
        return self.averager.sync(last) if self.averager is not None else nullcontext()

    def posterior(self) -> Posterior:
        """What the run's weights mean (local: every rank holds all of it): the optimiser's posterior,
        MC-dropout when the model has dropout, else the point estimate the model holds."""
        if hasattr(self.optimizer, "posterior"):
            return self.optimizer.posterior()  # type: ignore[no-any-return,unused-ignore]
        return Dropout() if self.cfg.model.dropout > 0 else Point()

    def sync_batchnorm(self) -> None:
        """Average the BatchNorm running statistics over the ranks into every rank's model.

        Each rank's statistics come from its own batches, so they differ; averaging (not
        broadcasting rank 0's) uses every rank's batches, and validation then scores one model.
        Called at every validation, the end included, and never because a checkpoint is written:
        an interrupted run (checkpoint at the signal) and an uninterrupted one sync at the same
        steps and stay bitwise equal (checkpoints keep each rank's own statistics). The running
        averages are linear, so syncing does not change where they go, only the rounding. Cost: one
        fused allreduce of 2 floats per BN channel per validation (ResNet-50: 53k floats, 0.2 MB).
        """
        if self.comm.size > 1 and self._bn_stats:
            self.comm.grouped_allreduce(list(self._bn_stats.values()), op="avg", name="batchnorm")

    def validate(self) -> tuple[float, float, float]:
        """(loss, top-1, top-5) over the whole validation set, each image counted once, with the
        ranks' averaged BatchNorm statistics (``sync_batchnorm``)."""
        self.sync_batchnorm()
        self.model.eval()
        totals = torch.zeros(5, device=self.device, dtype=torch.float64)
        with torch.no_grad(), autocast_for(self.cfg, self.device):
            for x, y in self.val_loader.epoch(0):
                x = x.to(self.dtype)
                if self.cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out = loss_precision(self.model(x))
                loss = nn.functional.cross_entropy(out, y, ignore_index=-1, reduction="sum")
                top1, top5, count = _accuracy_counts(out, y)
                totals[:4] += torch.stack([loss.double(), top1.double(), top5.double(), count.double()])
        totals[4] = self.val_loader.skipped / self.grid.groups  # summed over ranks by the same allreduce
        self.comm.allreduce(totals, op="sum", name="validation")
        self.skipped_images["val"] = round(totals[4].item())
        self.model.train()
        images = max(totals[3].item(), 1.0)
        return totals[0].item() / images, totals[1].item() / images, totals[2].item() / images

    def _due(self, every_epochs: float, step: int) -> bool:
        """Whether ``step`` ends a period of ``every_epochs`` (0 = never) before the last step, which
        validates and measures anyway."""
        if every_epochs <= 0:
            return False
        period = max(1, round(every_epochs * self.steps_per_epoch))
        return step % period == 0 and step < self.total_steps

    def _recorder(self, run_dir: Path) -> Callable[[int], float]:
        """``measure(step)`` records the spectra (``analysis`` section) and returns the seconds it
        took, which the throughput figures leave out; a no-op when analysis is off."""
        if self.analysis is None:
            return lambda step: 0.0
        from app.analysis.analyze import Recorder

        db = Path(self.cfg.analysis.db) if self.cfg.analysis.db else run_dir / "curvature.sqlite"
        recorder = Recorder(self.cfg, self.analysis, db, run_dir.name, self.comm, self.device)

        def progress(line: str) -> None:
            if self.comm.rank == 0:
                log.info("%s", line)

        def measure(step: int) -> float:
            started = time.monotonic()
            self.sync_batchnorm()
            recorder.record(self.model, step, step / self.steps_per_epoch, progress)
            return time.monotonic() - started

        return measure

    def run(self, run_dir: Path) -> Summary:
        cfg, comm = self.cfg, self.comm
        ckpt = Checkpointer(run_dir, cfg.checkpoint.keep)
        if cfg.checkpoint.resume:
            self._resume(ckpt)
        measure = self._recorder(run_dir)
        if self.pos.step == 0:
            measure(0)  # the initial weights: spectra over training start here
        analysis_s = 0.0  # within the timed loop
        metrics = None
        if comm.rank == 0:
            extra = (("momentum",) if self.momentum is not None else ()) + (
                tuple(self.kfac.stats) if self.kfac is not None else ())
            bar = {"bar": True, "lines": False}.get(cfg.output.progress,
                                                   self.world.launcher == "single" and sys.stdout.isatty())
            metrics = Metrics(run_dir, self.total_steps, tensorboard=cfg.output.tensorboard, bar=bar,
                              extra_fields=extra)
            if self.kfac is not None:
                self.kfac.trace_layers(run_dir / "kfac_layers.csv")
            log.info("run %s: %d ranks, global batch %d, %d steps/epoch, %d steps", run_dir, comm.size,
                     self.global_batch, self.steps_per_epoch, self.total_steps)
        watch = LossWatch(cfg.train.divergence_factor)
        stop = StopSignal()
        stop.install()
        self.model.train()
        t0 = time.monotonic()
        window_t, window_imgs, data_s, trained_imgs = time.monotonic(), 0, 0.0, 0
        loss_acc = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss, accuracy, skipped images
        val: tuple[float, float, float] | None = None
        try:
            for loss, acc, waited in self.steps():
                data_s += waited
                loss_acc[:2] += torch.stack([loss, acc])
                imgs = self.global_batch
                window_imgs += imgs
                trained_imgs += imgs
                step = self.pos.step
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    # the average makes it the sum over the shards (each read by mc_groups ranks)
                    loss_acc[2] = self.train_loader.skipped * self.grid.data_size
                    self.comm.allreduce(loss_acc, op="avg", name="metrics")
                    self.skipped_images["train"] = round(loss_acc[2].item())
                    n_logged = cfg.train.log_every if step % cfg.train.log_every == 0 else step % cfg.train.log_every
                    elapsed = time.monotonic() - window_t
                    if metrics is not None:
                        row = {"kind": "train", "step": step, "epoch": step / self.steps_per_epoch,
                               "loss": loss_acc[0].item() / n_logged, "top1": loss_acc[1].item() / n_logged,
                               "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": window_imgs / elapsed,
                               "data_s": data_s, "step_s": elapsed / n_logged,
                               "skipped_images": self.skipped_images["train"]}
                        if self.momentum is not None:
                            row["momentum"] = self.optimizer.param_groups[0]["momentum"]
                        if self.kfac is not None:
                            row.update(self.kfac.stats)
                        metrics.log(row)
                    loss_acc.zero_()
                    window_t, window_imgs, data_s = time.monotonic(), 0, 0.0
                stop_now, mean_loss, finite = self._stop_agreed(stop, loss)
                watch.check(step, mean_loss, finite)  # before any checkpoint of this step
                if self._due(cfg.train.val_every, step):
                    val = self._log_val(metrics, step)
                if self.analysis is not None and self._due(cfg.analysis.every_epochs, step):
                    spent = measure(step)
                    analysis_s += spent
                    window_t += spent
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    self._save(ckpt)
                if stop_now:
                    self._save(ckpt)
                    if comm.rank == 0:
                        log.warning("signal received: checkpoint written at step %d, exiting with %d",
                                    step, REQUEUE_EXIT)
                    raise Requeue()
            train_time = time.monotonic() - t0 - analysis_s
            if self.tail is not None:
                self.tail.apply()  # the final validation, checkpoint and posterior.pt use the average
            val = self._log_val(metrics, self.pos.step)
            self._save(ckpt)
            measure(self.pos.step)  # after the checkpoint: the spectra are of the weights it holds
        finally:
            stop.uninstall()
            if metrics is not None:
                plot = metrics.close(plot=cfg.output.plot)
                if plot is not None:
                    log.info("plot: %s", plot)
        return Summary(val_top1=val[1], val_loss=val[0], epochs=math.ceil(self.pos.step / self.steps_per_epoch),
                       steps=self.pos.step, time_s=train_time, img_per_s=trained_imgs / max(train_time, 1e-9),
                       run_dir=run_dir, skipped_images=sum(self.skipped_images.values()))

    def _log_val(self, metrics: Metrics | None, step: int) -> tuple[float, float, float]:
        loss, top1, top5 = self.validate()
        if metrics is not None:
            metrics.log({"kind": "val", "step": step, "epoch": step / self.steps_per_epoch,
                         "loss": loss, "top1": top1, "top5": top5,
                         "skipped_images": self.skipped_images["val"]})
        return loss, top1, top5

    def _stop_agreed(self, stop: StopSignal, loss: torch.Tensor) -> tuple[bool, float, bool]:
        """One small allreduce per step, so all ranks take the same stop decisions: whether any rank got a
        signal, the step loss averaged over the ranks (non-finite when any rank's is), and whether the
        weights and buffers the step left are finite on every rank (the loss only vouches for the
        weights before the step, and a checkpoint holds those after it)."""
        finite = torch.isfinite(nn.utils.get_total_norm(self._watched, norm_type=math.inf))  # fused max |x|
        packed = torch.stack([torch.tensor(1.0 if stop.received else 0.0, dtype=torch.float64, device=self.device),
                              loss.to(device=self.device, dtype=torch.float64), (~finite).to(torch.float64)])
        flag, total, broken = self.comm.allreduce(packed, op="sum", name="signal").tolist()
        return flag > 0, total / self.comm.size, broken == 0

    def _save(self, ckpt: Checkpointer) -> None:
        state = self.state_dict()  # collective: every rank calls it, rank 0 gets the state
        if state is not None:
            path = ckpt.save(state, self.pos.step)
            log.info("checkpoint: %s", path)
        self.comm.barrier()

    def _resume(self, ckpt: Checkpointer) -> None:
        which = self.cfg.checkpoint.resume
        if which == "auto":
            found = ckpt.load_latest()
            if found is None:
                if self.comm.rank == 0:
                    log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt.dir)
                return
            state, path = found
        else:
            path = Path(which)
            state = load_checkpoint(path)
        self._check_fits(state, path)
        self.load_state_dict(state)
        if self.comm.rank == 0:
            log.info("resumed from %s at step %d", path, self.pos.step)

    def _check_fits(self, state: dict[str, Any], path: Path) -> None:
        """One line when ``state`` cannot continue this run (another program, model or optimiser), instead
        of load_state_dict's list of every mismatched key."""
        absent = [k for k in ("step", "world_size", "model", "optimizer", "schedule", "scaler", "kfac", "rng")
                  if k not in state]
        if absent or not isinstance(state["model"], dict):
            raise CheckpointError(f"checkpoint {path} was not written by spngd train (it has no "
                                  f"{absent[0] if absent else 'model state dict'!r})")
        saved = state.get("config")
        for section, key in (("model", "arch"), ("optim", "name")):
            was = saved.get(section, {}).get(key) if isinstance(saved, dict) else None
            now = getattr(getattr(self.cfg, section), key)
            if was is not None and was != now:
                raise CheckpointError(f"checkpoint {path} was written for {section}.{key}={was} (its config), "
                                      f"this run has {section}.{key}={now}")
        own, theirs = self.model.state_dict(), state["model"]
        missing = [k for k in own if k not in theirs]
        unexpected = [k for k in theirs if k not in own]
        if missing or unexpected:
            first = f"first missing: {missing[0]}" if missing else f"first unexpected: {unexpected[0]}"
            raise CheckpointError(f"checkpoint {path} does not fit this {self.cfg.model.arch}: {len(missing)} "
                                  f"tensors missing, {len(unexpected)} unexpected ({first})")
        for k, tensor in own.items():
            other = theirs[k]
            if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
                shape = list(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
                raise CheckpointError(f"checkpoint {path} does not fit this run: {k} is {shape} there, "
                                      f"{list(tensor.shape)} here (model.num_classes or the data differ?)")


def _running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every normalisation layer's running mean and variance by state-dict key: the model state that
    differs between ranks (``num_batches_tracked`` counts steps, the same on every rank)."""
    stats = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None and m.running_var is not None:
            stats[f"{name}.running_mean".lstrip(".")] = m.running_mean
            stats[f"{name}.running_var".lstrip(".")] = m.running_var
    return stats


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``flat`` (the tensors of ``like`` concatenated) cut back into tensors of their shapes."""
    return {k: v.view_as(t) for (k, t), v in zip(like.items(), flat.split([t.numel() for t in like.values()]))}


def train(cfg: Config, world: World, comm: Comm, device: torch.device) -> Summary:
    """Run one training job; returns the summary that rank 0 prints (K-FAC lines, then the FINAL line)
    and writes to ``summary.json``."""
    trainer = Trainer(cfg, world, comm, device)
    run_dir = make_run_dir(cfg, comm)
    summary = trainer.run(run_dir)
    if trainer.kfac is not None:
        summary.kfac = trainer.kfac.summary()
    if comm.rank == 0:
        save_posterior(trainer.posterior(), run_dir / "posterior.pt")
        summary.save(run_dir / "summary.json")
    return summary
