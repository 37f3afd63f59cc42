"""Resume: K-FAC's state goes to the writer (rank 0) only and continues on any number of ranks,
bitwise on the same number; mc labels come from a per-rank generator its state_dict carries; the
loaders never draw from torch's global RNG (whatever else does); re-placement sends a layer's
state to its new owner. In-process (ranks as threads) except the last tests: mpirun runs of
``spngd train`` at 4 ranks resumed at 3, and ``tests/mpi/ckpt_worker.py`` at 3 and 4 gloo ranks
(what the checkpoint and re-placement call sites move: only the writer or new owner receives).
The end-to-end proof of exact resume is ``test_train.test_resume_after_signal_equals_uninterrupted``."""

from __future__ import annotations

import copy
import csv
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpi_helpers import REPO, run_check_worker, run_mpi, skip_unless_runnable
from test_data import config, make_dataset
from test_kfac import data, net, train_step
from thread_comm import ThreadComm, ThreadWorld
from torch import Tensor, nn

from app.checkpoint import Checkpointer
from app.config import KFACConfig
from app.data import build_loaders
from app.kfac import KFAC
from app.kfac.placement import layer_cost, lpt

MC = KFACConfig(fisher="mc", kl_clip=0.0)


def _mc_steps(base: nn.Module, steps: range, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """``steps`` K-FAC mc steps at 2 thread ranks from ``state`` (or fresh); the checkpoint after (rank 0's)."""
    def rank(comm: ThreadComm) -> dict[str, Any] | None:
        model = copy.deepcopy(base)
        kfac = KFAC(model, MC, comm, seed=3)
        if state is not None:
            kfac.load_state_dict(copy.deepcopy(state))
        for step in steps:
            train_step(model, kfac, step, [data(seed=10 * step + comm.rank)])
        return kfac.state_dict()
    writer, other = ThreadWorld(2).run(rank)
    assert writer is not None and other is None  # only the writer gets the state
    return writer


def test_mc_resume_continues_every_ranks_label_stream() -> None:
    base = net()
    straight = _mc_steps(base, range(4))
    half = _mc_steps(base, range(2))
    torch.rand(1000)  # other draws from the global RNG between checkpoint and resume must not matter
    resumed = _mc_steps(base, range(2, 4), half)
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


# -- another world size ---------------------------------------------------------------------------------
BATCH = 12  # divisible by 2, 3 and 4 ranks
LR = 0.1


def _model() -> nn.Module:
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3, padding=1), bn=nn.BatchNorm2d(3), relu=nn.ReLU(),
                                      conv2=nn.Conv2d(3, 4, 3, stride=2, padding=1), flat=nn.Flatten(),
                                      fc=nn.Linear(16, 4)))
    return model.double().eval()  # BN on running statistics: a shard's forward is the batch's


torch.manual_seed(0)
INIT = _model().state_dict()  # drawn once: threads share torch's global RNG


@dataclass
class _Rank:
    params: list[Tensor]
    losses: list[float]
    owners: list[int]  # right after the start or resume
    held: list[tuple[bool, bool]]  # per layer, right after the start or resume: (factors, inverse) held here
    stats: dict[str, float]
    state: dict[str, Any] | None  # the checkpoint after the last step (the writer's)


def _train(size: int, steps: range, cfg: KFACConfig, state: dict[str, Any] | None = None) -> list[_Rank]:
    """SGD on K-FAC directions at ``size`` thread ranks, each on its share of one global batch per step."""
    def rank(comm: ThreadComm) -> _Rank:
        model = _model()
        model.load_state_dict(state["model"] if state is not None else INIT)
        kfac = KFAC(model, cfg, comm)
        if state is not None:
            kfac.load_state_dict(copy.deepcopy(state["kfac"]))  # every rank reads the one file
        owners = list(kfac.placement.owners)
        held = [(layer.factors is not None, layer.inverse is not None) for layer in kfac.layers.values()]
        rows = slice(comm.rank * BATCH // size, (comm.rank + 1) * BATCH // size)
        base = torch.randn(BATCH, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        y = torch.arange(BATCH) % 4
        losses = []
        for step in steps:  # slowly changing inputs: some intervals grow
            x = base + 0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(step),
                                          dtype=torch.float64)
            model.zero_grad(set_to_none=True)
            kfac.begin_step(step)
            out = model(x[rows])
            kfac.fisher_backward(out)
            loss = F.cross_entropy(out, y[rows])
            loss.backward()
            for p in model.parameters():
                comm.allreduce(p.grad)
            kfac.step(LR)
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            losses.append(loss.item())
        saved = kfac.state_dict()
        return _Rank([p.detach().clone() for p in model.parameters()], losses, owners, held, kfac.stats,
                     None if saved is None else {"model": model.state_dict(), "kfac": saved})
    return ThreadWorld(size).run(rank)


CASES = {"inverses-adaptive": {"share": "inverses", "adaptive_lambda": 0.4},
         "gradients-adaptive": {"share": "gradients", "adaptive_lambda": 0.4},
         "inverses-interval3": {"share": "inverses", "inverse_interval": 3}}  # resumes between inverse refreshes


def _complete(state: dict[str, Any], ranks: int) -> None:
    kfac = state["kfac"]
    assert kfac["ranks"] == ranks and sorted(set(kfac["owners"])) == list(range(ranks))
    assert all(entry["factors"] is not None and entry["inverse"] is not None for entry in kfac["layers"].values())


@pytest.mark.parametrize("before, after", [(4, 4), (4, 3), (2, 4), (4, 2)])
@pytest.mark.parametrize("case", CASES)
def test_resume_on_another_world_size_continues_the_run(case: str, before: int, after: int) -> None:
    """Checkpoint after 5 of 10 steps at ``before`` ranks, resume at ``after``: every layer's state on its
    owner under a placement made for ``after`` ranks from the saved intervals, the counters and intervals
    continued, the weights those of the uninterrupted run (bitwise at the same size; at another, the
    same global batch gives the same weights up to round-off)."""
    cfg = KFACConfig(damping=0.05, stat_decay=0.8, **CASES[case])  # type: ignore[arg-type]
    straight = _train(before, range(10), cfg)
    ckpt = _train(before, range(5), cfg)[0].state
    assert ckpt is not None
    _complete(ckpt, before)
    resumed = _train(after, range(5, 10), cfg, ckpt)

    intervals = ckpt["kfac"]["clock"]["intervals"]
    shapes = [layer.factor_shapes for layer in KFAC(_model(), cfg).layers.values()]
    owners = (ckpt["kfac"]["owners"] if after == before else
              lpt([layer_cost(s, k, cfg.share == "gradients") for s, k in zip(shapes, intervals)], after))
    for r, rank in enumerate(resumed):
        assert rank.owners == owners
        assert rank.held == [(o == r, o == r or cfg.share == "inverses") for o in owners], r
        assert all(math.isfinite(loss) for loss in rank.losses)
        if after == before:
            assert all(torch.equal(p, q) for p, q in zip(rank.params, straight[r].params, strict=True))
        else:
            for p, q in zip(rank.params, straight[0].params, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    end, end_straight = resumed[0].state, straight[0].state
    assert end is not None and end_straight is not None and all(rank.state is None for rank in resumed[1:])
    _complete(end, after)
    assert end["kfac"]["clock"]["intervals"] == end_straight["kfac"]["clock"]["intervals"]
    counters = ("kfac_steps", "kfac_factor_updates", "kfac_inverse_updates", "kfac_layer_refreshes")
    assert [resumed[0].stats[k] for k in counters] == [straight[0].stats[k] for k in counters]
    assert resumed[0].stats["kfac_steps"] == 10
    if case.endswith("adaptive"):
        assert max(intervals) > 1  # the adaptive state is really being carried over


def test_replacement_moves_each_layer_to_its_new_owner_only() -> None:
    """A forced re-placement at 3 ranks (rank 1's layers to rank 2): rank 2 gets exactly the state rank 1
    held (factors, inverse), rank 1 drops it, rank 0 is untouched."""
    cfg = KFACConfig(share="gradients", adaptive_lambda=0.4, damping=0.05)

    def rank(comm: ThreadComm) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]], list[int], list[int]]:
        model = _model()
        model.load_state_dict(INIT)
        kfac = KFAC(model, cfg, comm)
        for step in range(2):
            train_step(model, kfac, step, [(torch.randn(BATCH // 3, 2, 4, 4, generator=torch.Generator().manual_seed(
                10 * step + comm.rank), dtype=torch.float64), torch.arange(BATCH // 3) % 4)])

        def snapshot() -> dict[str, list[Tensor]]:
            """Per layer held here: its factors and inverse tensors."""
            out = {}
            for name, layer in kfac.layers.items():
                if layer.factors is None and layer.inverse is None:
                    continue
                inverse = layer.inverse_state() if layer.inverse is not None else []
                if isinstance(inverse, dict):  # Kronecker inverses: tensors by field, and the kind
                    inverse = [v for _, v in sorted(inverse.items()) if isinstance(v, Tensor)]
                elif isinstance(inverse, Tensor):
                    inverse = [inverse]
                out[name] = [t.clone() for t in [*(layer.factors or []), *inverse]]
            return out
        before, old = snapshot(), list(kfac.placement.owners)
        new = [2 if o == 1 else o for o in old]

        def update(costs: list[float]) -> list[int]:
            kfac.placement.owners = new
            return old
        kfac.placement.update = update  # type: ignore[method-assign,assignment]
        kfac._rebalance()
        return before, snapshot(), old, new

    results = ThreadWorld(3).run(rank)
    old, new = results[0][2], results[0][3]
    assert 1 in old, old  # rank 1 owns something to move
    names = list(KFAC(_model(), cfg).layers)
    moved = {names[i] for i in range(len(names)) if old[i] == 1}
    assert results[0][0].keys() == results[0][1].keys()  # rank 0 untouched
    assert all(torch.equal(a, b) for k in results[0][0] for a, b in zip(results[0][0][k], results[0][1][k]))
    assert set(results[1][1]) == set(results[1][0]) - moved
    after2 = results[2][1]
    assert set(after2) == set(results[2][0]) | moved
    for name in moved:
        assert len(after2[name]) == len(results[1][0][name])
        assert all(torch.equal(a, b) for a, b in zip(after2[name], results[1][0][name], strict=True)), name
    assert sorted(set(new)) == [0, 2]


# -- under mpirun -------------------------------------------------------------------------------------------
SPNGD = str(Path(sys.executable).parent / "spngd")
SMOKE = str(REPO / "configs" / "smoke.yaml")
WORKER = REPO / "tests" / "mpi" / "ckpt_worker.py"


def _spngd(np: int, tmp_path: Path, steps: int, share: str) -> str:
    rc, out = run_mpi(np, SPNGD, "train", "--config", SMOKE, "--set", f"output.dir={tmp_path}",
                      "--set", "output.name=run", "--set", f"train.max_steps={steps}", "--set", "train.log_every=1",
                      "--set", "output.plot=false", "--set", "optim.preconditioner=kfac",
                      "--set", f"kfac.share={share}", "--set", "kfac.adaptive_lambda=0.3",
                      "--set", "checkpoint.resume=auto", timeout=300)
    assert rc == 0, out
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("share", ["inverses", "gradients"])
def test_spngd_train_resumes_at_another_world_size(tmp_path: Path, share: str) -> None:
    """``spngd train`` at 4 ranks for 4 steps, then resumed at 3 to step 8: the run continues (finite losses,
    steps 1..8 logged once each), and its last checkpoint holds every layer's K-FAC state for 3 ranks."""
    skip_unless_runnable()
    _spngd(4, tmp_path, 4, share)
    out = _spngd(3, tmp_path, 8, share)
    assert "checkpoint was written by 4 ranks, resuming on 3" in out
    run = tmp_path / "run"
    with (run / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row["kind"] == "train"]
    assert [int(row["step"]) for row in rows] == list(range(1, 9))
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert float(rows[-1]["kfac_steps"]) == 8  # counted on from the checkpoint
    found = Checkpointer(run, keep=2).load_latest()
    assert found is not None
    state = found[0]
    assert state["step"] == 8 and state["world_size"] == 3 and len(state["rng"]) == len(state["batchnorm"]) == 3
    _complete(state, 3)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [3, 4])
def test_checkpoint_and_replacement_send_to_the_receiver_only(np: int) -> None:
    run_check_worker(WORKER, "torch", np, timeout=300)
