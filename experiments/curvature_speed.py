"""Cost of one Hessian-vector and one GGN-vector product against one gradient on the same batch
(issue 13, item 9: goals HVP <= 3x and GGN-vp <= 2x a gradient; curvlinops reports about 8x and 3x
on ResNet-18), with the products ``spngd analyze`` uses (``app.analysis.operators.Curvature``).

One process, CIFAR ResNets in eval mode (what the analysis evaluates) on random 3x32x32 inputs,
float32; ``seconds`` from experiments/ngd_cost.py (warm-up, then the median of 3 for short runs).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/curvature_speed.py   # writes docs/curvature_speed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ngd_cost import seconds
from time_to_accuracy import cpu_model

from app.analysis.operators import Curvature
from app.comm.solo import SoloComm
from app.models import resnet


def case(arch: str, batch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = resnet(arch, 10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    comm = SoloComm(torch.device("cpu"))

    def gradient() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    row: dict[str, Any] = {"arch": arch, "batch": batch, "params": sum(p.numel() for p in net.parameters()),
                           "grad_ms": 1e3 * seconds(gradient)}
    for matrix in ("hessian", "ggn"):
        curv = Curvature(net, x, y, matrix, comm, total=batch, chunk=batch)
        v = torch.randn(curv.dim, generator=g)
        row[f"{matrix}_ms"] = 1e3 * seconds(lambda curv=curv, v=v: curv.matvec(v))
        row[f"{matrix}_ratio"] = row[f"{matrix}_ms"] / row["grad_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="cifar_resnet8,cifar_resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="docs/curvature_speed.json")
    args = parser.parse_args()
    rows = []
    for arch in args.archs.split(","):
        rows.append(case(arch, args.batch))
        r = rows[-1]
        print(f"{arch} batch {args.batch} P={r['params']}: grad {r['grad_ms']:.1f} ms, HVP {r['hessian_ms']:.1f} ms "
              f"({r['hessian_ratio']:.2f}x), GGN-vp {r['ggn_ms']:.1f} ms ({r['ggn_ratio']:.2f}x)", flush=True)
    out = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
