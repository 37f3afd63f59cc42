"""experiments/ngd_convergence.py's smallest case (its own module: the script starts and stops its own
communicator per run, which the module-scoped ``world`` fixture of test_ngd_dual.py would collide with)."""

from __future__ import annotations

import math
from pathlib import Path

from testlib import load_script


def test_convergence_benchmark_smallest_case(tmp_path: Path) -> None:
    """experiments/ngd_convergence.py on its smallest case: one method, a grid of two settings on one seed,
    2 steps: both runs recorded step by step, the lower final loss chosen, the summary and the plot."""
    nc = load_script("ngd_convergence")
    grid = {"ngd_dual emp": ({"lr": 0.1, "damping": 1.0}, {"lr": 0.3, "damping": 0.3})}
    rows = nc.run_all(["ngd_dual emp"], (1,), 2, grid, tmp_path)
    assert [(r["lr"], r["damping"], r["seed"]) for r in rows] == [(0.1, 1.0, 1), (0.3, 0.3, 1)]
    for r in rows:
        assert r["diverged"] is None and len(r["loss"]) == 2 and all(math.isfinite(x) for x in r["loss"])
        assert 0 < r["seconds"][0] < r["seconds"][1] and r["val_step"] == [0, 2]
    a, b = rows
    assert a["chosen"] == (nc.final_loss(a) <= nc.final_loss(b)) != b["chosen"]
    (table,) = nc.summary(rows)
    assert table["method"] == "ngd_dual emp" and table["seeds"] == 1 and table["diverged"] == 0
    nc.plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
