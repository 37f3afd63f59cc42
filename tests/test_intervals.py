"""Refresh intervals: Algorithm 1 on synthetic factor sequences, fixed intervals, and K-FAC using them."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from testlib import load_script
from torch import Tensor, nn

from app import config
from app.config import ConfigError, KFACConfig
from app.kfac import KFAC
from app.kfac.intervals import Clock, diff


def sequence(steps: int, noise: list[float], seed: int) -> list[tuple[Tensor, Tensor]]:
    """(A_t, G_t): fixed SPD matrices plus ``noise[t]`` times a fresh random perturbation."""
    g = torch.Generator().manual_seed(seed)
    base_a, base_g = torch.eye(4, dtype=torch.float64) * 2, torch.eye(3, dtype=torch.float64)
    out = []
    for t in range(steps):
        da = torch.randn(4, 4, generator=g, dtype=torch.float64)
        dg = torch.randn(3, 3, generator=g, dtype=torch.float64)
        out.append((base_a + noise[t] * (da + da.T), base_g + noise[t] * (dg + dg.T)))
    return out


def algorithm1(seq: list[tuple[Tensor, Tensor]], lam: float) -> tuple[list[int], int]:
    """The refresh steps and final interval of one layer, written out directly from DESIGN.md's
    Algorithm 1 with the due test ``t - last refresh >= interval``."""
    interval, last, pre = 1, 0, None
    steps = []
    for t, (A, G) in enumerate(seq):
        if pre is None or t - last >= interval:
            if pre is not None:
                A_pre, G_pre = pre
                d = max(float(torch.linalg.norm(G - G_pre) / torch.linalg.norm(G_pre)),
                        float(torch.linalg.norm(A - A_pre) / torch.linalg.norm(A_pre)))
                if d < lam:
                    interval += 1
            pre, last = (A, G), t
            steps.append(t)
    return steps, interval


def drive(clock: Clock, seqs: list[list[tuple[Tensor, Tensor]]],
          broken: set[tuple[int, int]] = frozenset()) -> list[list[int]]:  # type: ignore[assignment]
    """Run the clock as K-FAC does; ``broken`` (layer, step) refreshes come back non-finite."""
    previous: list[tuple[Tensor, Tensor] | None] = [None] * len(seqs)
    steps: list[list[int]] = [[] for _ in seqs]
    for t in range(len(seqs[0])):
        due = clock.factors_due(t)
        diffs, finite = [math.nan] * len(seqs), [True] * len(seqs)
        for l, d in enumerate(due):
            if not d:
                continue
            steps[l].append(t)
            if (l, t) in broken:
                finite[l] = False
                continue
            new, pre = seqs[l][t], previous[l]
            if pre is not None:
                diffs[l] = float(max(diff(x, p) for x, p in zip(new, pre)))
            previous[l] = new
        clock.update(t, due, diffs, finite)
    return steps


def test_diff_is_the_relative_frobenius_change() -> None:
    x_pre = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert float(diff(x_pre + torch.tensor([[0.0, 1.0], [1.0, 0.0]]), x_pre)) == pytest.approx(2 ** 0.5 / 5)
    assert float(diff(torch.zeros(2, 2), torch.zeros(2, 2))) == 0.0
    assert math.isinf(float(diff(torch.ones(2, 2), torch.zeros(2, 2))))


def test_algorithm1_on_synthetic_sequences() -> None:
    steps, lam = 60, 0.1
    noises = [[1e-4] * steps,  # stable: grows at every refresh
              [0.5] * steps,  # noisy: never grows
              [0.5 if t < 20 else 1e-4 for t in range(steps)],  # settles after step 20
              [0.5 if (t // 7) % 2 else 1e-3 for t in range(steps)]]  # alternates
    seqs = [sequence(steps, n, seed) for seed, n in enumerate(noises)]
    clock = Clock(len(seqs), KFACConfig(adaptive_lambda=lam))
    got = drive(clock, seqs)
    expected = [algorithm1(s, lam) for s in seqs]
    assert got == [e[0] for e in expected]
    assert clock.intervals == [e[1] for e in expected]
    assert got[0] == [0, 1, 3, 6, 10, 15, 21, 28, 36, 45, 55]  # gaps 1, 2, 3, ...: O(sqrt T) refreshes
    assert got[1] == list(range(steps))
    assert got[2][:21] == list(range(21)) and len(got[2]) < 35
    assert clock.diff_max > 0.1


def test_nonfinite_refresh_keeps_interval_and_previous_and_retries_next_step() -> None:
    seqs = [sequence(12, [1e-4] * 12, 0)]
    clock = Clock(1, KFACConfig(adaptive_lambda=0.1))
    got = drive(clock, seqs, broken={(0, 3)})
    # 0, 1 (interval 2), 3 broken (stays 2, retried), 4 (interval 3), 7 (4), 11 (5)
    assert got == [[0, 1, 3, 4, 7, 11]]
    assert clock.intervals == [5]


def test_first_refresh_has_no_diff_and_lambda_zero_is_every_step() -> None:
    clock = Clock(2, KFACConfig())
    assert not clock.adaptive
    assert drive(clock, [sequence(5, [1e-4] * 5, 0)] * 2) == [[0, 1, 2, 3, 4]] * 2
    assert clock.intervals == [1, 1] and clock.diff_max == 0.0


def test_fixed_intervals_align_every_layer_and_inverses_follow_factors() -> None:
    clock = Clock(2, KFACConfig(factor_interval=3, inverse_interval=6))
    rows = []
    for t in range(13):
        due = clock.factors_due(t)
        rows.append((t, due, clock.inverse_due(t, due)))
        clock.update(t, due, [math.nan, math.nan], [True, True])
    assert [t for t, due, _ in rows if all(due)] == [0, 3, 6, 9, 12]
    assert [t for t, _, inv in rows if all(inv)] == [0, 6, 12]
    assert not any(any(due) and not all(due) for _, due, _ in rows)


def test_clock_state_round_trip() -> None:
    seqs = [sequence(20, [1e-4] * 20, 0), sequence(20, [0.5] * 20, 1)]
    clock = Clock(2, KFACConfig(adaptive_lambda=0.1))
    drive(clock, seqs)
    restored = Clock(2, KFACConfig(adaptive_lambda=0.1))
    restored.load_state_dict(clock.state_dict(), clock.has_factors, clock.has_inverse)
    for t in range(20, 40):
        assert restored.factors_due(t) == clock.factors_due(t)


def test_adaptive_needs_unit_fixed_intervals() -> None:
    with pytest.raises(ConfigError, match="kfac.adaptive_lambda=0.2 .* leave kfac.factor_interval"):
        config.load(None, ["kfac.adaptive_lambda=0.2", "kfac.factor_interval=2", "kfac.inverse_interval=2"])


def test_kfac_skips_layers_that_are_not_due(tmp_path: Path) -> None:
    """Only due layers record statistics; intervals, Diffs and the per-layer trace come out."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 3, 3, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
                                      fc=nn.Linear(48, 4)))
    kfac = KFAC(model, KFACConfig(adaptive_lambda=0.5, damping=0.1))
    kfac.trace_layers(tmp_path / "kfac_layers.csv")
    keys = set(kfac.stats)
    x = torch.randn(64, 2, 4, 4)  # one fixed batch: its statistics barely move, so intervals grow
    y = torch.randint(0, 4, (64,))
    skipped = 0
    for step in range(12):
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        F.cross_entropy(model(x), y).backward()
        for layer in kfac.layers.values():
            assert (layer._out_sum is not None) == layer.due
            skipped += not layer.due
        kfac.step(0.1)
        assert kfac.stats["kfac_layers"] == 2
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert skipped > 0 and set(kfac.stats) == keys
    assert kfac.stats["kfac_interval_max"] > 1 and kfac.stats["kfac_diff_max"] > 0
    assert kfac.stats["kfac_bytes_total"] == 0  # one process: nothing on the wire
    rows = list(csv.DictReader((tmp_path / "kfac_layers.csv").open()))
    assert len(rows) == 24 - skipped
    for name in ("conv", "fc"):  # each refresh: the interval grew by one exactly when Diff < lambda
        mine = [r for r in rows if r["layer"] == name]
        assert mine[0]["diff"] == "" and mine[0]["interval"] == "1"
        for before, row in zip(mine, mine[1:]):
            grew = int(row["interval"]) - int(before["interval"])
            assert grew == (float(row["diff"]) < 0.5), row


def test_comm_volume_table_is_relative_to_refreshing_every_step() -> None:
    """experiments/comm_volume.py's arithmetic (its runs are too slow for the suite)."""
    cv = load_script("comm_volume")
    assert cv.parse_lambdas("none,0.25") == [0.0, 0.25]
    runs = [{"lambda": lam, "seed": seed, "top1_pct": top1, "factor_bytes_per_rank": size,
             "inverse_bytes_per_rank": 1.0, "train_s": 2.0}
            for lam, seed, top1, size in [("none", 1, 95.0, 400.0), ("none", 2, 96.0, 400.0),
                                          ("0.3", 1, 94.0, 50.0), ("0.3", 2, 95.0, 70.0)]]
    table = cv.summarise(runs, [0.0, 0.3])
    assert [(r["lambda"], r["top1_mean_pct"], r["top1_per_seed_pct"], r["share_of_none_pct"]) for r in table] == \
        [("none", 95.5, "95.00;96.00", 100.0), ("0.3", 94.5, "94.00;95.00", 15.0)]


def test_comm_volume_reuses_only_runs_that_validated_at_their_last_step(tmp_path: Path) -> None:
    cv = load_script("comm_volume")
    head = "kind,step,time_s,top1,kfac_bytes_total\n"
    (tmp_path / "metrics.csv").write_text(head + "train,10,1.0,0.5,100\nval,10,1.2,0.9,\ntrain,20,2.0,0.6,200\n")
    assert cv.finished(tmp_path) is None  # stopped after a mid-run validation
    assert cv.finished(tmp_path / "absent") is None
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("val,20,2.1,0.95,\n")
    done = cv.finished(tmp_path)
    assert done is not None and done["train"]["kfac_bytes_total"] == "200" and done["val"]["top1"] == "0.95"
