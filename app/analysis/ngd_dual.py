"""Exact natural gradient in sample space (``optim.preconditioner: ngd_dual``).

For a global mini-batch of N examples the natural-gradient step ``(F + lambda I)^-1 g`` with F the
mini-batch GGN (= Fisher for softmax cross-entropy) or empirical Fisher is, with F = V^T V for the
sample-space rows V of ``Curvature.rows`` (R = NC rows for the GGN, N for ``emp``), by Woodbury

    (lambda I + V^T V)^-1 g = (g - V^T (lambda I + V V^T)^-1 V g) / lambda,

an R x R kernel solve instead of a P x P one: no approximation, cost O(R^2 P + R^3) time and
R x P float64 (all ranks' rows) on every rank.

Distributed (each rank holds its micro-batch, sizes may differ): every rank builds its rows V_r,
allgathers them, computes its kernel block row K_r = V_r V^T and ``V_r g``; one allgather of the
block rows gives every rank the same kernel bytes, so the float64 Cholesky solve on every rank gives
the same alpha; ``V^T alpha = sum_r V_r^T alpha_r`` is one allreduce.

BatchNorm and dropout: the rows are those of ``Curvature``, which evaluates the network in eval
mode (running statistics, no dropout) so that an example's output depends on that example alone;
the model's mode is restored afterwards. For networks without BatchNorm or dropout (MLPs, plain
CNNs) eval and train mode are the same function and the step is exact; with BatchNorm the Fisher
is that of the network on its running statistics while ``g`` is the train-mode (batch statistics)
gradient, an approximation (early in training the running statistics lag the batch ones).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from app.analysis.operators import Curvature
from app.comm.base import Comm
from app.errors import UserError

NGD_MATRICES = ("ggn", "emp")


class NGDDual:
    """``(F + damping I)^-1 g`` over the global batch of all ranks' micro-batches (collective)."""

    def __init__(self, model: nn.Module, comm: Comm, damping: float, matrix: str = "ggn", *,
                 chunk: int = 256) -> None:
        if matrix not in NGD_MATRICES:
            raise UserError(f"ngd_dual: matrix must be one of {', '.join(NGD_MATRICES)}, got {matrix!r}")
        if not damping > 0:
            raise UserError(f"ngd_dual: damping must be > 0 (lambda I makes the kernel invertible), got {damping}")
        self.model, self.comm, self.damping, self.matrix, self.chunk = model, comm, damping, matrix, chunk
        self.rows = 0  # kernel size R of the last step

    def direction(self, g: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """The natural gradient of the flat gradient ``g`` (``Curvature``'s parameter order), the
        same on every rank; ``g`` must be the mean-loss gradient over the global batch."""
        comm = self.comm
        total = int(comm.allreduce(torch.tensor([float(inputs.shape[0])], dtype=torch.float64, device=comm.device),
                                   op="sum", name="ngd_dual").item())
        training = self.model.training
        try:
            curv = Curvature(self.model, inputs, targets, self.matrix, comm, total=total, chunk=self.chunk)
            mine = curv.rows().double()  # (R_r, P)
        finally:
            self.model.train(training)  # Curvature switched it to eval
        parts = comm.allgather(mine, name="ngd_dual_rows")
        everyone = torch.cat(parts)  # (R, P)
        g64 = g.to(mine)
        block = torch.cat([mine @ everyone.T, (mine @ g64)[:, None]], 1)  # K_r and V_r g in one message
        gathered = torch.cat(comm.allgather(block, name="ngd_dual_kernel"))  # (R, R + 1)
        kernel, vg = gathered[:, :-1], gathered[:, -1]
        self.rows = kernel.shape[0]
        kernel.diagonal().add_(self.damping)
        alpha = torch.cholesky_solve(vg[:, None], torch.linalg.cholesky(kernel))[:, 0]
        start = sum(t.shape[0] for t in parts[:comm.rank])
        pulled = comm.allreduce(mine.T @ alpha[start:start + mine.shape[0]], op="sum", name="ngd_dual")
        return ((g64 - pulled) / self.damping).to(g)

    def precondition(self, inputs: Tensor, targets: Tensor) -> None:
        """Replace ``.grad`` of the model's trainable parameters (averaged over the ranks, unscaled)
        by the natural gradient; a parameter without ``.grad`` counts as a zero gradient."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        step = self.direction(flat, inputs, targets)
        for p, part in zip(params, step.split([p.numel() for p in params])):
            p.grad = part.view_as(p).clone()
