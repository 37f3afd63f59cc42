"""Cost of one Hessian-vector and one GGN-vector product against one gradient on the same batch
(issue 13, item 9: goals HVP <= 3x and GGN-vp <= 2x a gradient; curvlinops reports about 8x and 3x
on ResNet-18), with the products ``spngd analyze`` uses (``app.analysis.operators.Curvature``).

One process, one thread, CIFAR ResNets in eval mode (what the analysis evaluates) on random 3x32x32
inputs, float32, the whole batch one chunk. ``Curvature`` records each chunk's forward (and for the
Hessian the gradient's backward) once and reuses the record in every later product, as a Lanczos run
does, so each product is timed three ways:

* ``cached``: a product once the record exists (what every product after the first costs);
* ``first``: the first product of a new operator, recording included (``record_ms`` = first - cached);
* ``fresh``: ``cache_mb=0``, the record made and dropped at every product.

``amortised21`` spreads the record over 21 products, the fewest ARPACK's Lanczos takes for the
default top-10 (its first factorisation has ncv = 2k + 1 = 21 vectors). Two earlier ways are timed
beside them: ``before`` (torch.func: ``jvp`` of ``grad`` for the HVP, ``jvp`` then ``vjp`` for the GGN,
each a fresh forward, what ``Curvature`` did up to 2026-12-03) and ``linearize`` for the GGN (the
cached record's backward with J v from ``torch.func.linearize``, traced once: ``linearize_record_ms``).
Every measurement is taken in interleaved rounds (one of each per round, median over rounds), so a
change of the machine's load hits all alike. ``cache_mb`` is the operator's own count of what its
record keeps (bytes autograd saved), ``cache_rss_mb`` the process's RSS growth while recording (a
check of that count). The load average before and after the run is in the JSON.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/curvature_speed.py --out runs/speed1.json   # and 2, 3
    .venv/bin/python experiments/curvature_speed.py --merge runs/speed[123].json   # docs/curvature_speed.json

``--merge`` writes the median of every figure over the runs (each run's figures kept under ``per_run``):
on a machine shared with other jobs one run's ratios move by +-20%.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from time_to_accuracy import cpu_model
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vjp

from app.analysis.operators import Curvature
from app.bench import _proc_status_bytes, _settle
from app.comm.solo import SoloComm
from app.models import resnet

AMORTISE = 21


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def recorded(make: Callable[[], Curvature], v: Tensor) -> tuple[Curvature, float, float]:
    """A new operator, the seconds of its first product and the RSS growth (MiB) that product left."""
    curv = make()
    _settle()
    before = _proc_status_bytes("VmRSS")
    first = timed(lambda: curv.matvec(v))
    _settle()
    return curv, first, (_proc_status_bytes("VmRSS") - before) / 2 ** 20


def before_products(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[Tensor], object]]:
    """The torch.func products ``Curvature`` used before it kept records (one chunk, no allreduce)."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    shapes = [p.shape for p in params.values()]

    def tree(v: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(params, v.split([s.numel() for s in shapes]), shapes)}

    def logits(p: dict[str, Tensor]) -> Tensor:
        out: Tensor = functional_call(net, p, (x,))
        return out

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits(p), y, reduction="sum")

    def ggn(v: Tensor) -> object:
        out, jv = jvp(logits, (params,), (tree(v),))
        prob = F.softmax(out, dim=1)
        return vjp(logits, params)[1](prob * jv - prob * (prob * jv).sum(1, keepdim=True))

    return {"hessian": lambda v: jvp(grad(loss), (params,), (tree(v),))[1], "ggn": ggn}


def linearized_ggn(curv: Curvature, x: Tensor) -> Callable[[Tensor], Tensor]:
    """The GGN product with the operator's kept record for J^T u and J v from ``torch.func.linearize``
    (traced once here; it warns about the constants it folds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, jvp_fn = linearize(lambda p: curv.logits(p, x), curv.params)
    (rec,) = curv._recorded.values()

    def product(v: Tensor) -> Tensor:
        jv = jvp_fn(curv.unflatten(v))
        prob = F.softmax(rec.outputs[0].detach(), dim=1)
        u = prob * jv - prob * (prob * jv).sum(1, keepdim=True)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(rec.outputs, rec.leaves, u, retain_graph=True)])

    return product


def case(arch: str, batch: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = resnet(arch, 10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    comm = SoloComm(torch.device("cpu"))
    v = torch.randn(sum(p.numel() for p in net.parameters()), generator=g)

    def gradient() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    def operator(matrix: str, cache_mb: float = 1024.0) -> Callable[[], Curvature]:
        return lambda: Curvature(net, x, y, matrix, comm, total=batch, chunk=batch, cache_mb=cache_mb)

    row: dict[str, Any] = {"arch": arch, "batch": batch, "params": v.numel()}
    old = before_products(net, x, y)
    runs: dict[str, Callable[[], object]] = {"grad": gradient}
    firsts: dict[str, list[float]] = {}
    for matrix in ("hessian", "ggn"):
        kept, first, rss = recorded(operator(matrix), v)
        row[f"{matrix}_cache_mb"] = kept.cache_bytes / 2 ** 20
        row[f"{matrix}_cache_rss_mb"] = rss
        firsts[matrix] = [first]
        fresh = operator(matrix, 0.0)()
        runs[f"{matrix}_cached"] = lambda kept=kept: kept.matvec(v)
        runs[f"{matrix}_fresh"] = lambda fresh=fresh: fresh.matvec(v)
        runs[f"{matrix}_before"] = lambda fn=old[matrix]: fn(v)
        if matrix == "ggn":
            t0 = time.perf_counter()
            lin = linearized_ggn(kept, x)
            lin(v)
            row["ggn_linearize_record_ms"] = 1e3 * (time.perf_counter() - t0)
            runs["ggn_linearize"] = lambda lin=lin: lin(v)
    for fn in runs.values():  # warm-up: first-call costs (allocator, forward-AD and autograd set-up)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
        for matrix in firsts:  # a new operator's first product, record included
            firsts[matrix].append(timed(lambda m=matrix: operator(m)().matvec(v)))
    grad_ms = 1e3 * statistics.median(times["grad"])
    row["grad_ms"] = grad_ms
    for name, samples in times.items():
        if name != "grad":
            row[f"{name}_ms"] = 1e3 * statistics.median(samples)
            row[f"{name}_ratio"] = row[f"{name}_ms"] / grad_ms
    for matrix, samples in firsts.items():
        first_ms = 1e3 * statistics.median(samples[1:])
        row[f"{matrix}_first_ms"], row[f"{matrix}_first_ratio"] = first_ms, first_ms / grad_ms
        row[f"{matrix}_record_ms"] = first_ms - row[f"{matrix}_cached_ms"]
        amortised = (first_ms + (AMORTISE - 1) * row[f"{matrix}_cached_ms"]) / AMORTISE
        row[f"{matrix}_amortised{AMORTISE}_ratio"] = amortised / grad_ms
    return row


def merged(paths: list[Path]) -> dict[str, Any]:
    """The median of every figure of each (arch, batch) row over the runs' JSON files."""
    runs = [json.loads(path.read_text()) for path in paths]
    rows = []
    for first in runs[0]["rows"]:
        same = [r for run in runs for r in run["rows"] if (r["arch"], r["batch"]) == (first["arch"], first["batch"])]
        rows.append({k: statistics.median(r[k] for r in same) if isinstance(v, float) else v for k, v in first.items()})
        rows[-1]["per_run"] = {k: [r[k] for r in same] for k, v in first.items() if isinstance(v, float)}
    head = {k: v for k, v in runs[0].items() if k not in ("rows", "date", "load_average_1min")}
    return {**head, "runs": [{"date": r["date"], "load_average_1min": r["load_average_1min"]} for r in runs],
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="cifar_resnet8,cifar_resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
    parser.add_argument("--out", default="docs/curvature_speed.json")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="the medians of earlier runs' files")
    args = parser.parse_args()
    if args.merge:
        Path(args.out).write_text(json.dumps(merged(args.merge), indent=1) + "\n")
        return
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    rows = []
    for arch in args.archs.split(","):
        rows.append(case(arch, args.batch, args.rounds))
        r = rows[-1]
        print(f"{arch} batch {args.batch} P={r['params']}: grad {r['grad_ms']:.1f} ms; "
              + "; ".join(f"{m} cached {r[f'{m}_cached_ratio']:.2f}x, first {r[f'{m}_first_ratio']:.2f}x, "
                          f"fresh {r[f'{m}_fresh_ratio']:.2f}x, before {r[f'{m}_before_ratio']:.2f}x, "
                          f"cache {r[f'{m}_cache_mb']:.0f} MiB" for m in ("hessian", "ggn"))
              + f"; GGN linearize {r['ggn_linearize_ratio']:.2f}x", flush=True)
    load.append(os.getloadavg()[0])
    out = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
           "load_average_1min": load, "amortise_products": AMORTISE, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
