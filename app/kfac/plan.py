"""The communication and memory plan of K-FAC at any rank count, without the ranks.

Every figure comes from the functions the run itself uses: ``Placement`` picks the owners,
``plan_buckets`` / ``owner_layout`` cut and lay out the factor buckets, ``share_layout`` sizes the
inverse or gradient allgather, and ``app.comm.traffic`` gives each collective's buffers; the
torch backend's byte counters add up the same ``Traffic`` values. So ``spngd plan`` at 1,024
ranks is what a 1,024-rank run would count, and a test checks plan == counters on real ranks.

Two steps bound a run:

* **refresh-all** (step 0, and any step at which every layer is due): every layer's factors are
  reduce-scattered to their owners, the decisions allreduced, and every inverse (``share=inverses``)
  or every preconditioned gradient (``share=gradients``) allgathered. Its buffers are K-FAC's peak.
* **plain** (no layer due): nothing but the gradient allgather of ``share=gradients``.

Memory per rank is an accounting of the tensors K-FAC allocates, the same as ``KFAC.memory``:
running factors (owned layers), inverses (every layer with ``share=inverses``, owned ones with
``gradients``), the step's statistics (every due layer's sums, on every rank), the exchange buffers
(every bucket's send buffer and own segment: all are in flight at once, plus the decisions), and
the allgather's buffers (the own part and one of exactly each other part). No index caches exist.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.comm import traffic
from app.comm.traffic import Traffic
from app.config import Config, KFACConfig
from app.kfac.exchange import owner_layout, packed_numel, plan_buckets, share_layout
from app.kfac.factors import Layer, find_layers
from app.kfac.intervals import Clock
from app.kfac.placement import Placement, layer_cost

MIB = 2 ** 20
#: The collectives of a step, by the counters' call-site names.
FACTORS, DECISIONS = "kfac.factors", "kfac.decisions"


def layer_costs(layers: Sequence[Layer], intervals: Sequence[int], share: str) -> list[float]:
    """The placement's cost of each layer (``app.kfac.placement``) under these refresh intervals."""
    return [layer_cost(layer.factor_shapes, k, share == "gradients") for layer, k in zip(layers, intervals)]


def decisions_numel(layers: int) -> int:
    """Length of the step's decisions vector (float64): Diff, non-finite flag, damping retries per layer,
    and the fp64 retries."""
    return 3 * layers + 1


def share_dtype(layers: Sequence[Layer]) -> torch.dtype:
    """The allgather's dtype: one that holds every layer's values."""
    dtype = torch.float32
    for layer in layers:
        dtype = torch.promote_types(dtype, layer.dtype)
    return dtype


def share_numel(layer: Layer, share: str, method: str) -> int:
    """What a layer's entry in the allgather holds: its packed inverse or its preconditioned gradient."""
    return packed_numel(layer.inverse_slots(method)) if share == "inverses" else sum(p.numel() for p in layer.params)


def _bytes(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in shapes) * dtype.itemsize


def inverse_bytes(layer: Layer, method: str) -> int:
    return _bytes([s.shape for s in layer.inverse_slots(method)], layer.dtype)


def factor_bytes(layer: Layer) -> int:
    return _bytes(layer.factor_shapes, layer.dtype)


@dataclass
class RankPlan:
    """One rank's figures: bytes held and moved, by part and by collective."""

    rank: int
    memory: dict[str, int]                                     # factors, inverses, statistics, exchange, share
    refresh: dict[str, Traffic] = field(default_factory=dict)  # collective -> traffic, refresh-all step
    plain: dict[str, Traffic] = field(default_factory=dict)    # the same on a plain step

    @property
    def total(self) -> int:
        return sum(self.memory.values())


def _wire(layer: Layer, cfg: KFACConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.wire_dtype == "bfloat16" else layer.dtype


def plan_ranks(layers: Sequence[Layer], cfg: KFACConfig, ranks: int) -> list[RankPlan]:
    """Every rank's plan for ``layers`` (``find_layers`` of a model, real or on the meta device) at
    ``ranks`` ranks, under ``cfg`` (share, inverse method, buckets, wire dtype, intervals)."""
    n = len(layers)
    owners = Placement(layer_costs(layers, Clock(n, cfg).intervals, cfg.share), ranks, cfg.max_rebalances).owners
    every, none = [True] * n, [False] * n
    wire = {i: _wire(layer, cfg) for i, layer in enumerate(layers)}
    order = list(reversed(range(n)))  # backward finishes the layers in reverse
    buckets = plan_buckets([(i, packed_numel(layers[i].factor_slots) * wire[i].itemsize) for i in order],
                           int(cfg.bucket_mb * MIB) if ranks > 1 else None)
    layouts = [owner_layout(b, owners, {i: packed_numel(layers[i].factor_slots) for i in b}, ranks) for b in buckets]
    dtype = share_dtype(layers)
    numel = [share_numel(layer, cfg.share, cfg.inverse) for layer in layers]
    share_name = f"kfac.{cfg.share}"
    refresh_parts = share_layout(cfg.share, owners, ranks, every, every)
    plain_parts = share_layout(cfg.share, owners, ranks, none, every)
    decisions = decisions_numel(n) * torch.float64.itemsize
    statistics = sum(factor_bytes(layer) for layer in layers)
    plans = []
    for r in range(ranks):
        plan = RankPlan(r, {
            "factors": sum(factor_bytes(layer) for i, layer in enumerate(layers) if owners[i] == r),
            "inverses": sum(inverse_bytes(layer, cfg.inverse) for i, layer in enumerate(layers)
                            if cfg.share == "inverses" or owners[i] == r),
            "statistics": statistics, "exchange": 0, "share": 0})
        if ranks > 1:
            for ordered, sizes in layouts:
                element = wire[ordered[0]].itemsize
                plan.refresh[FACTORS] = plan.refresh.get(FACTORS, Traffic(calls=0)) + \
                    traffic.reduce_scatter(sizes, r, element)
                plan.memory["exchange"] += (sum(sizes) + sizes[r]) * element
            plan.refresh[DECISIONS] = traffic.allreduce(decisions)
            plan.memory["exchange"] += decisions
            for step, parts in ((plan.refresh, refresh_parts), (plan.plain, plain_parts)):
                lengths = [sum(numel[i] for i in part) for part in parts]
                if cfg.share == "gradients" or any(lengths):
                    step[share_name] = traffic.allgather(lengths, r, dtype.itemsize, lengths_known=True)
            plan.memory["share"] = sum(sum(numel[i] for i in part) for part in refresh_parts) * dtype.itemsize
        plans.append(plan)
    return plans


def model_layers(arch: str, num_classes: int, cfg: KFACConfig, dtype: torch.dtype = torch.float32) -> list[Layer]:
    """The K-FAC layers of ``arch`` on the meta device: shapes and dtypes, no memory."""
    from app.models import resnet

    with torch.device("meta"):
        model: nn.Module = resnet(arch, num_classes).to(dtype)
    return list(find_layers(model, cfg.skip, cfg.batchnorm).values())


def summary(plans: Sequence[RankPlan], share: str) -> dict[str, float | int | str]:
    """One row of ``spngd plan --json``: max and mean over the ranks, in MiB."""

    def total(p: RankPlan, which: str, attr: str) -> int:
        return sum(getattr(t, attr) for t in getattr(p, which).values())

    mem = [p.total for p in plans]
    row: dict[str, float | int | str] = {
        "ranks": len(plans), "share": share,
        "kfac_mem_max_mib": max(mem) / MIB, "kfac_mem_mean_mib": sum(mem) / len(mem) / MIB,
        "recv_buffer_max_mib": max(total(p, "refresh", "received") for p in plans) / MIB,
        "recv_parts_max_mib": max(total(p, "refresh", "data") for p in plans) / MIB,
    }
    for part in plans[0].memory:
        row[f"{part}_max_mib"] = max(p.memory[part] for p in plans) / MIB
    for which in ("refresh", "plain"):
        for attr in ("sent", "received"):
            values = [total(p, which, attr) for p in plans]
            row[f"{which}_{attr}_max_mib"] = max(values) / MIB
            row[f"{which}_{attr}_mean_mib"] = sum(values) / len(values) / MIB
        row[f"{which}_calls_max"] = max(total(p, which, "calls") for p in plans)
    return row


def _per_rank(p: RankPlan) -> dict[str, Any]:
    row: dict[str, Any] = {"rank": p.rank, "kfac_mem_mib": p.total / MIB,
                           **{f"{part}_mib": v / MIB for part, v in p.memory.items()}}
    for which in ("refresh", "plain"):
        for attr in ("sent", "received", "data", "calls"):
            value = sum(getattr(t, attr) for t in getattr(p, which).values())
            row[f"{which}_{attr}" + ("" if attr == "calls" else "_mib")] = value if attr == "calls" else value / MIB
    return row


def table_rows(cfg: Config, num_classes: int, ranks: Sequence[int], shares: Sequence[str],
               per_rank: bool = False) -> list[dict[str, Any]]:
    """``spngd plan``'s rows: one per (rank count, share) of ``cfg``'s model and K-FAC settings."""
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    rows = []
    for share in shares:
        kfac = dataclasses.replace(cfg.kfac, share=share)
        layers = model_layers(cfg.model.arch, num_classes, kfac, dtype)
        for p in ranks:
            plans = plan_ranks(layers, kfac, p)
            row: dict[str, Any] = summary(plans, share)
            if per_rank:
                row["per_rank"] = [_per_rank(x) for x in plans]
            rows.append(row)
    return sorted(rows, key=lambda r: (r["ranks"], shares.index(r["share"])))


def table(doc: dict[str, Any]) -> str:
    """The plan as text: the max and mean over the ranks per row, then each rank when asked for."""
    out = [f"{doc['model']} ({doc['num_classes']} classes): K-FAC per rank, MiB (max / mean over the ranks); "
           "memory = factors + inverses + step statistics + exchange buffers + allgather buffers (no caches); "
           "traffic per step (torch backend)",
           f"{'ranks':>6} {'share':>9} {'memory':>17} {'factors':>8} {'inverses':>8} {'stats':>7} {'exchange':>8} "
           f"{'allgather':>9} {'refresh sent':>17} {'refresh recv':>17} {'recv buffer':>11} {'recv data':>9} "
           f"{'plain sent':>12} {'plain recv':>12} {'calls':>5}"]
    for r in doc["rows"]:
        out.append(f"{r['ranks']:>6} {r['share']:>9} {r['kfac_mem_max_mib']:>8.1f} / {r['kfac_mem_mean_mib']:<6.1f} "
                   f"{r['factors_max_mib']:>8.1f} {r['inverses_max_mib']:>8.1f} {r['statistics_max_mib']:>7.1f} "
                   f"{r['exchange_max_mib']:>8.1f} {r['share_max_mib']:>9.1f} "
                   f"{r['refresh_sent_max_mib']:>8.1f} / {r['refresh_sent_mean_mib']:<6.1f} "
                   f"{r['refresh_received_max_mib']:>8.1f} / {r['refresh_received_mean_mib']:<6.1f} "
                   f"{r['recv_buffer_max_mib']:>11.1f} {r['recv_parts_max_mib']:>9.1f} "
                   f"{r['plain_sent_max_mib']:>5.1f} / {r['plain_sent_mean_mib']:<4.1f} "
                   f"{r['plain_received_max_mib']:>5.1f} / {r['plain_received_mean_mib']:<4.1f} "
                   f"{r['refresh_calls_max']:>5}")
    for r in doc["rows"]:
        if "per_rank" not in r:
            continue
        out += ["", f"{r['ranks']} ranks, share={r['share']}: rank, memory, factors, inverses, refresh sent, "
                    "refresh received, plain sent, plain received (MiB)"]
        out += [f"{x['rank']:>6} {x['kfac_mem_mib']:>8.1f} {x['factors_mib']:>8.1f} {x['inverses_mib']:>8.1f} "
                f"{x['refresh_sent_mib']:>8.1f} {x['refresh_received_mib']:>8.1f} {x['plain_sent_mib']:>8.1f} "
                f"{x['plain_received_mib']:>8.1f}" for x in r["per_rank"]]
    return "\n".join(out)
