"""Which rank owns (factorises) each K-FAC layer: a cost model and greedy LPT, no communication.

**Unit.** A layer (both factors of a Linear/Conv2d, all 2x2 blocks of a BatchNorm2d): the owner
of a layer can precondition its gradient with no further exchange (``share=gradients``). For
ResNet-50 this costs nothing against per-factor placement: the bound below is set by one factor.

**Cost** of one layer per step, in flop-equivalents::

    sum over its factors (n^3 + MEMORY_WEIGHT n^2 + LATENCY) / interval
    + copies * prod(n) * sum(n)                     (share=gradients: it preconditions every step)

* ``n^3``: Cholesky (n^3/3) + ``cholesky_inverse`` (2n^3/3); ``eigh`` is a larger multiple of the
  same power, which changes no ranking.
* ``MEMORY_WEIGHT n^2``: the passes over a factor per refresh (unpack, finite check, Diff, running
  average, damped copy, packing the inverse): about 8 passes x 8 bytes read+written per element,
  at the 2.4 flop/byte ratio of H100 Cholesky (8.2 TFLOP/s effective, below) to HBM (3.35 TB/s).
* ``LATENCY`` per Cholesky/eigh call (not for the batched closed-form 2x2 blocks): small
  factorisations are latency bound. Fitted to the H100 measurements in DESIGN.md: all 108
  ResNet-50 factors take 122 ms with Cholesky (1468 ms with eigh) and the 4608 x 4608 one 11.9 ms
  (136 ms); pure n^3 would give that factor 21.6 % of the total, measured is 9.8 % (9.3 %), and a
  fixed 6e9 flop-equivalents per call (~0.6 ms) reproduces both.
* ``interval``: refreshes happen every ``interval`` steps (fixed or adaptive), so a rarely
  refreshed factor costs proportionally less.

**Balance.** Greedy longest-processing-time: layers by decreasing cost (ties by layer order), each
to the least-loaded rank (ties by rank), so every rank computes the same owners from the same
costs. No placement of indivisible layers beats ``max(largest cost, total / ranks)``;
``lower_bound`` reports it as a max/mean ratio.

**Rebalancing.** When adaptive intervals change the costs, ``Placement.update`` re-places only if
the current owners' busiest rank is more than ``REBALANCE_GAIN`` times the fresh LPT's, and at most
``max_rebalances`` times per run (moving a layer moves its factor state).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

MEMORY_WEIGHT = 160.0
LATENCY = 6e9
REBALANCE_GAIN = 1.10

Shape = tuple[int, ...]


def refresh_cost(shape: Shape) -> float:
    """Flop-equivalents to refresh and factorise one factor of ``shape`` ((n, n) or (copies, n, n))."""
    n = shape[-1]
    copies = math.prod(shape[:-2])
    latency = LATENCY if len(shape) == 2 else 0.0
    return copies * (n ** 3 + MEMORY_WEIGHT * n ** 2) + latency


def layer_cost(shapes: Sequence[Shape], interval: int, precondition: bool) -> float:
    """Expected flop-equivalents per step for the owner of a layer with these factor shapes."""
    cost = sum(refresh_cost(s) for s in shapes) / interval
    if precondition:
        dims = [s[-1] for s in shapes]
        cost += math.prod(shapes[0][:-2]) * math.prod(dims) * sum(dims)
    return cost


def lpt(costs: Sequence[float], ranks: int) -> list[int]:
    """Owner rank of each item: greedy longest-processing-time, deterministic."""
    heap = [(0.0, r) for r in range(ranks)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], ranks: int) -> list[float]:
    out = [0.0] * ranks
    for c, r in zip(costs, owners, strict=True):
        out[r] += c
    return out


def imbalance(values: Sequence[float]) -> float:
    """max / mean of per-rank values (1.0 when all are zero)."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def lower_bound(costs: Sequence[float], ranks: int) -> float:
    """The smallest max/mean any placement of these indivisible costs on ``ranks`` can reach."""
    mean = sum(costs) / ranks
    return max(max(costs), mean) / mean if mean > 0 else 1.0


class Placement:
    """The owners of the layers, identical on every rank; see the module docstring."""

    def __init__(self, costs: Sequence[float], ranks: int, max_rebalances: int) -> None:
        self.ranks = ranks
        self.owners = lpt(costs, ranks)
        self.max_rebalances = max_rebalances
        self.rebalances = 0

    def update(self, costs: Sequence[float]) -> list[int] | None:
        """Re-place for new costs when worthwhile and allowed; returns the previous owners, or None."""
        if self.rebalances >= self.max_rebalances or self.ranks == 1:
            return None
        fresh = lpt(costs, self.ranks)
        if max(loads(costs, self.owners, self.ranks)) <= REBALANCE_GAIN * max(loads(costs, fresh, self.ranks)):
            return None
        old, self.owners = self.owners, fresh
        self.rebalances += 1
        return old


def model_factor_shapes(arch: str, num_classes: int, batchnorm: bool = True) -> dict[str, list[Shape]]:
    """Factor shapes of every K-FAC layer of ``arch``, from a parameter-free (meta) model."""
    from app.kfac.factors import find_layers
    from app.models import resnet

    with torch.device("meta"):
        model = resnet(arch, num_classes)
    return {name: layer.factor_shapes for name, layer in find_layers(model, [], batchnorm).items()}


def balance_table(shapes: Sequence[Sequence[Shape]], ranks: Sequence[int],
                  precondition: bool) -> list[dict[str, float]]:
    """Per rank count: LPT cost max/mean, its lower bound, and owned factor memory (fp32 MiB)."""
    costs = [layer_cost(s, 1, precondition) for s in shapes]
    mib = [sum(math.prod(x) for x in s) * 4 / 2 ** 20 for s in shapes]
    rows = []
    for p in ranks:
        owners = lpt(costs, p)
        mem = loads(mib, owners, p)
        rows.append({"ranks": p, "cost_max_over_mean": imbalance(loads(costs, owners, p)),
                     "lower_bound": lower_bound(costs, p), "mem_max_mib": max(mem),
                     "mem_mean_mib": sum(mem) / p, "idle_ranks": p - len(set(owners))})
    return rows

