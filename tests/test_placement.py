"""Layer ownership: ResNet-50's real factor shapes, the balance target, LPT, re-placement, the CLI."""

from __future__ import annotations

import itertools

import pytest

from app.cli import main
from app.kfac.placement import (
    Placement,
    balance_table,
    imbalance,
    layer_cost,
    loads,
    lower_bound,
    lpt,
    model_factor_shapes,
    refresh_cost,
)


@pytest.fixture(scope="module")
def resnet50() -> dict[str, list[tuple[int, ...]]]:
    return model_factor_shapes("resnet50", 1000)


def test_resnet50_factor_shapes(resnet50: dict[str, list[tuple[int, ...]]]) -> None:
    kron = {n: s for n, s in resnet50.items() if len(s) == 2}
    bn = {n: s for n, s in resnet50.items() if len(s) == 1}
    assert len(kron) == 54 and len(bn) == 53  # 53 convs + fc; 107 layers in the papers + the stem BN
    assert kron["fc"] == [(2049, 2049), (1000, 1000)]
    assert kron["conv1"] == [(147, 147), (64, 64)]  # 3 x 7 x 7, no bias
    assert kron["layer4.0.conv2"] == [(4608, 4608), (512, 512)]  # 3x3 conv on 512 channels
    assert max(s[0][0] for s in kron.values()) == 4608
    assert bn["layer4.2.bn3"] == [(2048, 2, 2)]


def test_balance_target_on_resnet50(resnet50: dict[str, list[tuple[int, ...]]]) -> None:
    """max/mean <= 1.10 wherever indivisible layers allow it, and the lower bound elsewhere.

    From 64 ranks on, layer4.x.conv2 alone (its 4608 x 4608 A factor) costs more than a rank's
    mean share, so no placement can do better than the bound; LPT meets it exactly.
    """
    for share in ("inverses", "gradients"):
        rows = {r["ranks"]: r for r in balance_table(list(resnet50.values()), [4, 8, 64, 128, 1024],
                                                     precondition=share == "gradients")}
        assert rows[4]["cost_max_over_mean"] <= 1.10 and rows[8]["cost_max_over_mean"] <= 1.10
        for p in (64, 128, 1024):
            assert rows[p]["lower_bound"] > 1.10
            assert rows[p]["cost_max_over_mean"] == pytest.approx(rows[p]["lower_bound"], rel=1e-12)


def test_round_robin_would_miss_the_target(resnet50: dict[str, list[tuple[int, ...]]]) -> None:
    """The test above can fail: a naive placement of the same costs does not balance."""
    costs = [layer_cost(s, 1, False) for s in resnet50.values()]
    assert imbalance(loads(costs, [i % 8 for i in range(len(costs))], 8)) > 1.5


def test_lpt_is_deterministic_and_within_its_guarantee() -> None:
    costs = [7.0, 7.0, 5.0, 5.0, 4.0, 3.0, 3.0, 3.0, 1.0]
    owners = lpt(costs, 3)
    assert owners == lpt(list(costs), 3)
    best = min(max(loads(costs, list(o), 3)) for o in itertools.product(range(3), repeat=len(costs)))
    assert max(loads(costs, owners, 3)) <= (4 / 3 - 1 / 9) * best  # Graham's LPT bound
    assert lower_bound([10.0, 1.0, 1.0], 3) == pytest.approx(2.5)
    assert lpt([], 4) == [] and imbalance([0.0, 0.0]) == 1.0


def test_costs_scale_with_refresh_interval_and_model_precondition_work() -> None:
    shapes = [(10, 10), (4, 4)]
    assert layer_cost(shapes, 2, False) == pytest.approx(layer_cost(shapes, 1, False) / 2)
    assert layer_cost(shapes, 1, True) - layer_cost(shapes, 1, False) == 10 * 4 * 14
    assert refresh_cost((64, 2, 2)) == 64 * refresh_cost((1, 2, 2))  # batched 2x2 blocks: no call latency
    assert refresh_cost((2, 2)) > 64 * refresh_cost((1, 2, 2))


def test_rebalance_only_when_worthwhile_and_bounded() -> None:
    placement = Placement([4.0, 4.0, 2.0, 2.0], 2, max_rebalances=1)
    assert placement.owners == [0, 1, 0, 1]
    assert placement.update([4.0, 4.0, 2.4, 2.0]) is None  # 6.4 vs a fresh 6.2: within REBALANCE_GAIN
    skewed = [0.5, 4.0, 2.0, 2.0]  # layer 0 refreshes rarely now: loads 2.5 and 6
    assert placement.update(skewed) == [0, 1, 0, 1] and placement.rebalances == 1
    assert max(loads(skewed, placement.owners, 2)) == 4.5
    assert placement.update([9.0, 0.1, 0.1, 0.1]) is None  # max_rebalances used up
    assert Placement([1.0, 2.0], 1, max_rebalances=5).update([5.0, 0.0]) is None  # one rank: nothing to move


def test_placement_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["placement", "--model", "resnet50", "--ranks", "4,64"]) == 0
    out = capsys.readouterr().out
    assert "resnet50: 107 K-FAC layers, 161 factors, largest 4608" in out
    lines = [line.split() for line in out.splitlines() if line.strip().split()[0] in ("4", "64")]
    assert [int(l[0]) for l in lines] == [4, 64] and float(lines[0][1]) <= 1.10 and float(lines[1][1]) > 6
    assert main(["placement", "--ranks", "0"]) == 2
    assert "--ranks='0' must list positive rank counts" in capsys.readouterr().err
