"""Every Comm primitive (and GradientAverager) against values each rank computes locally.

Run under mpirun: ``mpirun -np N python tests/mpi/comm_worker.py --backend torch|horovod``.
Rank r's input is a deterministic function of r, so every rank knows every expected result.
Mismatches are recorded, not raised, so all ranks keep issuing the same collectives; rank 0 ends
with ``ALL OK`` or the job exits 1 listing the failures.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import torch
from harness import expect
from torch import Tensor, nn

from app.comm import Comm, Count
from app.comm.grad_sync import GradientAverager


def expect_close(actual: Tensor, expected: Tensor, what: str) -> None:
    ok = actual.shape == expected.shape and actual.dtype == expected.dtype and \
        torch.allclose(actual, expected, rtol=1e-12, atol=1e-12)
    expect(ok, f"{what}: got {actual.tolist()}, expected {expected.tolist()}")


def value(rank: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    """Rank r's input: (r + 1) * [1, 2, 3, ...] (+ 0.25 r so ranks differ in more than scale)."""
    n = 1
    for s in shape:
        n *= s
    return ((rank + 1) * torch.arange(1, n + 1, dtype=torch.float64) + 0.25 * rank).to(dtype).reshape(shape)


def reduced(ranks: list[int], shape: tuple[int, ...], op: str,
            dtype: torch.dtype = torch.float64) -> Tensor:
    total = sum(value(r, shape, dtype) for r in ranks)
    assert isinstance(total, Tensor)
    return total / len(ranks) if op == "avg" else total


def check_allreduce(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for op in ("sum", "avg"):
        t = value(me, (2, 3))
        out = comm.allreduce(t, op=op)
        expect(out is t, "allreduce returns its input tensor")
        expect_close(t, reduced(ranks, (2, 3), op), f"allreduce {op}")
    t = value(me, (4,), torch.int64)
    expect_close(comm.allreduce(t, op="sum"), reduced(ranks, (4,), "sum", torch.int64), "allreduce int64 sum")
    t = value(me, (3, 2)).t()  # non-contiguous: staged and copied back
    expect_close(comm.allreduce(t, op="sum"), reduced(ranks, (3, 2), "sum").t(), "allreduce of a transposed view")
    handles = [(comm.allreduce_async(value(me, (k + 1,)), op="sum"), k) for k in range(3)]
    for h, k in reversed(handles):
        expect_close(h.wait(), reduced(ranks, (k + 1,), "sum"), f"allreduce_async #{k}")


def check_grouped(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    shapes = [(3,), (2, 2), (0,), (1, 1, 2)]
    for op in ("sum", "avg"):
        ts = [value(me, s) for s in shapes]
        out = comm.grouped_allreduce(ts, op=op)
        for t, o, s in zip(ts, out, shapes):
            expect(o is t, "grouped_allreduce returns its inputs")
            expect_close(t, reduced(ranks, s, op), f"grouped_allreduce {op} {s}")
    ts = [value(me, s) for s in shapes]
    for t, s in zip(comm.grouped_allreduce_async(ts, op="avg").wait(), shapes):
        expect_close(t, reduced(ranks, s, "avg"), f"grouped_allreduce_async {s}")


def size_patterns(n: int) -> dict[str, list[int]]:
    return {
        "even": [3] * n,
        "uneven": [r + 1 for r in range(n)],
        "zeros inside": [0 if r % 2 else 2 * r + 1 for r in range(n)],
        "one owner": [0] * (n - 1) + [7],
        "all empty": [0] * n,
    }


def check_reduce_scatter(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for label, sizes in size_patterns(comm.size).items():
        numel = sum(sizes)
        start = sum(sizes[: comm.rank])
        for op in ("sum", "avg"):
            flat = value(me, (numel,))
            before = flat.clone()
            out = comm.reduce_scatter(flat, sizes, op=op)
            want = reduced(ranks, (numel,), op)[start: start + sizes[comm.rank]]
            expect_close(out, want, f"reduce_scatter {op} {label} {sizes}")
            expect_close(flat, before, f"reduce_scatter leaves the buffer unchanged ({label})")
        flat = value(me, (numel,))
        h = comm.reduce_scatter_async(flat, sizes, op="sum")
        expect_close(h.wait(), reduced(ranks, (numel,), "sum")[start: start + sizes[comm.rank]],
                     f"reduce_scatter_async {label}")


def check_allgather(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    rows = [r % 3 for r in ranks]  # 0, 1, 2, 0 rows: uneven, zero-length included
    got = comm.allgather(value(me, (rows[comm.rank], 2)))
    expect(len(got) == comm.size, f"allgather returned {len(got)} tensors for {comm.size} ranks")
    for r, g in zip(ranks, got):
        expect_close(g, value(r, (r % 3, 2)), f"allgather uneven, rank {r}'s part")
    got = comm.allgather(value(me, (0, 3)))
    expect(all(g.shape == (0, 3) for g in got), "allgather of empty tensors")
    h = comm.allgather_async(value(me, (2,), torch.float32))
    for r, g in zip(ranks, h.wait()):
        expect_close(g, value(r, (2,), torch.float32), f"allgather_async 1-D, rank {r}'s part")


def check_broadcast(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for root in range(comm.size):
        t = value(me, (3,))
        expect(comm.broadcast(t, root) is t, "broadcast returns its input tensor")
        expect_close(t, value(ranks[root], (3,)), f"broadcast from {root}")
    t = value(me, (2, 2))
    expect_close(comm.broadcast_async(t, comm.size - 1).wait(), value(ranks[-1], (2, 2)), "broadcast_async")
    t = value(me, (1, 3, 2, 2)).contiguous(memory_format=torch.channels_last)
    comm.broadcast(t, 0)
    expect_close(t.contiguous(), value(ranks[0], (1, 3, 2, 2)), "broadcast of a channels_last tensor")
    expect(t.is_contiguous(memory_format=torch.channels_last), "broadcast keeps the caller's layout")
    comm.barrier()


PRIMITIVES: list[Callable[[Comm, list[int]], None]] = [
    check_allreduce, check_grouped, check_reduce_scatter, check_allgather, check_broadcast]


def check_subgroups(comm: Comm) -> None:
    expect(comm.subgroup(list(range(comm.size))) is comm, "subgroup(all ranks) is the world")
    groups = [list(range(0, comm.size, 2)), list(range(1, comm.size, 2)), [comm.size - 1]]
    for ranks in [g for g in groups if g]:
        sub = comm.subgroup(ranks)
        expect(comm.subgroup(ranks) is sub, f"subgroup {ranks} is cached")
        if comm.rank not in ranks:
            expect(sub is None, f"rank {comm.rank} outside {ranks} gets None")
            continue
        assert sub is not None
        expect((sub.rank, sub.size) == (ranks.index(comm.rank), len(ranks)),
               f"subgroup {ranks}: rank/size {(sub.rank, sub.size)}")
        for check in PRIMITIVES:
            check(sub, ranks)


def check_duplicate(comm: Comm) -> None:
    """A duplicate's collectives pair among themselves: launched in opposite orders on odd and even
    ranks (world first / duplicate first), both still reduce the right tensors."""
    dup = comm.duplicate()
    expect(dup is not comm and (dup.rank, dup.size) == (comm.rank, comm.size), "duplicate: same ranks, new comm")
    for check in PRIMITIVES:
        check(dup, list(range(comm.size)))
    mine, other = torch.full((4,), comm.rank + 1.0), torch.full((9,), 10.0 * (comm.rank + 1))
    if comm.rank % 2:
        h_other = dup.allreduce_async(other, op="sum", name="dup")
        h_mine = comm.allreduce_async(mine, op="sum", name="world")
    else:
        h_mine = comm.allreduce_async(mine, op="sum", name="world")
        h_other = dup.allreduce_async(other, op="sum", name="dup")
    total = comm.size * (comm.size + 1) / 2
    expect_close(h_mine.wait(), torch.full((4,), total), "world allreduce beside a duplicate's")
    expect_close(h_other.wait(), torch.full((9,), 10.0 * total), "duplicate allreduce beside the world's")
    comm.barrier()


def check_counters(comm: Comm) -> None:
    comm.counters.reset()
    a, b = torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float32)
    comm.allreduce(a, name="x")
    comm.grouped_allreduce([b, b.clone()], name="x")
    comm.reduce_scatter(torch.zeros(2 * comm.size, dtype=torch.float16), [2] * comm.size, name="rs")
    comm.allgather(torch.zeros(comm.rank + 1, 4, dtype=torch.int32), name="ag")
    comm.broadcast(torch.zeros(7, dtype=torch.uint8), 0, name="bc")
    want = {"x": Count(2, 40 + 12 + 12), "rs": Count(1, 2 * comm.size * 2),
            "ag": Count(1, (comm.rank + 1) * 16), "bc": Count(1, 7)}
    expect(comm.counters.snapshot() == want, f"counters {comm.counters.snapshot()} != {want}")
    sub = comm.subgroup([comm.size - 1])
    if sub is not None:
        sub.allreduce(torch.zeros(2, dtype=torch.float64), name="sub")
    counts = comm.counters.snapshot()
    expect(counts.get("sub") == (Count(1, 16) if sub is not None else None),
           f"subgroup traffic counts into the parent's counters: {counts}")
    comm.counters.reset()
    expect(comm.counters.snapshot() == {}, "counters reset")


class Net(nn.Module):
    """Two layers, a frozen one, one never used, and one used only for flagged examples."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.side = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 2)
        self.frozen, self.unused = nn.Linear(3, 3), nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        out = self.l2(torch.relu(self.l1(self.frozen(x))))
        if bool(flag.any()):
            out = out + flag[:, None] * self.side(x)
        return out


def check_gradient_averager(comm: Comm) -> None:
    """N ranks on shards == one process on the concatenated batch, also with accumulation."""
    torch.manual_seed(0)
    batch = 2 * comm.size
    x = torch.randn(batch, 3, dtype=torch.float64)
    y = torch.randn(batch, 2, dtype=torch.float64)
    flag = (torch.arange(batch) < 2).double()  # only rank 0's shard uses `side`
    ref, net = Net().double(), Net().double()
    net.load_state_dict(ref.state_dict())
    nn.functional.mse_loss(ref(x, flag), y).backward()
    avg = GradientAverager(net, comm, bucket_mb=60 / 2**20)  # ~60-byte buckets: several of them
    mine = slice(2 * comm.rank, 2 * comm.rank + 2)
    for step in range(2):  # twice: state must reset between steps
        net.zero_grad(set_to_none=True)
        with avg.no_sync():  # micro-batch 1 of 2: accumulate locally
            nn.functional.mse_loss(net(x[mine][:1], flag[mine][:1]), y[mine][:1]).div(2).backward()
        nn.functional.mse_loss(net(x[mine][1:], flag[mine][1:]), y[mine][1:]).div(2).backward()
        avg.wait()
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            if q.grad is None:
                expect(p.grad is None, f"step {step}: {name} has no gradient anywhere, got one")
            else:
                expect(p.grad is not None, f"step {step}: {name} lost its gradient")
                if p.grad is not None:
                    expect_close(p.grad, q.grad, f"step {step}: averaged gradient of {name}")
    avg.remove()


def _checks(comm: Comm, backend: str) -> str:
    for check in PRIMITIVES:
        check(comm, list(range(comm.size)))
    check_subgroups(comm)
    check_duplicate(comm)
    check_counters(comm)
    check_gradient_averager(comm)
    return ""


if __name__ == "__main__":
    harness.main(_checks)
