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

Products (``matvec``) reuse one linearisation per chunk: the first product records the chunk's
forward with autograd (for the Hessian also the gradient's backward, ``create_graph``) and keeps it,
so every later product, e.g. each Lanczos iteration, pays only what depends on the vector: the
Hessian one backward through the recorded gradient (reverse over reverse), the Gram matrices a
forward-mode (dual-number) pass for J v and one backward through the recorded forward for J^T u.
The kept state is what autograd saved (counted exactly, ``cache_bytes``), bounded by ``cache_mb``
per rank; chunks beyond it are recorded afresh at every product (the same arithmetic: the results
do not depend on the budget).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, vjp, vmap

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


@dataclass(frozen=True)
class _Recorded:
    """One chunk's autograd record at the operator's point: the parameters as leaves and what the
    products differentiate (the logits, or the loss gradient for the Hessian), graph attached."""

    leaves: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    nbytes: int  # what autograd saved for it, beyond the parameters and inputs that exist anyway


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
    parameters are read once, detached, at construction: the operator is the matrix at that point
    (an in-place change of them afterwards makes the next product of a recorded chunk fail with
    autograd's "modified by an inplace operation" error instead of mixing two points). ``cache_mb``
    bounds the recorded chunks kept across products (per rank; 0 records every product afresh).
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, matrix: str, comm: Comm, *,
                 total: int, offset: int = 0, seed: int = 0, chunk: int = 256, cache_mb: float = 1024.0) -> None:
        if matrix not in MATRICES:
            raise UserError(f"analysis: unknown matrix {matrix!r}; choose from {', '.join(MATRICES)}")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError("analysis: inputs and targets differ in length")
        if total < 1 or chunk < 1 or cache_mb < 0:
            raise ValueError("analysis: total and chunk must be positive, cache_mb >= 0")
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
        self.cache_limit = int(cache_mb * 2 ** 20)
        self._recorded: dict[int, _Recorded] = {}
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

    @property
    def cache_bytes(self) -> int:
        """Bytes autograd saved for the chunks kept across products (the product cache)."""
        return sum(r.nbytes for r in self._recorded.values())

    def _record(self, x: Tensor, y: Tensor) -> _Recorded:
        """The chunk's forward (and for the Hessian the gradient's backward) under autograd, counting
        the bytes it saves by storage, the parameters' and inputs' own storages excluded. Saved-tensor
        hooks switch off autograd's check that a saved tensor is unchanged when used, so ``unpack``
        makes it (the parameters are views of the model's: an optimiser step would change them)."""
        exist = {t.untyped_storage().data_ptr() for t in (*self.params.values(), x)}
        saved: dict[int, int] = {}

        def pack(t: Tensor) -> tuple[Tensor, int]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in exist:
                saved[storage.data_ptr()] = storage.nbytes()
            return t, t._version

        def unpack(packed: tuple[Tensor, int]) -> Tensor:
            t, version = packed
            if t._version != version:
                raise RuntimeError("analysis: a tensor the recorded products need was modified by an inplace "
                                   "operation (the model changed after the operator was built)")
            return t

        leaves = {n: p.detach().requires_grad_() for n, p in self.params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = self.logits(leaves, x)
            outputs = (out,) if self.matrix != "hessian" else torch.autograd.grad(
                F.cross_entropy(out, y, reduction="sum"), tuple(leaves.values()), create_graph=True)
        return _Recorded(tuple(leaves.values()), tuple(outputs), sum(saved.values()))

    def _recorded_chunk(self, index: int, x: Tensor, y: Tensor) -> tuple[_Recorded, bool]:
        """The chunk's record and whether it is kept (within ``cache_mb``) for later products."""
        if index in self._recorded:
            return self._recorded[index], True
        rec = self._record(x, y)
        if self.cache_bytes + rec.nbytes > self.cache_limit:
            return rec, False
        self._recorded[index] = rec
        return rec, True

    def _jvp(self, x: Tensor, tangent: Params) -> Tensor:
        """J v of the chunk's logits by dual numbers (forward mode, no autograd record)."""
        with forward_ad.dual_level():
            duals = {n: forward_ad.make_dual(p, tangent[n]) for n, p in self.params.items()}
            jv: Tensor = forward_ad.unpack_dual(self.logits(duals, x)).tangent
        return jv

    def matvec(self, v: Tensor) -> Tensor:
        """``M v`` averaged over all N examples (collective: every rank must call it alike)."""
        self.products += 1
        tangent = self.unflatten(v.to(self.device, self.dtype))
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for index, (x, y, labels) in enumerate(self.chunks()):
            rec, kept = self._recorded_chunk(index, x, y)
            if self.matrix == "hessian":
                cotangent: tuple[Tensor, ...] = tuple(tangent.values())
            else:
                out = rec.outputs[0].detach()
                jv = self._jvp(x, tangent)
                prob = F.softmax(out, dim=1)
                if self.matrix == "ggn":
                    u = prob * jv - prob * (prob * jv).sum(1, keepdim=True)
                else:
                    r = prob - F.one_hot(labels, prob.shape[1]).to(prob.dtype)
                    u = r * (r * jv).sum(1, keepdim=True)
                cotangent = (u,)
            live = [(o, c) for o, c in zip(rec.outputs, cotangent) if o.requires_grad]  # a constant adds 0
            with torch.enable_grad():
                parts = torch.autograd.grad([o for o, _ in live], rec.leaves, [c for _, c in live],
                                            retain_graph=kept, allow_unused=True, materialize_grads=True)
            total += torch.cat([t.reshape(-1) for t in parts])
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
