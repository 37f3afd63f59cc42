"""When each layer refreshes its factors and inverse: fixed intervals or Algorithm 1 (adaptive).

A layer with no factors yet is always due. Otherwise:

* **Fixed** (``adaptive_lambda = 0``): factors are due when ``t % factor_interval == 0`` (all layers
  on the same steps, so one exchange carries them all), the inverse when also
  ``t % inverse_interval == 0``.
* **Adaptive** (Algorithm 1, DESIGN.md): ``interval_l`` starts at 1, and layer l is due when
  ``t - last_refresh_l >= interval_l``. On each due step the new (rank-averaged, this step's)
  statistics X are compared with the layer's running average F as it stood before X is folded in,
  ``Diff(X, F) = ||X - F||_F / ||F||_F`` (max over the layer's factors); if ``Diff < lambda`` the
  interval grows by 1. The inverse is refreshed with every factor refresh. Why F and not the
  previous refresh's X (DESIGN.md's X_pre): F is the curvature the preconditioner has been using,
  so Diff measures how stale it is; and F averages many batches, so Diff carries the sampling noise
  of one batch instead of the difference of two (about 1/sqrt(2) of it). Not the change of F
  itself either, which the fold damps by ``1 - stat_decay**gap``. The fold is step-aware
  (``Layer.fold``): F decays by ``stat_decay**gap`` with gap = steps since the layer's last refresh,
  so with fixed intervals every refresh decays by ``stat_decay**factor_interval``.

  Why elapsed steps and not DESIGN.md's literal ``t % interval_l == 0``: with the modulo a layer
  that is stable at every refresh gets interval k+1 at a step t = 2k, and the next multiple of k+1
  is always t + 2, so it refreshes every other step for good (50 % of the traffic however stable it
  is). Counting from the last refresh gives the gaps 1, 2, 3, ... the interval means.

A layer whose refresh had non-finite statistics keeps its interval and F (its next gap then spans
both). A layer with no inverse yet (or after resuming with another inverse method) gets one at the next step.

The ``Clock`` holds only what every rank knows alike: Diff is computed by each layer's owner and
handed to ``update`` after the owners have shared it, so all ranks take the same decisions.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from app.config import KFACConfig


def diff(x: Tensor, average: Tensor) -> Tensor:
    """``||x - average||_F / ||average||_F`` (0 when both are zero, inf when only the average is)."""
    num = torch.linalg.vector_norm(x - average)
    den = torch.linalg.vector_norm(average)
    return torch.where(num == 0, torch.zeros_like(num), num / den)


class Clock:
    """Per-layer intervals and refresh state; see the module docstring."""

    def __init__(self, layers: int, cfg: KFACConfig) -> None:
        self.adaptive = cfg.adaptive_lambda > 0
        self.threshold = cfg.adaptive_lambda
        self.inverse_interval = cfg.inverse_interval
        self.intervals = [1 if self.adaptive else cfg.factor_interval] * layers
        self.last = [0] * layers  # step of each layer's latest refresh
        self.diffs = [math.nan] * layers  # each layer's latest Diff
        self.has_factors = [False] * layers
        self.has_inverse = [False] * layers

    def factors_due(self, step: int) -> list[bool]:
        if self.adaptive:
            return [not has or step - last >= k for has, last, k in zip(self.has_factors, self.last, self.intervals)]
        return [not has or step % k == 0 for has, k in zip(self.has_factors, self.intervals)]

    def inverse_due(self, step: int, due: Sequence[bool]) -> list[bool]:
        return [(d and step % self.inverse_interval == 0) or not has for d, has in zip(due, self.has_inverse)]

    def update(self, step: int, due: Sequence[bool], diffs: Sequence[float], finite: Sequence[bool]) -> bool:
        """Apply one step's outcome (every rank, same arguments); True when an interval changed.

        ``diffs[l]`` is read for due, finite layers (adaptive); NaN means no average to compare with.
        """
        changed = False
        for l, d in enumerate(due):
            if not (d and finite[l]):
                continue
            if self.adaptive and not math.isnan(diffs[l]):
                self.diffs[l] = diffs[l]
                if diffs[l] < self.threshold:
                    self.intervals[l] += 1
                    changed = True
            self.has_factors[l] = True
            self.last[l] = step
        self.has_inverse = list(self.has_factors)  # whoever has factors was inverted this step
        return changed

    @property
    def diff_max(self) -> float:
        """The largest latest Diff over the layers; 0 before any."""
        known = [d for d in self.diffs if not math.isnan(d)]
        return max(known, default=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"intervals": list(self.intervals), "last": list(self.last), "diffs": list(self.diffs)}

    def load_state_dict(self, state: dict[str, Any], has_factors: Sequence[bool], has_inverse: Sequence[bool]) -> None:
        """Restore intervals and Diffs; what each layer holds comes from the checkpointed layers."""
        self.intervals = list(state["intervals"])
        self.last = list(state["last"])
        self.diffs = list(state["diffs"])
        self.has_factors = list(has_factors)
        self.has_inverse = list(has_inverse)


class LayerTrace:
    """Rank 0's per-layer CSV: one row per layer refresh (step, layer, owner, interval, diff).

    ``interval`` is the one in force after the refresh; ``diff`` is empty when none was computed.
    Appends, so a resumed run continues the file.
    """

    FIELDS = ("step", "layer", "owner", "interval", "diff")

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def write(self, step: int, rows: Sequence[tuple[str, int, int, float | None]]) -> None:
        if not rows:
            return
        with self.path.open("a", newline="") as f:
            out = csv.writer(f)
            for name, owner, interval, d in rows:
                out.writerow((step, name, owner, interval, "" if d is None else f"{d:.6g}"))
