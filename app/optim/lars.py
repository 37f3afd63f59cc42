"""LARS (You et al. 2017) in the form of the MLPerf ResNet-50 reference.

Per parameter w with gradient g, in a group with ``lars=True``::

    trust = eta * ||w|| / (||g|| + wd * ||w||)      (1 when ||w|| or ||g|| is 0)
    v     = momentum * v + lr * trust * (g + wd * w)
    w     = w - v

Groups with ``lars=False`` (BN parameters and biases in MLPerf) skip the trust ratio and use
plain momentum SGD with the same velocity form. The learning rate sits inside the velocity, as in
MLPerf, so a schedule change takes effect immediately rather than through the momentum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum; per-group flag ``lars`` enables adaptation."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        if lr <= 0.0 or not 0.0 <= momentum < 1.0 or weight_decay < 0.0 or eta <= 0.0:
            raise ValueError(f"lars: bad hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} eta={eta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta, "lars": True})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eta = group["lr"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    # torch.where keeps it on the device: no host sync per parameter.
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        eta * w_norm / (g_norm + wd * w_norm), 1.0)
                    d.mul_(trust * lr)
                else:
                    d.mul_(lr)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.sub_(buf)
        return loss
