"""Comm primitives and GradientAverager.

In-process tests cover argument checking, counters and bucketing on a one-rank or fake
communicator. The real collectives run under mpirun: one launch per (backend, ranks) executes
every check in tests/mpi/comm_worker.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch
from mpi_helpers import (
    REPO,
    run_check_worker,
)
from torch import Tensor, nn

from app import launch
from app.comm import ByteCounters, Comm, CommError, Count, Handle
from app.comm.base import Launched, Op, pad_dim0
from app.comm.grad_sync import GradientAverager
from app.comm.traffic import Traffic
from app.config import CommConfig

WORKER = REPO / "tests" / "mpi" / "comm_worker.py"


def _run_worker(backend: str, np: int) -> None:
    run_check_worker(WORKER, backend, np, timeout=180)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [1, 2, 3, 4])
def test_torch_backend_primitives(np: int) -> None:
    _run_worker("torch", np)


@pytest.mark.mpi
@pytest.mark.horovod
@pytest.mark.parametrize("np", [1, 2, 3, 4])
def test_horovod_backend_primitives(np: int) -> None:
    _run_worker("horovod", np)


# ---- in-process: one-rank torch communicator ------------------------------------------------

@pytest.fixture
def comm() -> Iterator[Comm]:
    c = launch.init_comm(launch.World(0, 1, 0, 1, "single"), CommConfig(backend="torch"),
                         torch.device("cpu"))
    yield c
    c.shutdown()


@pytest.mark.parametrize("call, message", [
    (lambda c: c.reduce_scatter(torch.zeros(5), [2]), "segment sizes sum to 2, but the buffer has 5"),
    (lambda c: c.reduce_scatter(torch.zeros(4), [2, 2]), "2 segment sizes given for 1 ranks"),
    (lambda c: c.reduce_scatter(torch.zeros(0), [-1]), "must be non-negative integers"),
    (lambda c: c.reduce_scatter(torch.zeros(2, 2), [4]), "needs a 1-D buffer, got shape (2, 2)"),
    (lambda c: c.allreduce(torch.zeros(2), op="max"), "op 'max' is not one of avg, sum"),
    (lambda c: c.allreduce(torch.zeros(2, dtype=torch.int32)), "'avg' needs a floating-point tensor"),
    (lambda c: c.allreduce([1.0]), "expected a torch.Tensor, got list"),
    (lambda c: c.grouped_allreduce([]), "needs at least one tensor"),
    (lambda c: c.grouped_allreduce([torch.zeros(1), torch.zeros(1, dtype=torch.float64)]), "needs one dtype"),
    (lambda c: c.allgather(torch.tensor(1.0)), "at least one dimension"),
    (lambda c: c.broadcast(torch.zeros(1), root=1), "root 1 is not a rank of a communicator of size 1"),
    (lambda c: c.allgather(torch.zeros(2), lengths=[1]), "lengths[0] is 1, but this rank's tensor has 2 rows"),
    (lambda c: c.allgather(torch.zeros(2), lengths=[2, 0]), "lengths [2, 0] must be 1 non-negative integers"),
    (lambda c: c.allgather(torch.zeros(0), lengths=[-1]), "lengths [-1] must be 1 non-negative integers"),
    (lambda c: c.allgather(torch.zeros(1), lengths=[True]), "lengths [True] must be 1 non-negative integers"),
    (lambda c: c.allgather(torch.zeros(1), lengths=[1.0]), "lengths [1.0] must be 1 non-negative integers"),
    (lambda c: c.gather(torch.zeros(1), root=1), "root 1 is not a rank of a communicator of size 1"),
    (lambda c: c.gather(torch.zeros(1), root=-1), "root -1 is not a rank"),
    (lambda c: c.gather(torch.tensor(1.0), root=0), "gather needs a tensor with at least one dimension"),
    (lambda c: c.gather(torch.zeros(2), 0, lengths=[3]), "lengths[0] is 3, but this rank's tensor has 2 rows"),
    (lambda c: c.gather([1.0], 0), "expected a torch.Tensor, got list"),
    (lambda c: c.subgroup([]), "must be distinct, increasing and within 0..0"),
    (lambda c: c.subgroup([0, 0]), "must be distinct"),
    (lambda c: c.subgroup([1]), "within 0..0"),
])
def test_bad_arguments_are_one_line_errors(comm: Comm, call: Callable[[Comm], object], message: str) -> None:
    with pytest.raises(CommError, match=re.escape(message)) as info:
        call(comm)
    assert "\n" not in str(info.value)


def test_error_names_the_call_site(comm: Comm) -> None:
    with pytest.raises(CommError, match=r"^factors: segment sizes"):
        comm.reduce_scatter(torch.zeros(3), [4], name="factors")


def test_one_rank_primitives_and_counters(comm: Comm) -> None:
    t = torch.arange(6.0).reshape(2, 3)
    assert comm.allreduce(t.clone(), op="sum").equal(t)
    assert comm.reduce_scatter(torch.arange(4.0), [4]).equal(torch.arange(4.0))
    assert [g.shape for g in comm.allgather(torch.zeros(0, 5))] == [(0, 5)]
    assert comm.allgather(t, lengths=[2], name="known")[0] is t  # own part: no copy
    gathered = comm.gather(t, 0)
    assert gathered is not None and gathered[0] is t
    assert comm.subgroup([0]) is comm
    # The lengths exchange is one call of 8 bytes a rank, and it is no payload (data 0).
    assert comm.counters.snapshot() == {"allreduce": Count(1, 24, 24, 24), "reduce_scatter": Count(1, 16, 16, 16),
                                        "allgather": Count(1, 8, 8, 0), "known": Count(1, 24, 0, 0),
                                        "gather": Count(1, 8, 8, 0)}


def test_byte_counters_sum_traffic_and_snapshot_is_a_copy() -> None:
    c = ByteCounters()
    c.add("a", Traffic(sent=3, received=5, data=4, calls=2))
    snap = c.snapshot()
    c.add("a", Traffic(sent=1, received=1, calls=0))
    c.add("b", Traffic())
    assert snap == {"a": Count(2, 3, 5, 4)}
    assert c.snapshot() == {"a": Count(2, 4, 6, 4), "b": Count(1, 0, 0, 0)}
    c.reset()
    assert c.snapshot() == {}


def test_handle_waits_once() -> None:
    calls: list[int] = []

    def finish() -> int:
        calls.append(1)
        return len(calls)
    h = Handle(finish)
    assert h.wait() == 1 and h.wait() == 1 and calls == [1]


def test_pad_dim0() -> None:
    t = torch.ones(2, 3)
    assert pad_dim0(t, 2) is t
    assert pad_dim0(t, 4).equal(torch.cat([t, torch.zeros(2, 3)]))


# ---- GradientAverager bucketing, on a fake two-rank communicator ----------------------------

class EchoComm(Comm):
    """Pretends to be rank 0 of 2 whose peer holds identical tensors: averages are the inputs.

    It records the size of each allreduce it launches.
    """

    def __init__(self) -> None:
        super().__init__(0, 2, torch.device("cpu"))
        self.launches: list[int] = []

    def _allreduce(self, tensors: list[Tensor], op: Op, name: str) -> Launched[object]:
        self.launches.append(tensors[0].numel())
        return (lambda: None), Traffic()

    def _reduce_scatter(self, flat: Tensor, sizes: list[int], op: Op, name: str) -> Launched[Tensor]:
        raise NotImplementedError

    def _allgather(self, t: Tensor, lengths: list[int] | None, name: str) -> Launched[list[Tensor]]:
        raise NotImplementedError

    def _gather(self, t: Tensor, root: int, lengths: list[int] | None, name: str) -> Launched[list[Tensor] | None]:
        raise NotImplementedError

    def _broadcast(self, t: Tensor, root: int, name: str) -> Launched[object]:
        raise NotImplementedError

    def _new_subgroup(self, ranks: list[int]) -> Comm | None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _grads(model: nn.Module) -> list[Tensor]:
    out = [p.grad for p in model.parameters()]
    assert all(g is not None for g in out)
    return [g.clone() for g in out if g is not None]


def test_buckets_launch_during_backward_in_order() -> None:
    model, comm = _mlp(), EchoComm()
    avg = GradientAverager(model, comm, bucket_mb=30 * 4 / 2**20)  # 30 floats per bucket
    seen_in_backward: list[int] = []
    fc1 = model[0]
    assert isinstance(fc1, nn.Linear)
    fc1.bias.register_post_accumulate_grad_hook(lambda _: seen_in_backward.extend(comm.launches))
    model(torch.randn(3, 4)).sum().backward()
    # Reverse order: fc3.b 2 + fc3.w 16 + fc2.b 8 | fc2.w 64 | fc1.b 8 | fc1.w 32 (+1 flag each).
    assert len(seen_in_backward) >= 2, "buckets completed early in backward were not sent right away"
    expected = _grads(model)
    avg.wait()
    assert comm.launches == [26 + 3, 64 + 1, 8 + 1, 32 + 1]
    assert all(g.equal(e) for g, e in zip(_grads(model), expected, strict=True))


def test_no_sync_accumulates_and_sends_once() -> None:
    model, comm = _mlp(), EchoComm()
    avg = GradientAverager(model, comm)
    x = torch.randn(4, 4)
    with avg.no_sync():
        model(x[:2]).sum().backward()
    assert comm.launches == []
    model(x[2:]).sum().backward()
    avg.wait()
    assert len(comm.launches) == 1
    averaged = _grads(model)
    model.zero_grad()
    model(x).sum().backward()
    assert all(torch.allclose(a, g) for a, g in zip(averaged, _grads(model), strict=True))


def test_second_backward_before_wait_is_refused() -> None:
    model = _mlp()
    GradientAverager(model, EchoComm())  # its hooks keep it alive
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="changed after its bucket was sent"):
        model(torch.randn(2, 4)).sum().backward()


def test_single_rank_averager_is_a_no_op(comm: Comm) -> None:
    model = _mlp()
    avg = GradientAverager(model, comm)
    model(torch.randn(2, 4)).sum().backward()
    before = _grads(model)
    avg.wait()
    assert all(g.equal(b) for g, b in zip(_grads(model), before, strict=True))
    assert comm.counters.snapshot() == {}


def test_bucket_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bucket_mb=0"):
        GradientAverager(_mlp(), EchoComm(), bucket_mb=0)


def test_solo_comm_is_the_identity_over_one_rank() -> None:
    """SoloComm (spngd bench's one-process world) reduces, scatters and gathers one rank's values as the
    library would, and counts the same traffic, with no process group started."""
    from app.comm.solo import SoloComm

    comm = SoloComm(torch.device("cpu"))
    t = torch.arange(6.0)
    assert torch.equal(comm.allreduce(t.clone(), op="avg"), t)
    assert torch.equal(comm.reduce_scatter(t.clone(), [6]), t)
    assert [p.tolist() for p in comm.allgather(t[None], lengths=[1])] == [t[None].tolist()]
    gathered = comm.gather(t[None], 0, lengths=[1])
    assert gathered is not None and torch.equal(gathered[0], t[None])
    assert torch.equal(comm.broadcast(t.clone(), 0), t) and comm.counters.snapshot()
    assert not torch.distributed.is_initialized()
