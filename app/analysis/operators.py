"""Matrix-free information matrices of softmax cross-entropy over a data set sharded across ranks.

Every matrix here is an average over the N examples of the whole data set, each rank holding a
shard: a product ``M v`` sums the rank's examples and one allreduce adds the ranks, so every rank
gets the same vector (the ring and tree allreduces of gloo, NCCL and Horovod hand every rank the
same bytes) and an iterative eigensolver run on every rank takes identical steps everywhere.

The network is evaluated in eval mode (BatchNorm on its running statistics, no dropout): only
then is the output of one example a function of that example alone, which every per-example
quantity below (the Fisher's sum over examples, the sample-space rows) assumes.

Matrices (``MATRICES``), with ``f_n`` the logits of example n, ``p_n`` its softmax, ``J_n`` the
Jacobian of ``f_n`` in the parameters:

* ``hessian``: the Hessian of the mean loss (Hessian-vector products, forward over reverse);
* ``ggn``: the generalised Gauss-Newton (1/N) sum J^T (diag p - p p^T) J, equal to the exact Fisher
  of the model's predictive distribution for softmax cross-entropy;
* ``mc``: the Monte-Carlo Fisher, one label per example drawn from p_n, the labels fixed for the
  operator's life (every product of one estimate sees the same labels); the draw of example i
  depends on (seed, i) only, so it is the same whatever the rank layout;
* ``emp``: the empirical Fisher (1/N) sum g_n g_n^T with the true labels;
* ``cov``: the gradient covariance, ``emp`` minus g_bar g_bar^T.

The last four are ``V^T V`` for sample-space rows V (``rows``): C rows ``s_c (e_c - p)^T J`` per
example for the GGN (``s = sqrt p``: diag p - p p^T = S S^T with S = diag s - p s^T), one row
``(p - e_y)^T J`` per example for ``mc`` and ``emp`` (y drawn or true), centred rows for ``cov``;
each scaled by 1/sqrt(N).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from app.comm.base import Comm
from app.config import ANALYSIS_MATRICES
from app.errors import UserError

MATRICES = ANALYSIS_MATRICES
ROW_MATRICES = ("ggn", "mc", "emp", "cov")

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Block:
    """One layer's parameters: a contiguous slice of the flat parameter vector."""

    module: str
    names: tuple[str, ...]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def layer_blocks(model: nn.Module) -> list[Block]:
    """One block per module that owns parameters directly, in ``named_parameters`` order (the
    flat vector's order: a module's parameters are registered together)."""
    order = [name for name, p in model.named_parameters() if p.requires_grad]
    offsets: dict[str, tuple[int, int]] = {}
    at = 0
    params = dict(model.named_parameters())
    for name in order:
        offsets[name] = (at, at + params[name].numel())
        at += params[name].numel()
    blocks = []
    for mname, module in model.named_modules():
        names = tuple(f"{mname}.{n}" if mname else n for n, p in module.named_parameters(recurse=False)
                      if p.requires_grad)
        if names:
            span = sorted(offsets[n] for n in names)
            if any(a[1] != b[0] for a, b in zip(span, span[1:])):
                raise UserError(f"analysis: the parameters of module {mname!r} are not contiguous in the "
                                "model's parameter order; blocks need them together")
            blocks.append(Block(mname, names, span[0][0], span[-1][1]))
    return sorted(blocks, key=lambda b: b.start)


class Curvature:
    """One information matrix of ``model`` on a rank's shard ``(inputs, targets)`` of ``total``
    examples, the shard starting at global example ``offset`` (for the Monte-Carlo labels).

    ``chunk`` bounds the examples one forward pass holds (memory, not the result). The model's
    parameters are read once, detached, at construction: the operator is the matrix at that point.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, matrix: str, comm: Comm, *,
                 total: int, offset: int = 0, seed: int = 0, chunk: int = 256) -> None:
        if matrix not in MATRICES:
            raise UserError(f"analysis: unknown matrix {matrix!r}; choose from {', '.join(MATRICES)}")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError("analysis: inputs and targets differ in length")
        if total < 1 or chunk < 1:
            raise ValueError("analysis: total and chunk must be positive")
        self.model = model.eval()
        self.matrix = matrix
        self.comm = comm
        self.total = total
        self.seed = seed
        self.chunk = chunk
        self.params: Params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        self.blocks = layer_blocks(model)
        self.dim = sum(p.numel() for p in self.params.values())
        self.dtype = next(iter(self.params.values())).dtype
        self.device = next(iter(self.params.values())).device
        self.inputs = inputs.to(self.device, self.dtype if inputs.is_floating_point() else inputs.dtype)
        self.targets = targets.to(self.device)
        self.labels = self._labels(offset) if matrix == "mc" else self.targets
        self.products = 0
        self._mean_grad: Tensor | None = None

    # -- flat vectors and the functional network -------------------------------------------
    def unflatten(self, v: Tensor) -> Params:
        parts = torch.split(v, [s.numel() for s in self.shapes])
        return {n: part.view(s) for n, part, s in zip(self.names, parts, self.shapes)}

    @staticmethod
    def flatten(tree: Params) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tree.values()])

    def logits(self, params: Params, x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.model, params, (x,))
        return out

    def chunks(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(inputs, true targets, the matrix's labels) of the shard, ``chunk`` examples at a time."""
        for i in range(0, self.inputs.shape[0], self.chunk):
            j = i + self.chunk
            yield self.inputs[i:j], self.targets[i:j], self.labels[i:j]

    def _labels(self, offset: int) -> Tensor:
        """One label per example from its predictive distribution, example i's from the uniform
        u_i of the stream (seed, i) by inverse CDF: the same draw on any rank layout."""
        n = self.inputs.shape[0]
        u = torch.tensor([np.random.default_rng([self.seed, offset + i]).random() for i in range(n)],
                         dtype=torch.float64)
        labels = []
        with torch.no_grad():
            for i in range(0, n, self.chunk):
                p = F.softmax(self.logits(self.params, self.inputs[i:i + self.chunk]).double(), dim=1)
                cdf = p.cumsum(1)
                labels.append(torch.searchsorted(cdf, u[i:i + self.chunk, None].to(cdf.device)).squeeze(1)
                              .clamp_max(p.shape[1] - 1))
        return torch.cat(labels) if labels else self.targets.new_zeros(0)

    def _loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(params, x), y, reduction="sum")

    def _reduce(self, local: Tensor) -> Tensor:
        return self.comm.allreduce(local, op="sum", name="analysis") / self.total

    # -- products ------------------------------------------------------------------------------
    def mean_gradient(self) -> Tensor:
        """The gradient of the mean loss over all N examples (collective, cached)."""
        if self._mean_grad is None:
            total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            for x, y, _ in self.chunks():
                total += self.flatten(grad(self._loss)(self.params, x, y))
            self._mean_grad = self._reduce(total)
        return self._mean_grad

    def matvec(self, v: Tensor) -> Tensor:
        """``M v`` averaged over all N examples (collective: every rank must call it alike)."""
        self.products += 1
        tangent = self.unflatten(v.to(self.device, self.dtype))
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for x, y, labels in self.chunks():
            if self.matrix == "hessian":
                total += self.flatten(jvp(lambda p, x=x, y=y: grad(self._loss)(p, x, y), (self.params,),
                                          (tangent,))[1])
                continue
            primal_tangent = jvp(lambda p, x=x: self.logits(p, x), (self.params,), (tangent,))
            out, jv = primal_tangent[0], primal_tangent[1]
            prob = F.softmax(out, dim=1)
            if self.matrix == "ggn":
                u = prob * jv - prob * (prob * jv).sum(1, keepdim=True)
            else:
                r = prob - F.one_hot(labels, prob.shape[1]).to(prob.dtype)
                u = r * (r * jv).sum(1, keepdim=True)
            pullback = vjp(lambda p, x=x: self.logits(p, x), self.params)[1]
            total += self.flatten(pullback(u)[0])
        product = self._reduce(total)
        if self.matrix == "cov":
            g = self.mean_gradient()
            product = product - g * (g @ v.to(g))
        return product

    def rows(self) -> Tensor:
        """The rank's sample-space rows V_r (``ROW_MATRICES`` only): ``M = V^T V`` with V the rows
        of all ranks stacked, each already scaled by 1/sqrt(N); C rows an example for ``ggn``."""
        parts = list(self._row_chunks())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, dtype=self.dtype, device=self.device)

    def diagonal(self) -> Tensor:
        """The exact diagonal of a Gram matrix, sum of the squared rows (collective), one chunk of
        rows in memory at a time."""
        local = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for rows in self._row_chunks():
            local += (rows ** 2).sum(0)
        return self.comm.allreduce(local, op="sum", name="analysis")

    def _row_chunks(self) -> Iterator[Tensor]:
        if self.matrix not in ROW_MATRICES:
            raise UserError(f"analysis: {self.matrix} has no sample-space factor (it is not a Gram "
                            f"matrix); use the estimator lanczos or dense")
        for x, _, labels in self.chunks():
            weights = self.row_weights(x, labels)  # (n, r, C)

            def one(p: Params, xi: Tensor, wi: Tensor) -> Tensor:
                pullback = vjp(lambda q: self.logits(q, xi[None])[0], p)[1]
                return vmap(lambda w: self.flatten(pullback(w)[0]))(wi)

            rows = vmap(one, in_dims=(None, 0, 0))(self.params, x, weights).reshape(-1, self.dim)
            if self.matrix == "cov":
                rows = rows - self.mean_gradient()
            yield rows / self.total ** 0.5

    def row_weights(self, x: Tensor, labels: Tensor) -> Tensor:
        """Cotangents on the logits whose pullbacks are the rows: (n, C, C) for the GGN (row c is
        s_c (e_c - p)), (n, 1, C) for one label an example."""
        with torch.no_grad():
            prob = F.softmax(self.logits(self.params, x), dim=1)
        if self.matrix == "ggn":
            eye = torch.eye(prob.shape[1], dtype=prob.dtype, device=prob.device)
            return prob.sqrt()[:, :, None] * (eye[None] - prob[:, None, :])
        return (prob - F.one_hot(labels, prob.shape[1]).to(prob.dtype))[:, None, :]
