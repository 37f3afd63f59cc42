"""Data-parallel K-FAC whose hooks fire in another order on every rank: the in-order and the
replayed runs, shared by tests/test_order.py (thread ranks) and tests/mpi/order_worker.py (gloo)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.comm import Comm
from app.comm.grad_sync import GradientAverager
from app.config import KFACConfig
from app.kfac import KFAC


class Replay:
    """Hold a rank's gradient and factor hooks during backward, then run them in a random order of
    this rank and step, dropping about a quarter (the step's flush then forces those)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.held: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        if self.held is None:
            fn(*args)
        else:
            self.held.append((fn, args))

    def run(self, step: int) -> None:
        held, self.held = self.held or [], None
        rng = random.Random(f"{self.rank}.{step}")
        rng.shuffle(held)
        for fn, args in held:
            if rng.random() > 0.25:
                fn(*args)


def replayed(averager: GradientAverager, kfac: KFAC, replay: Replay) -> None:
    """Route ``averager``'s and ``kfac``'s hooks through ``replay`` (the hooks look them up per call)."""
    on_grad, send = averager._on_grad, kfac._send
    for h in averager._hooks:
        h.remove()
    averager._hooks = [p.register_post_accumulate_grad_hook(lambda p: replay.call(on_grad, p))
                       for p in averager._where]
    kfac._send = lambda i: replay.call(send, i)  # type: ignore[method-assign]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def train(comm: Comm, base: nn.Module, shuffle: bool, steps: int, fisher: str) -> list[Tensor]:
    """``steps`` steps of data-parallel K-FAC (4 examples a rank, float64, a bucket per layer and per
    few parameters, due sets changing from step to step) and the final parameters; ``shuffle``
    replays this rank's hooks (``Replay``)."""
    model = copy.deepcopy(base)
    kfac = KFAC(model, KFACConfig(fisher=fisher, damping=0.05, bucket_mb=1e-6, factor_interval=2,
                                  inverse_interval=3, max_rebalances=0), comm)
    averager = GradientAverager(model, comm, bucket_mb=100 / 2**20)  # a few parameters a bucket
    replay = Replay(comm.rank)
    if shuffle:
        replayed(averager, kfac, replay)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + comm.rank)
        x, y = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        out = model(x)
        kfac.fisher_backward(out)
        replay.held = [] if shuffle else None
        F.cross_entropy(out, y).backward()
        replay.run(step)
        averager.wait()
        kfac.step(0.05)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        assert comm.order.idle
    averager.remove()
    kfac.close()
    return [p.detach().clone() for p in model.parameters()]
