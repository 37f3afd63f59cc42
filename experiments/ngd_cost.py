"""Cost of one preconditioning step: the exact natural gradient in sample space (``ngd_dual``, GGN and
empirical Fisher) vs K-FAC refreshing factors and inverses every step vs the dense P x P solve, as the
batch N and the parameter count P grow; one process, one thread, CPU.

The network is an MLP 64 -> width -> 10 (tanh) in float32, on random inputs and labels (cost does not
depend on the data). Per (width, N) it times, in milliseconds, after one untimed warm-up run (median of
3 when a run is short):

* ``grad``: forward + backward of the mean cross-entropy (what every optimiser pays);
* ``kfac``: the K-FAC step's extra over ``grad`` (``app.kfac.KFAC`` with the run's defaults, factor and
  inverse intervals 1: capture hooks, factors, Cholesky inverses, preconditioning);
* ``ngd_ggn`` / ``ngd_emp``: ``NGDDual.direction`` (rows, NC x NC or N x N kernel, float64 Cholesky);
* ``dense_ggn``: the same rows, F = V^T V formed (P x P, float64) and Cholesky-solved; only where
  P <= DENSE_MAX_P (P^2 doubles and P^3 / 3 flops: 9610 parameters would be 0.7 GB and 300 GFLOP).

A case whose kernel product (R^2 P multiply-adds, R = rows) exceeds MAX_GFLOP is skipped (null): at
one thread it would take tens of seconds. ``dense_vs_ngd`` is the largest relative difference of the
two GGN steps where both ran (a sanity check; the float64 oracle tests are tests/test_ngd_dual.py).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/ngd_cost.py   # writes docs/ngd_cost.json and .png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from time_to_accuracy import cpu_model
from torch import Tensor, nn

from app.analysis.ngd_dual import NGDDual
from app.analysis.operators import Curvature
from app.comm.solo import SoloComm
from app.config import KFACConfig
from app.kfac import KFAC
from app.metrics import pyplot, save_figure

REPO = Path(__file__).resolve().parent.parent
INPUT, CLASSES = 64, 10
WIDTHS = (8, 32, 128, 512)
BATCHES = (8, 32, 128, 256)
DENSE_MAX_P = 2500
MAX_GFLOP = 70.0
DAMPING = 1e-3


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUT, width), nn.Tanh(), nn.Linear(width, CLASSES))


def seconds(fn: Callable[[], object]) -> float:
    """One untimed run (first-call costs: vmap tracing, allocator), one timed; three more and their
    median when it took under 0.2 s."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first >= 0.2:
        return first
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def gradient(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])  # type: ignore[union-attr]


def kfac_step(net: nn.Module, kfac: KFAC, x: Tensor, y: Tensor, step: list[int]) -> None:
    """One K-FAC training step up to the preconditioned ``.grad`` (the optimiser's step excluded)."""
    net.zero_grad()
    kfac.begin_step(step[0], micro_batches=1)
    out = net(x)
    kfac.fisher_backward(out)
    F.cross_entropy(out, y).backward()
    kfac.step(0.1)
    step[0] += 1


def dense_step(net: nn.Module, g: Tensor, x: Tensor, y: Tensor, comm: SoloComm) -> Tensor:
    rows = Curvature(net, x, y, "ggn", comm, total=len(x)).rows().double()
    fisher = rows.T @ rows
    fisher.diagonal().add_(DAMPING)
    net.train()
    return torch.cholesky_solve(g.double()[:, None], torch.linalg.cholesky(fisher))[:, 0]


def case(width: int, n: int, comm: SoloComm) -> dict[str, Any]:
    net = mlp(width)
    params = sum(p.numel() for p in net.parameters())
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, INPUT, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    row: dict[str, Any] = {"width": width, "params": params, "batch": n}
    grad_s = seconds(lambda: gradient(net, x, y))
    row["grad_ms"] = 1e3 * grad_s
    kfac = KFAC(net, KFACConfig(factor_interval=1, inverse_interval=1))
    counter = [0]
    row["kfac_ms"] = 1e3 * max(seconds(lambda: kfac_step(net, kfac, x, y, counter)) - grad_s, 0.0)
    g_flat = gradient(net, x, y)
    steps: dict[str, Tensor] = {}
    for matrix, per_example in (("ggn", CLASSES), ("emp", 1)):
        rows = n * per_example
        if rows * rows * params / 1e9 > MAX_GFLOP:
            row[f"ngd_{matrix}_ms"] = None
            continue
        ngd = NGDDual(net, comm, DAMPING, matrix)

        def natural(ngd: NGDDual = ngd) -> None:
            steps[ngd.matrix] = ngd.direction(g_flat, x, y)
        row[f"ngd_{matrix}_ms"] = 1e3 * seconds(natural)
    row["dense_ggn_ms"] = row["dense_vs_ngd"] = None
    if params <= DENSE_MAX_P:
        dense: list[Tensor] = []
        row["dense_ggn_ms"] = 1e3 * seconds(lambda: dense.append(dense_step(net, g_flat, x, y, comm)))
        if "ggn" in steps:
            ref = dense[-1]
            row["dense_vs_ngd"] = float((steps["ggn"].double() - ref).abs().max() / ref.abs().max())
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """ms against N at the widest model dense runs on, and against P at N = 32."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    widest_dense = max(r["width"] for r in rows if r["dense_ggn_ms"] is not None)
    series = (("grad_ms", "gradient"), ("kfac_ms", "K-FAC (every step)"), ("ngd_ggn_ms", "ngd_dual GGN"),
              ("ngd_emp_ms", "ngd_dual emp"), ("dense_ggn_ms", "dense P x P GGN"))
    for axis, xkey, keep, title in (
            (left, "batch", lambda r: r["width"] == widest_dense, f"width {widest_dense}"),
            (right, "params", lambda r: r["batch"] == 32, "batch N = 32")):
        chosen = [r for r in rows if keep(r)]
        for key, label in series:
            pts = [(r[xkey], r[key]) for r in chosen if r[key] is not None]
            if pts:
                axis.plot(*zip(*pts), marker="o", label=label)
        axis.set(xscale="log", yscale="log", xlabel="batch N" if xkey == "batch" else "parameters P",
                 ylabel="ms per step (1 thread)", title=title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ngd_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = SoloComm(torch.device("cpu"))
    t0 = time.perf_counter()
    rows = []
    for width in WIDTHS:
        for n in BATCHES:
            rows.append(case(width, n, comm))
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    result = {"cpu": cpu_model(), "threads": 1, "torch": torch.__version__, "input": INPUT, "classes": CLASSES,
              "damping": DAMPING, "dense_max_params": DENSE_MAX_P, "max_gflop": MAX_GFLOP,
              "total_s": time.perf_counter() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
