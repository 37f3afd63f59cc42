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

from app.comm import Comm, Count, Handle, traffic
from app.comm.base import nbytes
from app.comm.grad_sync import GradientAverager
from app.comm.order import BACKWARD, FACTORS, GRADIENTS, launch_key
from app.comm.traffic import Traffic


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


def exact_storage(t: Tensor, what: str) -> None:
    """``t`` owns a buffer of exactly its own size: it is no view into a padded or larger one."""
    expect(t.untyped_storage().nbytes() == t.numel() * t.element_size(),
           f"{what}: a {t.numel() * t.element_size()}-byte result lives in a "
           f"{t.untyped_storage().nbytes()}-byte buffer")


def held_bytes(parts: list[Tensor], rank: int) -> int:
    """Bytes of the distinct buffers behind the other ranks' parts of an allgather or gather."""
    storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
                for r, g in enumerate(parts) if r != rank and g.numel()}
    return sum(storages.values())


def check_held(comm: Comm, parts: list[Tensor], what: str) -> None:
    """No receive buffer beyond the parts: the torch backend allocates one buffer per other rank's
    part, of its size; Horovod one buffer of all parts, its own included (its native output)."""
    others = sum(nbytes(g) for r, g in enumerate(parts) if r != comm.rank)
    held = held_bytes(parts, comm.rank)
    ok = held <= others + nbytes(parts[comm.rank]) if type(comm).__name__ == "HorovodComm" else held == others
    expect(ok, f"{what}: the others' parts ({others} bytes) live in {held} bytes of buffers")


def check_reduce_scatter(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for label, sizes in size_patterns(comm.size).items():
        numel = sum(sizes)
        start = sum(sizes[: comm.rank])
        for op in ("sum", "avg"):
            out = comm.reduce_scatter(value(me, (numel,)), sizes, op=op)
            want = reduced(ranks, (numel,), op)[start: start + sizes[comm.rank]]
            expect_close(out, want, f"reduce_scatter {op} {label} {sizes}")
            if out.numel():
                exact_storage(out, f"reduce_scatter {op} {label}")
        flat = value(me, (numel,))
        h = comm.reduce_scatter_async(flat, sizes, op="sum")
        expect_close(h.wait(), reduced(ranks, (numel,), "sum")[start: start + sizes[comm.rank]],
                     f"reduce_scatter_async {label}")
    # several in flight at once, uneven and even, waited in reverse
    pending = [(comm.reduce_scatter_async(value(me, (sum(sizes),)), sizes, op="avg"), sizes)
               for sizes in size_patterns(comm.size).values()]
    for h, sizes in reversed(pending):
        start = sum(sizes[: comm.rank])
        expect_close(h.wait(), reduced(ranks, (sum(sizes),), "avg")[start: start + sizes[comm.rank]],
                     f"reduce_scatter_async in flight together {sizes}")


def part_shapes(n: int) -> dict[str, list[tuple[int, ...]]]:
    """Per-rank shapes of uneven parts: rows differ, trailing dims agree."""
    return {
        "uneven": [(r % 3, 2) for r in range(n)],  # 0, 1, 2, 0 rows: zero-length included
        "trailing dims": [(r + 1, 2, 3) for r in range(n)],
        "one holder": [(0, 4)] * (n - 1) + [(5, 4)],
        "all empty": [(0, 3)] * n,
        "1-D": [(2 * r,) for r in range(n)],
    }


def check_allgather(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for label, shapes in part_shapes(comm.size).items():
        lengths = [s[0] for s in shapes]
        for given in (None, lengths):
            mine = value(me, shapes[comm.rank])
            got = comm.allgather(mine, lengths=given)
            what = f"allgather {label}, lengths {'given' if given else 'exchanged'}"
            expect(len(got) == comm.size, f"{what}: {len(got)} tensors for {comm.size} ranks")
            for r, (q, g) in enumerate(zip(ranks, got)):
                expect_close(g, value(q, shapes[r]), f"{what}, rank {q}'s part")
            check_held(comm, got, what)
    shapes = part_shapes(comm.size)["uneven"]
    pending = [comm.allgather_async(value(me, shapes[comm.rank], dtype), lengths=[s[0] for s in shapes])
               for dtype in (torch.float32, torch.float64)]
    for h, dtype in reversed(list(zip(pending, (torch.float32, torch.float64)))):
        for r, (q, g) in enumerate(zip(ranks, h.wait())):
            expect_close(g, value(q, shapes[r], dtype), f"allgather_async {dtype}, rank {q}'s part")


def check_gather(comm: Comm, ranks: list[int]) -> None:
    me = ranks[comm.rank]
    for root in sorted({0, comm.size - 1}):
        for label, shapes in part_shapes(comm.size).items():
            lengths = [s[0] for s in shapes]
            for given in (None, lengths):
                got = comm.gather(value(me, shapes[comm.rank]), root, lengths=given)
                what = f"gather to {root} {label}, lengths {'given' if given else 'gathered'}"
                if comm.rank != root:
                    expect(got is None, f"{what}: a non-root got {type(got).__name__}, not None")
                    continue
                expect(got is not None and len(got) == comm.size, f"{what}: root got {got}")
                for r, (q, g) in enumerate(zip(ranks, got or [])):
                    expect_close(g, value(q, shapes[r]), f"{what}, rank {q}'s part")
                if got is not None:
                    check_held(comm, got, what)
    shapes = part_shapes(comm.size)["trailing dims"]
    pending = [comm.gather_async(value(me, shapes[comm.rank]), root) for root in range(comm.size)]
    for root, h in reversed(list(enumerate(pending))):
        got = h.wait()
        if comm.rank == root:
            expect(got is not None and all(torch.equal(g, value(q, shapes[r]))
                                           for r, (q, g) in enumerate(zip(ranks, got))),
                   f"gather_async to {root} among others in flight")
        else:
            expect(got is None, f"gather_async to {root}: a non-root got a result")


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
    check_allreduce, check_grouped, check_reduce_scatter, check_allgather, check_gather, check_broadcast]


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


def check_issue_order(comm: Comm) -> None:
    """Two operations readied in opposite orders on odd and even ranks (as hooks of different ranks
    may fire) still pair right: the communicator's queue issues them in key order on every rank."""
    mine, other = torch.full((4,), comm.rank + 1.0), torch.full((9,), 10.0 * (comm.rank + 1))
    handles: dict[str, Handle[Tensor]] = {}
    first, second = launch_key(BACKWARD, 5, GRADIENTS, 0), launch_key(BACKWARD, 2, FACTORS, 0)
    comm.order.add(first, lambda: handles.update(mine=comm.allreduce_async(mine, op="sum", name="mine")))
    comm.order.add(second, lambda: handles.update(other=comm.allreduce_async(other, op="sum", name="other")))
    for key in (second, first) if comm.rank % 2 else (first, second):
        comm.order.ready(key)
    expect(comm.order.idle and sorted(handles) == ["mine", "other"], "issue order: both issued, round over")
    total = comm.size * (comm.size + 1) / 2
    expect_close(handles["mine"].wait(), torch.full((4,), total), "first key's allreduce")
    expect_close(handles["other"].wait(), torch.full((9,), 10.0 * total), "second key's allreduce")
    comm.barrier()


def as_count(t: Traffic) -> Count:
    return Count(t.calls, t.sent, t.received, t.data)


def check_counters(comm: Comm, backend: str) -> None:
    """Every call site's counters against figures worked out here from the sizes, and (torch) against
    app.comm.traffic's functions."""
    comm.counters.reset()
    p, me, torch_backend = comm.size, comm.rank, backend == "torch"
    a, b = torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float32)
    comm.allreduce(a, name="x")
    comm.grouped_allreduce([b, b.clone()], name="x")
    comm.reduce_scatter(torch.zeros(2 * p, dtype=torch.float16), [2] * p, name="rs")
    uneven = [2 * r for r in range(p)]  # rank 0 owns nothing
    comm.reduce_scatter(torch.zeros(sum(uneven)), uneven, name="rsu")
    skewed = [0] * (p - 1) + [8]  # beyond 2 ranks Horovod's padding would exceed an allreduce
    comm.reduce_scatter(torch.zeros(8), skewed, name="rs1")
    rows = [r + 1 for r in range(p)]
    comm.allgather(torch.zeros(me + 1, 4, dtype=torch.int32), name="ag")
    comm.allgather(torch.zeros(me + 1, 4, dtype=torch.int32), name="agk", lengths=rows)
    root, odd = p - 1, [r % 2 for r in range(p)]
    comm.gather(torch.zeros(me % 2, 3, dtype=torch.float64), root, name="g")
    comm.gather(torch.zeros(me % 2, 3, dtype=torch.float64), root, name="gk", lengths=odd)
    comm.broadcast(torch.zeros(7, dtype=torch.uint8), 0, name="bc")

    others_ag = (sum(rows) - rows[me]) * 16
    others_g = (sum(odd) - odd[root]) * 24 if me == root else 0
    longest = max(uneven)
    want = {
        "x": Count(2, 64, 64, 64),
        "rs": Count(1, 4 * p, 4, 4),
        "rsu": Count(max(p - 1, 1), 4 * sum(uneven), 8 * me, 8 * me) if torch_backend else
        Count(1, 4 * p * longest, 4 * longest, 8 * me),
        "rs1": Count(1, 32, 32 if me == root else 0, 32 if me == root else 0) if torch_backend else
        Count(1, 32 * p, 32, 32 if me == root else 0) if p <= 2 else Count(1, 32, 32, 32 if me == root else 0),
        "ag": Count(p + 1 if torch_backend else 2, 16 * rows[me] + 8, others_ag + 8 * p, others_ag),
        "agk": Count(p if torch_backend else 1, 16 * rows[me], others_ag, others_ag),
        "g": Count(2 if not torch_backend else (sum(odd[:root]) if me == root else odd[me]) + 1,
                   8 if me == root else 24 * odd[me] + 8, others_g + 8 * p if me == root else 0, others_g),
        "gk": Count(1 if not torch_backend else sum(odd[:root]) if me == root else odd[me],
                    0 if me == root else 24 * odd[me], others_g, others_g),
        "bc": Count(1, 7, 0, 0) if me == 0 else Count(1, 0, 7, 7),
    }
    got = comm.counters.snapshot()
    for name, count in want.items():
        expect(got.get(name) == count, f"{backend} counters {name}: {got.get(name)} != {count}")
    if torch_backend:
        figures = {
            "x": traffic.allreduce(40) + traffic.allreduce(24), "rs": traffic.reduce_scatter([2] * p, me, 2),
            "rsu": traffic.reduce_scatter(uneven, me, 4), "rs1": traffic.reduce_scatter(skewed, me, 4),
            "ag": traffic.allgather(rows, me, 16, False), "agk": traffic.allgather(rows, me, 16, True),
            "g": traffic.gather(odd, me, root, 24, False), "gk": traffic.gather(odd, me, root, 24, True),
            "bc": traffic.broadcast(7, me == 0),
        }
        for name, t in figures.items():
            expect(got.get(name) == as_count(t), f"counters {name}: {got.get(name)} != traffic.py's {t}")
    sub = comm.subgroup([comm.size - 1])
    if sub is not None:
        sub.allreduce(torch.zeros(2, dtype=torch.float64), name="sub")
    counts = comm.counters.snapshot()
    expect(counts.get("sub") == (Count(1, 16, 16, 16) if sub is not None else None),
           f"subgroup traffic counts into the parent's counters: {counts}")
    comm.counters.reset()
    expect(comm.counters.snapshot() == {}, "counters reset")


def check_no_padding(comm: Comm) -> None:
    """Parts of 1, 0, ..., 0 and 1,000 rows: every rank's receive buffers hold exactly the others'
    parts (the old gloo allgather received size x 1,000 rows on every rank)."""
    if comm.size < 2:
        return
    lengths = [1] + [0] * (comm.size - 2) + [1000]
    mine = torch.full((lengths[comm.rank], 2), float(comm.rank))
    others = (sum(lengths) - lengths[comm.rank]) * 8
    for given in (lengths, None):
        comm.counters.reset()
        got = comm.allgather(mine, name="pad", lengths=given)
        what = f"allgather [1, 0.., 1000] (lengths {'given' if given else 'exchanged'})"
        check_held(comm, got, what)
        count = comm.counters.snapshot()["pad"]
        metadata = 0 if given else 8 * comm.size
        expect(count.data == others and count.received == others + metadata,
               f"{what}: received {count.received}, data {count.data} != parts {others} (+{metadata} lengths)")
        expect(all(torch.equal(g, torch.full((n, 2), float(r))) for r, (g, n) in enumerate(zip(got, lengths))),
               "allgather [1, 0.., 1000]: wrong values")
    comm.counters.reset()


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
    check_issue_order(comm)
    check_counters(comm, backend)
    check_no_padding(comm)
    check_gradient_averager(comm)
    return ""


if __name__ == "__main__":
    harness.main(_checks)
