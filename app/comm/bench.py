"""Latency and bandwidth of every Comm primitive, to compare backends and sites.

    mpirun -np 4 spngd comm-bench --backend torch --sizes 4K,1M,16M --iters 5

Each row times one call (after warm-up) of a float32 collective of the given total size S on
every rank; the time is the slowest rank's average. algbw = S / time; busbw scales it by the
fraction of S each rank must send in a bandwidth-optimal algorithm (nccl-tests convention:
2(n-1)/n for allreduce, (n-1)/n for reduce-scatter, allgather and gather, 1 for broadcast and
for an allgather whose data all sits on one rank), so busbw is comparable across rank counts
and with the link speed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

import torch

from app.comm.base import Comm

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """'4K' -> 4096 bytes; sizes are rounded down to whole float32 elements."""
    m = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"size {text!r} is not like 4K, 1M or 16M")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _split(n: int, parts: int) -> list[int]:
    """n elements in `parts` nearly equal segments (the first ones one longer)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def _cases(comm: Comm, n: int) -> list[tuple[str, float, Callable[[], object]]]:
    """(name, busbw factor, one call) for a total of n float32 elements."""
    dev, p = comm.device, comm.size
    buf = torch.ones(n, device=dev)
    quarters = [torch.ones(k, device=dev) for k in _split(n, 4)]
    eighths = [torch.ones(k, device=dev) for k in _split(n, 8)]
    mine = torch.ones(_split(n, p)[comm.rank], device=dev)
    last_holds_all = torch.ones(n if comm.rank == p - 1 else 0, device=dev)  # padding cost size x S before
    ring = (p - 1) / p

    def async_x4() -> None:
        for h in [comm.allreduce_async(q, op="sum") for q in quarters]:
            h.wait()

    return [
        ("allreduce", 2 * ring, lambda: comm.allreduce(buf, op="sum")),
        ("allreduce_async x4", 2 * ring, async_x4),
        ("grouped_allreduce x8", 2 * ring, lambda: comm.grouped_allreduce(eighths, op="sum")),
        ("reduce_scatter", ring, lambda: comm.reduce_scatter(buf, _split(n, p), op="sum")),
        ("reduce_scatter skewed", ring, lambda: comm.reduce_scatter(buf, [n] + [0] * (p - 1), op="sum")),
        ("allgather", ring, lambda: comm.allgather(mine)),
        ("allgather skewed", 1.0, lambda: comm.allgather(last_holds_all)),
        ("gather", ring, lambda: comm.gather(mine, 0)),
        ("broadcast", 1.0, lambda: comm.broadcast(buf, 0)),
    ]


def _time(comm: Comm, call: Callable[[], object], iters: int, warmup: int) -> float:
    """Seconds per call on the slowest rank."""
    for _ in range(warmup):
        call()
    comm.barrier()
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=comm.device)
    return max(t.item() for t in comm.allgather(elapsed, name="bench"))


def run(comm: Comm, sizes: Sequence[int], iters: int, warmup: int) -> list[tuple[str, int, float, float]]:
    """(primitive, bytes, seconds per call, busbw factor) rows; barrier has 0 bytes."""
    rows = [("barrier", 0, _time(comm, comm.barrier, iters, warmup), 0.0)]
    for nbytes in sizes:
        for name, factor, call in _cases(comm, nbytes // 4):
            rows.append((name, nbytes, _time(comm, call, iters, warmup), factor))
    return rows


def _fmt_bytes(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} B"


def table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = [f"{'primitive':<22} {'size':>8} {'time (us)':>11} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    for name, nbytes, secs, factor in rows:
        algbw = nbytes / secs / 1e9
        bw = f"{algbw:>11.3f} {algbw * factor:>11.3f}" if nbytes else f"{'-':>11} {'-':>11}"
        lines.append(f"{name:<22} {_fmt_bytes(nbytes) if nbytes else '-':>8} {secs * 1e6:>11.1f} {bw}")
    return "\n".join(lines)

