"""Generalisation measures of trained networks, and how well each predicts the generalisation gap.

``snapshot_norms`` measures one network on the analysis examples (collective, like the operators):
the non-curvature baselines (parameter norm, path norm), the Fisher-Rao norm and the PAC-Bayes
flatness; ``app.analysis.analyze`` stores them in the database's ``snapshots`` table beside the
spectra. ``measure_table`` then ranks the models of the database by each measure and by their gap
(Jiang et al. 2020, "Fantastic generalization measures and where to find them", sec. 2-3): Kendall's
tau over all models, and the granulated coefficient Psi that compares only models differing in one
hyperparameter. ``plot_spectra`` draws the stored spectra over training.

PAC-Bayes flatness (Jiang et al.'s ``pacbayes.flatness``, their eq. for the PAC-Bayesian sharpness
measures): 1 / sigma'^2 with sigma' the largest sigma such that the expected training accuracy
under isotropic Gaussian weight noise u ~ N(0, sigma^2 I) on every trainable parameter drops by at
most ``PACBAYES_DROP`` = 0.1 from the unperturbed accuracy. Followed: the definition, the 0.1
deviation, ``PACBAYES_DRAWS`` = 10 Monte-Carlo draws and a 15-step search, as in the reference code
of Dziugaite et al. 2020 (robust-generalization-measures), which adapts Jiang et al.'s. Deviations,
each for a reason:

* the search bisects log sigma over [``SIGMA_MIN``, ``SIGMA_MAX``] = [1e-6, 1e2] (the reference:
  sigma itself over [0, 2]), so the resolution is relative (a factor exp(ln(1e8) / 2^15) =
  1 + 5.6e-4) whatever the weights' scale, and it runs all 15 steps instead of stopping when the
  deviation is within 0.01 of 0.1: the result is the largest sigma tested that satisfies the
  inequality, so it always does (on the Monte-Carlo estimate) and the next one tested, at most that
  factor above, does not. A network that keeps the inequality even at ``SIGMA_MAX`` gets
  ``SIGMA_MAX``; one that breaks it at ``SIGMA_MIN`` gets ``SIGMA_MIN``;
* the drop is one-sided (acc0 - E acc <= 0.1; the reference bounds |acc0 - E acc|), as the
  definition bounds the loss of accuracy, not a gain;
* common random numbers: draw m is sigma z_m with z_m standard normal from the stream (seed, m),
  the same z_m at every sigma, so the estimated E acc(sigma) is one fixed function of sigma and the
  bisection's comparisons do not contradict one another through Monte-Carlo noise. (The noise has
  standard deviation sigma, the paper's N(0, sigma^2 I); the reference's ``torch.normal(0,
  sigma**2)`` draws with standard deviation sigma^2.)
* the accuracies are over the N analysis examples (a prefix of the training set), not the whole
  training set; BatchNorm keeps its running statistics (eval mode), only parameters are perturbed.

Every rank draws the same z_m (a CPU generator seeded from (seed, m) alone) and the correct counts
are summed over the ranks by one allreduce a sigma, integers in float64: the search takes the same
steps on every rank and for any number of ranks.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau  # type: ignore[import-untyped]
from torch import Tensor, nn
from torch.func import functional_call

from app.analysis.db import Database, SnapshotRow, SpectrumRow
from app.analysis.operators import MATRICES, Curvature
from app.analysis.spectra import APPROXIMATIONS
from app.comm.base import Comm
from app.errors import UserError
from app.metrics import pyplot, save_figure

PACBAYES_DROP = 0.1
PACBAYES_DRAWS = 10
PACBAYES_STEPS = 15
SIGMA_MIN, SIGMA_MAX = 1e-6, 1e2
NEFF_RATIO = 0.1
"""z of the effective dimension as a fraction of the model's lambda_max (see ``measure_table``)."""
MIN_MODELS = 2


# -- one network -------------------------------------------------------------------------------

def snapshot_norms(model: nn.Module, x: Tensor, y: Tensor, comm: Comm, *, total: int, seed: int,
                   chunk: int = 256) -> dict[str, float]:
    """The ``snapshots`` table's measures of ``model`` on this rank's shard ``(x, y)`` of the ``total``
    analysis examples (collective: every rank calls it alike and gets the same numbers):

    * ``param_norm``: the L2 norm of all trainable parameters;
    * ``path_norm``: ``path_norm(model, x.shape[1:])``;
    * ``fisher_rao_norm``: theta^T F theta with F the exact Fisher (= the GGN) over the examples, one
      ``Curvature(..., "ggn")`` product; Liang et al. 2019 define the Fisher-Rao norm by this square;
    * ``pacbayes_sigma``: sigma' of the PAC-Bayes flatness (module docstring), ``pacbayes_flatness``
      = 1 / sigma'^2.

    The model is evaluated in eval mode and left in the mode it came in.
    """
    training = model.training
    try:
        curv = Curvature(model, x, y, "ggn", comm, total=total, chunk=chunk)  # puts the model in eval mode
        theta = curv.flatten(curv.params)
        sigma = pacbayes_sigma(model, curv.inputs, curv.targets, comm, total=total, seed=seed, chunk=chunk)
        return {
            "param_norm": float(theta.double().norm()),
            "path_norm": path_norm(model, tuple(x.shape[1:])),
            "fisher_rao_norm": float(theta @ curv.matvec(theta)),
            "pacbayes_sigma": sigma.sigma,
            "pacbayes_flatness": 1.0 / sigma.sigma ** 2,
        }
    finally:
        model.train(training)


def path_norm(model: nn.Module, input_shape: Sequence[int]) -> float:
    """The l2 path norm (Neyshabur et al. 2015): sqrt of the sum of the outputs of the network with
    every parameter squared on one all-ones input, which for a network of linear maps and ReLUs is
    sqrt of the sum over all input-output paths of the product of the squared weights on the path (a
    bias starts a path of its own). Jiang et al. 2020's ``path.norm`` is the sum without the root:
    the same ranking.

    On a float64 deep copy in eval mode. BatchNorm is the affine map it computes in eval mode,
    x -> a x + b with a = gamma / sqrt(running_var + eps) and b = beta - a running_mean, so its
    squared parameters are a^2 and b^2 (the copy's statistics are set to mean 0, variance 1, eps 0).
    When the layer before it has no bias (as in ResNets) this equals folding the BatchNorm into that
    layer first, as the code of Neyshabur et al. and of Dziugaite et al. 2020 does, without having to
    find that layer. Other layers (other normalisations, tanh) are applied as they are, where the
    path interpretation does not hold.
    """
    net = copy.deepcopy(model).double().eval()
    device = next(net.parameters()).device
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _as_affine(module)
        for p in net.parameters():
            p.square_()
        out = net(torch.ones(1, *input_shape, dtype=torch.float64, device=device))
    return float(out.sum().sqrt())


def _as_affine(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Make ``bn`` (eval mode) compute its own affine map with parameters a, b and identity statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise UserError("path norm: a BatchNorm layer without running statistics has no eval-mode map")
    a = (bn.running_var + bn.eps).rsqrt()
    b = -a * bn.running_mean
    if bn.weight is not None:
        a = a * bn.weight
        b = b * bn.weight
    if bn.bias is not None:
        b = b + bn.bias
    bn.weight, bn.bias = nn.Parameter(a), nn.Parameter(b)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0


@dataclass(frozen=True)
class Sigma:
    """The PAC-Bayes search's result: ``sigma`` satisfies the inequality (unless clipped at
    ``SIGMA_MIN``), ``above`` is the smallest sigma tested that does not (inf: none did)."""

    sigma: float
    above: float
    accuracy: float  # the unperturbed accuracy over the examples


def pacbayes_sigma(model: nn.Module, x: Tensor, y: Tensor, comm: Comm, *, total: int, seed: int,
                   chunk: int = 256, draws: int = PACBAYES_DRAWS, steps: int = PACBAYES_STEPS,
                   drop: float = PACBAYES_DROP) -> Sigma:
    """sigma' of the PAC-Bayes flatness by bisection on log sigma (module docstring; collective)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    correct0 = float(_correct_counts(model, params, x, y, comm, None, seed, 1, chunk)[0])

    def holds(sigma: float) -> bool:
        counts = _correct_counts(model, params, x, y, comm, sigma, seed, draws, chunk)
        return draws * correct0 - float(counts.sum()) <= drop * draws * total  # integers: exact

    if not holds(SIGMA_MIN):
        return Sigma(SIGMA_MIN, SIGMA_MIN, correct0 / total)
    if holds(SIGMA_MAX):
        return Sigma(SIGMA_MAX, math.inf, correct0 / total)
    lo, hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if holds(math.exp(mid)):
            lo = mid
        else:
            hi = mid
    return Sigma(math.exp(lo), math.exp(hi), correct0 / total)


def perturbed_accuracy(model: nn.Module, x: Tensor, y: Tensor, comm: Comm, sigma: float, *, total: int, seed: int,
                       chunk: int = 256, draws: int = PACBAYES_DRAWS) -> float:
    """The Monte-Carlo estimate of E acc(theta + u), u ~ N(0, sigma^2 I), that the search compares
    (the same draws; collective)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return float(_correct_counts(model, params, x, y, comm, sigma, seed, draws, chunk).sum()) / (draws * total)


def _correct_counts(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, comm: Comm,
                    sigma: float | None, seed: int, draws: int, chunk: int) -> Tensor:
    """Correct predictions over all ranks' examples for each draw (float64 integers; one allreduce);
    ``sigma`` None: the unperturbed network. The noise is drawn on the CPU (the same numbers on any
    device) and moved to the parameters' device. In eval mode (BatchNorm on its running statistics, which
    stay as they are); the model's mode is restored after."""
    counts = [0] * draws
    dim = sum(p.numel() for p in params.values())
    training = model.training
    model.eval()
    with torch.no_grad():
        for m in range(draws):
            point = params
            if sigma is not None:
                state = int(np.random.SeedSequence([seed, m]).generate_state(1, np.uint64)[0])
                z = torch.randn(dim, generator=torch.Generator().manual_seed(state), dtype=torch.float64)
                parts = torch.split(z, [p.numel() for p in params.values()])
                point = {n: p + (sigma * part).view(p.shape).to(p) for (n, p), part in zip(params.items(), parts)}
            for i in range(0, len(x), chunk):
                out = functional_call(model, point, (x[i:i + chunk],))
                counts[m] += int((out.argmax(1) == y[i:i + chunk]).sum())
    model.train(training)
    return comm.allreduce(torch.tensor(counts, dtype=torch.float64, device=comm.device), op="sum", name="pacbayes")


# -- the family of models ----------------------------------------------------------------------

MEASURES = {  # name -> label; {m} is the ranked matrix/approximation
    "lambda_max": "lambda_max of {m}",
    "hessian_lambda_max": "lambda_max of hessian/{a}",
    "trace": "trace of {m}",
    "effective_dim": "effective dimension N_eff of {m}",
    "fisher_rao_norm": "Fisher-Rao norm theta^T F theta",
    "pacbayes_flatness": "PAC-Bayes flatness 1/sigma'^2",
    "param_norm": "parameter norm (baseline)",
    "path_norm": "path norm (baseline)",
}


@dataclass(frozen=True)
class Score:
    """One measure's agreement with the gap: ``tau`` over the ``models`` that have it, ``psi`` the
    granulated coefficient per hyperparameter axis, ``granulated`` their mean (NaN: undefined)."""

    measure: str
    models: int
    tau: float
    psi: dict[str, float]
    granulated: float


@dataclass(frozen=True)
class Table:
    """``measure_table``'s result: the scores, and the models (run, step, gap, measures) behind them."""

    matrix: str
    approximation: str
    neff_ratio: float
    models: int
    axes: tuple[str, ...]
    scores: tuple[Score, ...]
    runs: tuple[str, ...]
    steps: tuple[int, ...]
    gaps: tuple[float, ...]
    values: dict[str, tuple[float | None, ...]]


def effective_dimension(eigenvalues: Sequence[float], z: float) -> float:
    """N_eff(z) = sum_i lambda_i / (lambda_i + z) over the (positive parts of the) eigenvalues."""
    return sum(lam / (lam + z) for lam in (max(v, 0.0) for v in eigenvalues)) if z > 0 else 0.0


def measure_table(db: Database, *, matrix: str = "ggn", approximation: str = "full",
                  neff_ratio: float = NEFF_RATIO) -> Table:
    """Every measure of each run's last snapshot ranked against its generalisation gap.

    A model is a run at its last measured step (the lowest seed there); its curvature measures come
    from the spectra row of ``matrix``/``approximation`` at that step and seed (the first stored, when
    several estimators are): lambda_max, the trace, the effective dimension N_eff(z) = sum_i
    lambda_i / (lambda_i + z) (MacKay 1992's number of well-determined parameters, Maddox et al.
    2020) over the stored top-k eigenvalues, and lambda_max of the Hessian when its row is there;
    the other measures from the snapshot itself. A measure a model lacks leaves that model out of
    the measure's coefficients.

    z = ``neff_ratio`` x the model's lambda_max (0.1: N_eff counts the directions whose curvature is
    within an order of magnitude of the sharpest). Only the top k eigenvalues are stored, so N_eff
    lies in [0, k]: an absolute z below every model's top k would give k for all, and no absolute z
    in loss units suits datasets, widths and losses of different scales. Relative, N_eff is
    unchanged when the loss is scaled and measures the shape of the top of the spectrum, which
    lambda_max and the trace do not.

    The axes of the granulated coefficient (Jiang et al. 2020, eq. 4) are the keys of the runs'
    hparams, and the dataset, that take more than one value: psi_i averages Kendall's tau within
    each group of >= 2 models that agree on every other axis (groups where tau is undefined, e.g. a
    constant gap, are left out), and Psi averages the psi_i. Too few models is a ``UserError``.
    """
    if matrix not in MATRICES or approximation not in APPROXIMATIONS:
        raise UserError(f"measures: unknown matrix {matrix!r} or approximation {approximation!r}; choose from "
                        f"{', '.join(MATRICES)} and {', '.join(APPROXIMATIONS)}")
    last: dict[str, SnapshotRow] = {}
    for row in db.snapshots():  # ordered by run, step: the last step wins, its lowest seed
        held = last.get(row.run)
        if row.gap is not None and (held is None or row.step > held.step or
                                    (row.step == held.step and row.seed < held.seed)):
            last[row.run] = row
    models = list(last.values())
    if len(models) < MIN_MODELS:
        raise UserError(f"measures: {db.path} holds {len(models)} models with a measured snapshot and gap; the "
                        f"Kendall coefficients need at least {MIN_MODELS} (spngd analyze writes the snapshots)")
    values: dict[str, list[float | None]] = {name: [] for name in MEASURES if name != "hessian_lambda_max"
                                             or matrix != "hessian"}
    for snap in models:
        spec = _spectrum(db.rows(run=snap.run, matrix=matrix, approximation=approximation), snap)
        top = spec.eigenvalues[0] if spec is not None and spec.eigenvalues else None
        values["lambda_max"].append(top)
        values["trace"].append(spec.trace if spec is not None else None)
        values["effective_dim"].append(None if top is None or spec is None else
                                       effective_dimension(spec.eigenvalues, neff_ratio * top))
        if "hessian_lambda_max" in values:
            hess = _spectrum(db.rows(run=snap.run, matrix="hessian", approximation=approximation), snap)
            values["hessian_lambda_max"].append(hess.eigenvalues[0] if hess is not None and hess.eigenvalues
                                                else None)
        for name in ("fisher_rao_norm", "pacbayes_flatness", "param_norm", "path_norm"):
            values[name].append(getattr(snap, name))
    gaps = [snap.gap for snap in models if snap.gap is not None]  # every model's: chosen so
    settings = [{**snap.hparams, "dataset": snap.dataset} for snap in models]
    keys = sorted({k for s in settings for k in s})
    axes = tuple(k for k in keys if len({_key(s.get(k)) for s in settings}) > 1)
    scores = tuple(_score(name, column, gaps, settings, axes) for name, column in values.items())
    return Table(matrix, approximation, neff_ratio, len(models), axes, scores, tuple(s.run for s in models),
                 tuple(s.step for s in models), tuple(gaps), {k: tuple(v) for k, v in values.items()})


def _spectrum(rows: list[SpectrumRow], snap: SnapshotRow) -> SpectrumRow | None:
    return next((r for r in rows if r.step == snap.step and r.seed == snap.seed), None)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b; NaN with fewer than two models or a constant side (tau undefined)."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(kendalltau(a, b).statistic)


def _mean(xs: Iterable[float]) -> float:
    defined = [x for x in xs if not math.isnan(x)]
    return sum(defined) / len(defined) if defined else math.nan


def _score(name: str, column: Sequence[float | None], gaps: Sequence[float], settings: Sequence[dict[str, Any]],
           axes: Sequence[str]) -> Score:
    measure = {i: float(v) for i, v in enumerate(column) if v is not None and not math.isnan(v)}
    have = list(measure)
    psi = {}
    for axis in axes:
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in have:
            groups.setdefault(tuple(_key(settings[i].get(a)) for a in axes if a != axis), []).append(i)
        psi[axis] = _mean(_tau([measure[i] for i in g], [gaps[i] for i in g]) for g in groups.values() if len(g) >= 2)
    return Score(name, len(have), _tau([measure[i] for i in have], [gaps[i] for i in have]), psi,
                 _mean(psi.values()))


def render_markdown(table: Table) -> str:
    """The table as Markdown: one row per measure, Kendall's tau, psi per axis and Psi."""
    def cell(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:+.3f}"

    head = ["measure", "models", "Kendall tau"] + [f"psi {a}" for a in table.axes] + ["Psi"]
    lines = [f"{table.models} models, each at its last snapshot; N_eff with z = {table.neff_ratio:g} lambda_max",
             "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in table.scores:
        label = MEASURES[s.measure].format(m=f"{table.matrix}/{table.approximation}", a=table.approximation)
        row = [label, str(s.models), cell(s.tau)] + [cell(s.psi[a]) for a in table.axes] + \
              [cell(s.granulated)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_json(table: Table) -> str:
    """The table as JSON (an undefined coefficient is null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(asdict(table)), indent=2)


# -- spectra over training ---------------------------------------------------------------------

def plot_spectra(db: Database, out: Path, *, runs: Sequence[str] | None = None) -> Path:
    """The stored top-k eigenvalues against epoch: one panel per (matrix, approximation) present, one
    line per run and eigenvalue index (the top one bold), log scale (eigenvalues <= 0 left out). Of
    several rows at one step (estimators, seeds) the first stored is drawn. Written atomically."""
    rows = [r for r in db.rows() if runs is None or r.run in runs]
    if not rows:
        which = f" for the runs {', '.join(runs)}" if runs else ""
        raise UserError(f"plot: {db.path} holds no spectra{which}")
    panels = sorted({(r.matrix, r.approximation) for r in rows},
                    key=lambda p: (MATRICES.index(p[0]), APPROXIMATIONS.index(p[1])))
    names = list(dict.fromkeys(r.run for r in rows))
    colours = {run: f"C{i % 10}" for i, run in enumerate(names)}
    cols = min(3, len(panels))
    lines = (len(panels) + cols - 1) // cols
    plt = pyplot()
    fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.6 * lines), squeeze=False)
    for ax, (matrix, approximation) in zip(axes.flat, panels):
        for run in names:
            first: dict[int, SpectrumRow] = {}
            for r in rows:
                if (r.run, r.matrix, r.approximation) == (run, matrix, approximation):
                    first.setdefault(r.step, r)
            if not first:
                continue
            points = sorted(first.values(), key=lambda r: r.step)
            k = max(len(r.eigenvalues) for r in points)
            eig = np.full((len(points), k), np.nan)
            for i, r in enumerate(points):
                eig[i, :len(r.eigenvalues)] = r.eigenvalues
            eig[eig <= 0] = np.nan
            epochs = [r.epoch for r in points]
            for j in range(k):
                ax.plot(epochs, eig[:, j], color=colours[run], lw=2.0 if j == 0 else 0.6, alpha=1.0 if j == 0 else 0.6,
                        marker="o" if len(points) == 1 else None, label=run if j == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"{matrix} / {approximation}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("eigenvalue")
        if len(names) <= 12:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    return out


__all__ = ["Score", "Sigma", "Table", "effective_dimension", "measure_table", "path_norm", "pacbayes_sigma",
           "perturbed_accuracy", "plot_spectra", "render_json", "render_markdown", "snapshot_norms"]
