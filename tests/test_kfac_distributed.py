"""Distributed K-FAC: packing, owner-ordered reduce-scatter buckets, checkpoints across rank counts
(in-process, ranks as threads), and the 1-4 rank equivalence oracle on both real backends (mpirun:
one launch per backend and rank count runs every case of tests/mpi/kfac_worker.py)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mpi_helpers import REPO, run_check_worker
from thread_comm import ThreadComm, ThreadWorld
from torch import Tensor, nn

from app.config import KFACConfig
from app.kfac import KFAC
from app.kfac.exchange import FactorExchange, Slot, pack, packed_numel, unpack

WORKER = REPO / "tests" / "mpi" / "kfac_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", pytest.param("horovod", marks=pytest.mark.horovod)])
@pytest.mark.parametrize("np", [1, 2, 3, 4])
def test_n_ranks_equal_one_process(backend: str, np: int) -> None:
    run_check_worker(WORKER, backend, np, timeout=400)


def test_pack_unpack_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    sym = a + a.T
    blocks = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    blocks = blocks + blocks.transpose(1, 2)
    full = torch.randn(2, 3, generator=g, dtype=torch.float64)
    slots = [Slot((5, 5), True), Slot((3, 2, 2), True), Slot((2, 3), False)]
    assert [s.numel for s in slots] == [15, 9, 6] and packed_numel(slots) == 30
    flat = pack([sym, blocks, full], slots, torch.float32)
    assert flat.shape == (30,) and flat.dtype == torch.float32
    out = unpack(flat, slots, torch.float64)
    for got, want in zip(out, [sym, blocks, full]):
        assert got.dtype == torch.float64 and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(unpack(pack([sym], slots[:1], torch.float64), slots[:1], torch.float64)[0], sym)



@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 64, 65])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_symmetric_packing_is_exact_and_holds_one_triangle(n: int, batch: tuple[int, ...]) -> None:
    """Rectangular full packed form: bitwise round trip (NaN, inf, -0.0 too), n(n+1)/2 numbers per
    matrix, and those numbers are exactly the matrix's upper triangle (as a multiset), so nothing
    is duplicated or lost."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    sym = a + a.mT
    sym.diagonal(dim1=-2, dim2=-1)[..., 0] = float("inf") if n > 1 else -0.0
    if n > 2:
        sym[..., 0, 2] = sym[..., 2, 0] = float("nan")
    flat = pack([sym], [Slot(sym.shape, True)], torch.float64)
    assert flat.shape == (math.prod(batch) * n * (n + 1) // 2,)
    back = unpack(flat, [Slot(sym.shape, True)], torch.float64)[0]
    assert torch.equal(back.nan_to_num(nan=7.0), sym.nan_to_num(nan=7.0)) and back.is_contiguous()
    assert torch.equal(torch.signbit(back), torch.signbit(sym))
    rows, cols = torch.triu_indices(n, n)
    want = sym[..., rows, cols].reshape(-1).nan_to_num(nan=7.0).sort().values
    assert torch.equal(flat.nan_to_num(nan=7.0).sort().values, want)


def test_packing_keeps_nothing_per_size() -> None:
    """No index cache on the device: it held 312 MB of int64 triangle indices for ResNet-50's factor sizes."""
    import app.kfac.exchange as exchange

    assert [name for name, v in vars(exchange).items() if hasattr(v, "cache_info")] == []


def test_exchange_hands_each_owner_exactly_its_averaged_factors() -> None:
    """4 layers, owners [2, 0, 2, 1], planned in backward order into buckets [3] [2] [1, 0]: every owner
    gets the mean of its layers only, and buckets go strictly in plan order whatever order a rank's
    layers finish in (rank 0 finishes them in the reverse order and launches nothing until the last)."""
    shapes = [(3, 3), (2, 2), (4, 4), (5, 2, 2)]
    owners = [2, 0, 2, 1]

    def value(rank: int, i: int) -> Tensor:
        m = torch.arange(torch.Size(shapes[i]).numel(), dtype=torch.float64).reshape(shapes[i]) * (rank + 1) + i
        return m + m.transpose(-1, -2)

    def rank(comm: ThreadComm) -> tuple[dict[int, Tensor], int, Any, list[int]]:
        plan = [(i, owners[i], [Slot(shapes[i], True)], torch.float64) for i in (3, 2, 1, 0)]
        exchange = FactorExchange(comm, plan, bucket_bytes=12 * 8, wire_dtype=None)
        launched = []
        for i in (0, 1, 2, 3) if comm.rank == 0 else (3, 2, 1, 0):
            exchange.add(i, [value(comm.rank, i)])
            counts = comm.counters.snapshot()
            launched.append(counts["kfac.factors"].calls if "kfac.factors" in counts else 0)
        assert exchange.missing == []
        got = {i: ts[0] for bucket in exchange.results() for i, ts in bucket}
        return got, exchange.bytes, comm.counters.snapshot()["kfac.factors"], launched

    results = ThreadWorld(3).run(rank)
    total = sum(Slot(s, True).numel for s in shapes) * 8
    for r, (got, sent, count, launched) in enumerate(results):
        assert sorted(got) == [i for i, o in enumerate(owners) if o == r]
        for i, t in got.items():
            torch.testing.assert_close(t, sum(value(q, i) for q in range(3)) / 3, rtol=0, atol=1e-12)
        # Packed 15 | 10 | 3+6: three buckets, one reduce per owner in each (1 | 1 | 2 calls).
        assert sent == count.sent == total and count.calls == 4
        assert launched == ([0, 0, 0, 4] if r == 0 else [1, 2, 2, 4])


def test_exchange_refuses_a_layer_twice_and_results_with_layers_missing() -> None:
    exchange = FactorExchange(None, [(0, 0, [Slot((2, 2), True)], torch.float64),
                                     (1, 0, [Slot((2, 2), True)], torch.float64)], 1 << 20, None)
    exchange.add(1, [torch.eye(2, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="twice"):
        exchange.add(1, [torch.eye(2, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match=r"missing layers \[0\]"):
        next(exchange.results())


# -- checkpoints --------------------------------------------------------------------------------------------
BATCH = 12


def make_model() -> nn.Module:
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3, padding=1), bn=nn.BatchNorm2d(3), relu=nn.ReLU(),
                                      flat=nn.Flatten(), fc=nn.Linear(48, 4)))
    return model.double().eval()


torch.manual_seed(0)
INIT = make_model().state_dict()  # drawn once: threads share torch's global RNG


CFG = KFACConfig(adaptive_lambda=0.4, share="gradients", damping=0.05, stat_decay=0.8)


def train(comm: ThreadComm | None, steps: range, state: dict[str, Any] | None) -> tuple[list[Tensor], dict[str, Any]]:
    """Plain SGD on K-FAC directions; returns the parameters and the (gathered) checkpoint."""
    model = make_model()
    model.load_state_dict(state["model"] if state is not None else INIT)
    kfac = KFAC(model, CFG, comm)
    if state is not None:
        kfac.load_state_dict(state["kfac"])
    size, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
    rows = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
    base = torch.randn(BATCH, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(BATCH) % 4
    for step in steps:  # slowly changing inputs: some intervals grow
        x = base + 0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        if comm is not None:
            for p in model.parameters():
                comm.allreduce(p.grad)
        kfac.step(0.1)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    params = [p.detach().clone() for p in model.parameters()]
    return params, {"model": model.state_dict(), "kfac": kfac.state_dict()}


def test_checkpoint_resumes_exactly_and_on_other_rank_counts() -> None:
    full = ThreadWorld(2).run(lambda c: train(c, range(10), None))[0][0]
    _, state = ThreadWorld(2).run(lambda c: train(c, range(5), None))[0]
    intervals = state["kfac"]["clock"]["intervals"]
    assert max(intervals) > 1 and state["kfac"]["ranks"] == 2
    assert all(entry["factors"] is not None and entry["inverse"] is not None
               for entry in state["kfac"]["layers"].values())  # gathered from both owners
    same = ThreadWorld(2).run(lambda c: train(c, range(5, 10), state))
    assert all(torch.equal(p, q) for rank in same for p, q in zip(rank[0], full))
    for resumed in (ThreadWorld(3).run(lambda c: train(c, range(5, 10), state))[0][0],
                    train(None, range(5, 10), state)[0]):
        for p, q in zip(resumed, full):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
