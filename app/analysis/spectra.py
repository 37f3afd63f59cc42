"""Top eigenvalues and traces of an information matrix under an approximation, with the estimator
that produced them.

Approximations (``APPROXIMATIONS``): ``full``; ``block`` (block-diagonal per layer: the spectrum is
the union of the blocks' spectra, merged); ``kfac`` (per Linear/Conv2d layer A (x) G from the same
per-example vectors the matrix is made of, its eigenvalues the products of the factors' eigenvalues,
merged across layers with no dense matrix; BatchNorm gets unit-wise 2x2 blocks (gamma_c, beta_c) as the
trainer's K-FAC does, other parameterised layers their exact block); ``diag``.

Estimators (``ESTIMATORS``): ``dense`` (the matrix formed from ``dim`` products, ``eigvalsh``: exact),
``lanczos`` (implicitly restarted Lanczos, scipy's ARPACK, on the products; the start vector from
the seed), ``dual`` (the Gram matrix V V^T of the sample-space rows: exact, N x N or NC x NC), and
``auto`` (dense up to ``DENSE_LIMIT`` parameters per operator, else Lanczos). The trace is exact
everywhere (for Gram matrices the sum of the squared sample-space rows) except the Hessian under
Lanczos: Hutchinson's estimator there (``trace_samples`` Rademacher probes from the seed).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh  # type: ignore[import-untyped]
from torch import Tensor, nn

from app.analysis.operators import ROW_MATRICES, Block, Curvature
from app.config import ANALYSIS_APPROXIMATIONS, ANALYSIS_ESTIMATORS
from app.errors import UserError

APPROXIMATIONS = ANALYSIS_APPROXIMATIONS
ESTIMATORS = ANALYSIS_ESTIMATORS
DENSE_LIMIT = 2048
HESSIAN_DIAG_LIMIT = 8 * DENSE_LIMIT  # one Hessian product per parameter
KFAC_MATRICES = ("ggn", "mc", "emp")
MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Spectrum:
    """One result: the top-k eigenvalues (descending) and the trace, and how they were obtained."""

    matrix: str
    approximation: str
    estimator: str
    k: int
    eigenvalues: list[float]
    trace: float
    trace_estimator: str
    tolerance: float
    seed: int
    products: int


def _generator(seed: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, *index])


def _restricted(curv: Curvature, block: Block | None) -> tuple[int, MatVec]:
    """(size, v -> M_bb v) for the whole operator (``block`` None) or one diagonal block."""
    if block is None:
        return curv.dim, curv.matvec
    def mv(v: Tensor) -> Tensor:
        full = torch.zeros(curv.dim, dtype=curv.dtype, device=curv.device)
        full[block.start:block.stop] = v
        return curv.matvec(full)[block.start:block.stop]
    return block.size, mv


def _dense(size: int, mv: MatVec) -> Tensor:
    """The matrix from ``size`` products with the unit vectors, symmetrised (float64)."""
    cols = [mv(torch.eye(size, dtype=torch.float64)[i]).double().cpu() for i in range(size)]
    m = torch.stack(cols, 1)
    return (m + m.T) / 2


def _lanczos(size: int, mv: MatVec, k: int, tol: float, seed: int) -> list[float]:
    if k >= size:
        raise UserError(f"analysis: Lanczos needs k < the operator's size ({k} >= {size}); use the "
                        "estimator dense")
    def apply(x: np.ndarray) -> np.ndarray:
        return mv(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).double().cpu().numpy()
    op = LinearOperator((size, size), matvec=apply, dtype=np.float64)
    v0 = _generator(seed, 1).standard_normal(size)
    vals = eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted((float(x) for x in vals), reverse=True)


def _hutchinson(size: int, mv: MatVec, samples: int, seed: int) -> float:
    rng = _generator(seed, 2)
    total = 0.0
    for _ in range(samples):
        z = torch.from_numpy(rng.choice([-1.0, 1.0], size=size))
        total += float(z @ mv(z).double().cpu())
    return total / samples


def gathered_rows(curv: Curvature) -> Tensor:
    """The sample-space rows of every rank, stacked in rank order (collective)."""
    rows = curv.rows()
    return torch.cat(curv.comm.allgather(rows, name="analysis_rows"))


def _top(values: list[float], k: int) -> list[float]:
    return heapq.nlargest(k, values)


def spectrum(curv: Curvature, approximation: str, k: int = 10, estimator: str = "auto", *,
             tol: float = 1e-8, seed: int = 0, trace_samples: int = 100) -> Spectrum:
    """Top-``k`` eigenvalues and trace of ``curv`` under ``approximation`` (collective)."""
    if approximation not in APPROXIMATIONS:
        raise UserError(f"analysis: unknown approximation {approximation!r}; choose from {', '.join(APPROXIMATIONS)}")
    if estimator not in ESTIMATORS:
        raise UserError(f"analysis: unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if k < 1:
        raise UserError(f"analysis: top-k must be >= 1, got {k}")
    start = curv.products
    if approximation == "kfac":
        vals, trace = kfac_spectrum(curv, k)
        return Spectrum(curv.matrix, "kfac", "kronecker", k, vals, trace, "exact", 0.0, seed, curv.products - start)
    if approximation == "diag":
        diag = _diagonal(curv, estimator)
        return Spectrum(curv.matrix, "diag", estimator if estimator != "auto" else "exact", k,
                        _top(diag.tolist(), k), float(diag.sum()), "exact", 0.0, seed, curv.products - start)
    blocks: list[Block | None] = [None] if approximation == "full" else list(curv.blocks)
    if estimator == "dual":
        rows = gathered_rows(curv).double().cpu()
        vals, trace = [], 0.0
        for block in blocks:
            v = rows if block is None else rows[:, block.start:block.stop]
            gram = v @ v.T
            vals += torch.linalg.eigvalsh(gram).tolist()
            trace += float(gram.trace())
        return Spectrum(curv.matrix, approximation, "dual", k, _top(vals, k), trace, "exact", 0.0, seed,
                        curv.products - start)
    vals, trace, used, trace_used = [], 0.0, set(), set()
    gram_diagonal = None
    for i, block in enumerate(blocks):
        size, mv = _restricted(curv, block)
        method = estimator if estimator != "auto" else ("dense" if size <= DENSE_LIMIT else "lanczos")
        if method == "dense" or k >= size:
            m = _dense(size, mv)
            vals += torch.linalg.eigvalsh(m).tolist()
            trace += float(m.trace())
            used.add("dense")
            trace_used.add("exact")
        else:
            vals += _lanczos(size, mv, k, tol, seed + i)
            used.add("lanczos")
            if curv.matrix in ROW_MATRICES:  # exact and cheaper than probes: the squared rows' sum
                gram_diagonal = curv.diagonal() if gram_diagonal is None else gram_diagonal
                trace += float(gram_diagonal[slice(None) if block is None else slice(block.start, block.stop)].sum())
                trace_used.add("exact")
            else:
                trace += _hutchinson(size, mv, trace_samples, seed + i)
                trace_used.add(f"hutchinson{trace_samples}")
    return Spectrum(curv.matrix, approximation, "+".join(sorted(used)), k, _top(vals, k), trace,
                    "+".join(sorted(trace_used)), tol if "lanczos" in used else 0.0, seed, curv.products - start)


def _diagonal(curv: Curvature, estimator: str) -> Tensor:
    """The exact diagonal: column sums of the squared rows for Gram matrices, unit-vector products
    for the Hessian (``dim`` products: small networks only, stated by the estimator name)."""
    if curv.matrix != "hessian":
        return curv.diagonal().double().cpu()
    if curv.dim > HESSIAN_DIAG_LIMIT:
        raise UserError(f"analysis: the exact Hessian diagonal takes one product per parameter "
                        f"({curv.dim}); use approximation block or full with lanczos")
    eye = torch.eye(curv.dim, dtype=curv.dtype, device=curv.device)
    return torch.stack([curv.matvec(eye[i])[i] for i in range(curv.dim)]).double().cpu()


def kfac_factors(curv: Curvature) -> tuple[dict[str, tuple[Tensor, Tensor]], list[Block]]:
    """Per Linear/Conv2d layer (A, G) of ``curv``'s matrix (collective), and the blocks of the
    other parameterised modules.

    A is the mean over examples (and, for convolutions, output positions: the KFC convention) of
    the layer inputs' outer products, with a 1 appended when the layer has a bias; G is the mean
    over examples of the sum over the matrix's per-example vectors (C for the GGN, one for the
    MC and empirical Fisher) and over positions of the backpropagated outer products. For one
    example at one position A (x) G is the layer's exact block.
    """
    if curv.matrix not in KFAC_MATRICES:
        raise UserError(f"analysis: K-FAC approximates {', '.join(KFAC_MATRICES)}; {curv.matrix} has no "
                        "Kronecker factorisation from per-example vectors")
    modules = dict(curv.model.named_modules())
    order = [b.module for b in curv.blocks]
    kron = [n for n in order if isinstance(modules[n], (nn.Linear, nn.Conv2d))]
    a_sum: dict[str, Tensor] = {}
    g_sum: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if out.requires_grad:  # not row_weights' forward on the detached parameters
                inputs[name] = args[0].detach()
                out.retain_grad()
                outputs[name] = out
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in kron]
    try:
        for x, _, labels in curv.chunks():
            weights = curv.row_weights(x, labels)
            with torch.enable_grad():
                logits = curv.model(x)
            for name in kron:
                a = _patches(modules[name], inputs[name])
                a_sum[name] = a_sum.get(name, 0) + torch.einsum("npi,npj->ij", a, a) / a.shape[1]
            for r in range(weights.shape[1]):
                for out in outputs.values():
                    out.grad = None
                logits.backward(weights[:, r], retain_graph=r + 1 < weights.shape[1])
                for name in kron:
                    g = outputs[name].grad
                    assert g is not None
                    b = g.flatten(2).transpose(1, 2) if g.dim() == 4 else g[:, None, :]
                    g_sum[name] = g_sum.get(name, 0) + torch.einsum("npi,npj->ij", b, b)
    finally:
        for h in handles:
            h.remove()
        curv.model.zero_grad(set_to_none=True)
    factors = {}
    for name in kron:
        factors[name] = (curv.comm.allreduce(a_sum[name], op="sum", name="analysis_kfac") / curv.total,
                         curv.comm.allreduce(g_sum[name], op="sum", name="analysis_kfac") / curv.total)
    return factors, [blk for blk in curv.blocks if blk.module not in kron]


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """(n, positions, features) layer inputs, a 1 appended when the layer has a bias."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # type: ignore[arg-type]
        a = cols.transpose(1, 2)
    else:
        a = x[:, None, :]
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def kfac_spectrum(curv: Curvature, k: int) -> tuple[list[float], float]:
    """Top-k of the union over layers of {a_i g_j}, and sum_l tr A_l tr G_l, plus the other layers'
    blocks from the sample-space rows (one more pass only when such layers exist)."""
    factors, others = kfac_factors(curv)
    vals: list[float] = []
    trace = 0.0
    for a, g in factors.values():
        ea = torch.linalg.eigvalsh(a.double().cpu())
        eg = torch.linalg.eigvalsh(g.double().cpu())
        vals += _top(torch.outer(ea, eg).flatten().tolist(), k)
        trace += float(ea.sum() * eg.sum())
    rows = gathered_rows(curv).double().cpu() if others else None
    modules = dict(curv.model.named_modules())
    for block in others:
        assert rows is not None
        v = rows[:, block.start:block.stop]
        if isinstance(modules[block.module], nn.modules.batchnorm._BatchNorm) and len(block.names) == 2:
            # unit-wise: one 2x2 block (gamma_c, beta_c) per channel, as the trainer's K-FAC has it
            c = block.size // 2
            pairs = torch.stack([v[:, :c], v[:, c:]], 2)  # (rows, channel, 2)
            units = torch.einsum("rci,rcj->cij", pairs, pairs)
            vals += torch.linalg.eigvalsh(units).flatten().tolist()
            trace += float(units.diagonal(dim1=1, dim2=2).sum())
        else:
            gram = v @ v.T
            vals += torch.linalg.eigvalsh(gram).tolist()
            trace += float(gram.trace())
    return _top(vals, k), trace
