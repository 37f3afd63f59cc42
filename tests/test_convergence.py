"""Issue 4's convergence claim on real data, made to hold on any x86-64 CPU (issue 10, finding 2):
the median over seeds 1, 2, 3 of K-FAC's optimiser steps to 97% windowed training accuracy is at
most RATIO = 0.75 x the median of momentum SGD's steps at its best lr of the grid.

The recipe, the K-FAC settings (emp Fisher, damping 1e-3, KL clip 1e-3, factors and inverses every
step, lr 0.2: all explicit, independent of the defaults) and the run-until-target helper are
``experiments/time_to_accuracy.py``'s, which also measures the numbers quoted here (README, Results).
``train.seed`` changes both the initial weights and the data order.

Why 0.75: measured on AMD EPYC (2026-12-02), K-FAC took 38, 35, 34 steps (median 35); SGD's best
over its grid took 87 steps on seed 1 (lr 1.6) and more than 100, the schedule's length, on seeds 2
and 3: a ratio of at most 0.35 (0.44 on seed 1 alone). One seed on one CPU was not enough: seed 1
took K-FAC 38 steps on AMD and 46 on an Intel Xeon (other kernels, other float rounding), SGD 87 on
both (0.44 and 0.53), and the old bound of 0.5 on that one seed failed on Intel. Now SGD would have
to reach the target within ceil(35 / 0.75) - 1 = 46 steps (about half of its best) on two of the
three seeds, or a K-FAC seed miss it within the schedule; a run that ends its schedule (lr 0 at step
100) without reaching the target never does, so it counts as slower than any run that does.

SGD's grid is lr in {0.8, 1.6, 3.2}: in the benchmark's grid {0.4, 0.8, 1.6, 3.2} only lr 1.6
reached the target (seed 1, 87 steps); its neighbours 0.8 and 3.2 did not within 87 steps and 0.4
never did, on any seed, so the grid keeps the best lr with a neighbour a factor of 2 on each side,
in case another CPU moves the optimum.

Cost is bounded by stopping as soon as the outcome is decided: a seed's SGD runs stop at
``cap = ceil(median_kfac / RATIO) - 1`` steps (reaching the target by then is what breaks the claim)
and at its first lr that does; seeds stop once a majority has passed or failed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from testlib import load_script

RATIO = 0.75
SGD_LRS = (1.6, 0.8, 3.2)  # the usual best first: a seed whose best lr breaks the claim stops sooner


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 380 training steps: past the suite's 600 s on a loaded 2-core machine
def test_kfac_median_steps_are_at_most_three_quarters_of_sgds(tmp_path: Path) -> None:
    tta = load_script("time_to_accuracy")
    torch.set_num_threads(1)
    kfac: list[int] = []
    for seed in tta.SEEDS:
        steps = tta.steps_to_target(tta.overrides(seed, tta.KFAC_LR, tta.KFAC_VARIANTS["K-FAC every step"]),
                                    tta.SCHEDULE_STEPS, tmp_path).steps
        assert steps is not None, f"K-FAC seed {seed} did not reach {tta.TARGET} within {tta.SCHEDULE_STEPS} steps"
        kfac.append(steps)
    median_kfac = statistics.median(kfac)
    cap = math.ceil(median_kfac / RATIO) - 1
    print(f"K-FAC steps per seed {kfac}, median {median_kfac}; SGD may not reach the target within {cap}")
    need = len(tta.SEEDS) // 2 + 1  # seeds whose SGD needs more than cap steps: then its median does too
    passed: list[int] = []
    failed: dict[int, tuple[float, int]] = {}
    for seed in tta.SEEDS:
        if len(passed) >= need or len(failed) > len(tta.SEEDS) - need:
            break
        for lr in SGD_LRS:
            steps = tta.steps_to_target(tta.overrides(seed, lr), cap, tmp_path).steps
            print(f"SGD seed {seed} lr={lr}: {'not within ' + str(cap) if steps is None else steps} steps")
            if steps is not None:
                failed[seed] = (lr, steps)
                break
        else:
            passed.append(seed)
    assert len(passed) >= need, (
        f"SGD reached {tta.TARGET} within {cap} steps (K-FAC's median {median_kfac} / {RATIO}) on seeds "
        + ", ".join(f"{s} (lr {lr}: {n} steps)" for s, (lr, n) in failed.items()) + f"; K-FAC per seed {kfac}")


def test_summary_takes_each_seeds_best_run_and_marks_unreached_medians() -> None:
    tta = load_script("time_to_accuracy")
    rows = [{"method": m, "seed": s, "lr": lr, "steps": n, "seconds": t} for m, s, lr, n, t in [
        ("SGD", 1, 1.6, 80, 8.0), ("SGD", 1, 0.8, None, 9.0), ("SGD", 2, 1.6, None, 10.0), ("SGD", 2, 0.8, 90, 9.5),
        ("SGD", 3, 1.6, None, 10.0), ("SGD", 3, 0.8, None, 10.0),
        ("K", 1, 0.2, 40, 4.0), ("K", 2, 0.2, 30, 3.0), ("K", 3, 0.2, 50, 5.0)]]
    sgd, k = tta.summarise(rows, 100)
    assert (sgd["median_steps"], sgd["median_seconds"]) == ("90", "-")  # seed 3 counts as 101 > 90
    assert sgd["per_seed"] == "seed 1: 80 steps, 8.0 s, lr 1.6; seed 2: 90 steps, 9.5 s, lr 0.8; seed 3: > 100 steps"
    assert (k["median_steps"], k["median_seconds"]) == ("40", "4.0")
    assert tta.summarise(rows[4:6] + rows[6:], 100)[0]["median_steps"] == "> 100"


@pytest.mark.slow  # four Trainer set-ups and 20 steps: about 30 s on an idle core
def test_time_to_accuracy_quick_mode_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark's --quick mode on a handful of steps: every method runs and is tabulated."""
    tta = load_script("time_to_accuracy")
    out = tmp_path / "tta.json"
    assert tta.main(["--quick", "--seeds", "4,5", "--target", "0.2", "--max-steps", "5", "--sgd-lrs", "1.6",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("SGD", 4)] + [(m, 4) for m in tta.KFAC_VARIANTS]
    assert all(r["steps"] in (None, 5) for r in result["runs"])  # the 5-step window ends at step 5
    assert all(r["seconds"] > 0 for r in result["runs"])
    printed = capsys.readouterr().out
    assert result["header"] in printed and printed.count("\n| ") == 1 + len(result["table"]) == 5
    assert tta.main(["--merge", str(out), "--target", "0.2", "--max-steps", "5"]) == 0  # one process per seed
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit, match="has target 0.2 and max steps 5, not 0.97 and 100"):
        tta.main(["--merge", str(out)])
