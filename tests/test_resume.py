"""Fast checks of what exact resume rests on: K-FAC's mc labels come from a per-rank generator that
its state_dict carries, and the loaders never draw from torch's global RNG (whatever else does).
The end-to-end proof under mpirun is ``test_train.test_resume_after_signal_equals_uninterrupted``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from test_data import config, make_dataset
from test_kfac import data, net, train_step
from thread_comm import ThreadComm, ThreadWorld
from torch import nn

from app.config import KFACConfig
from app.data import build_loaders
from app.kfac import KFAC

MC = KFACConfig(fisher="mc", kl_clip=0.0)


def _mc_steps(base: nn.Module, steps: range, states: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``steps`` K-FAC mc steps at 2 thread ranks from ``states`` (or fresh); every rank's state_dict after."""
    def rank(comm: ThreadComm) -> dict[str, Any]:
        model = copy.deepcopy(base)
        kfac = KFAC(model, MC, comm, seed=3)
        if states is not None:
            kfac.load_state_dict(copy.deepcopy(states[comm.rank]))
        for step in steps:
            train_step(model, kfac, step, [data(seed=10 * step + comm.rank)])
        return kfac.state_dict()
    return ThreadWorld(2).run(rank)


def test_mc_resume_continues_every_ranks_label_stream() -> None:
    base = net()
    straight = _mc_steps(base, range(4))[0]
    half = _mc_steps(base, range(2))
    torch.rand(1000)  # other draws from the global RNG between checkpoint and resume must not matter
    resumed = _mc_steps(base, range(2, 4), half)[0]
    for name, entry in straight["layers"].items():
        assert all(torch.equal(a, b) for a, b in zip(entry["factors"], resumed["layers"][name]["factors"],
                                                      strict=True)), name
    assert all(torch.equal(a, b) for a, b in zip(straight["samplers"], resumed["samplers"], strict=True))
    assert not torch.equal(*straight["samplers"])  # each rank has its own stream


def test_loaders_leave_the_global_rng_alone(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    train, val, _ = build_loaders(config(root, "torch"), 0, 1, torch.device("cpu"), seed=0)
    before = torch.get_rng_state()
    for loader in (train, val):
        assert list(loader.epoch(0))
    assert torch.equal(torch.get_rng_state(), before)
