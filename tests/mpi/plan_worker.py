"""``app.kfac.plan`` against what a real run counts and holds, at the ranks of this mpirun.

Run under mpirun: ``mpirun -np N python tests/mpi/plan_worker.py --backend torch``. Per case
(share, inverse method, wire dtype, interval kind) a K-FAC run of two steps: step 0 refreshes every
layer, step 1 none (factor_interval 3). After each, this rank's byte counters of every K-FAC
collective must equal the plan's ``Traffic`` for this rank (calls, sent, received, data), and after
both, ``KFAC.memory()`` must equal the plan's memory parts. Mismatches are recorded, not raised, so
every rank keeps issuing the same collectives; rank 0 ends with ``ALL OK``.
"""

from __future__ import annotations

import harness
import torch
import torch.nn.functional as F
from harness import expect
from kfac_worker import BATCH, LR, batch, make_model

from app.comm import Comm, Count
from app.comm.grad_sync import GradientAverager
from app.comm.traffic import Traffic
from app.config import KFACConfig
from app.kfac import KFAC
from app.kfac.factors import find_layers
from app.kfac.plan import plan_ranks

CASES = [
    {"share": "inverses"},
    {"share": "gradients"},
    {"share": "inverses", "inverse": "eigen"},
    {"share": "inverses", "wire_dtype": "bfloat16"},
    {"share": "gradients", "inverse": "eigen"},
]


def counted(comm: Comm) -> dict[str, Traffic]:
    """The K-FAC call sites' counters as ``Traffic`` (what the plan gives per collective)."""
    return {name: Traffic(c.sent, c.received, c.data, c.calls) for name, c in comm.counters.snapshot().items()
            if name.startswith("kfac.") and c != Count()}


def check(comm: Comm, case: dict[str, object]) -> None:
    cfg = KFACConfig(**{"damping": 0.05, "factor_interval": 3, "inverse_interval": 3,  # type: ignore[arg-type]
                        "bucket_mb": 200 / 2 ** 20, "max_rebalances": 0, **case})
    dtype = torch.float32
    model = make_model(dtype)
    plan = plan_ranks(list(find_layers(make_model(dtype), cfg.skip, cfg.batchnorm).values()), cfg,
                      comm.size)[comm.rank]
    kfac = KFAC(model, cfg, comm)
    averager = GradientAverager(model, comm)
    per = BATCH // comm.size
    rows = slice(comm.rank * per, (comm.rank + 1) * per)
    for step, want in ((0, plan.refresh), (1, plan.plain)):
        x, y = batch(step, dtype)
        model.zero_grad(set_to_none=True)
        comm.counters.reset()
        kfac.begin_step(step)
        out = model(x[rows])
        kfac.fisher_backward(out)
        F.cross_entropy(out, y[rows]).backward()
        averager.wait()
        kfac.step(LR)
        expect(all(layer.due == (step == 0) for layer in kfac.layers.values()), f"{case} step {step}: due flags")
        got = counted(comm)
        expect(step == 1 or "kfac.factors" in want, f"{case}: the plan has no factor exchange at step 0")
        expect(got == want, f"{case} step {step}: counters {got} != plan {want}")
    memory = kfac.memory()
    expect(memory == plan.memory, f"{case}: KFAC.memory() {memory} != plan {plan.memory}")
    averager.remove()
    kfac.close()


def checks(comm: Comm, backend: str) -> str:
    for case in CASES:
        check(comm, case)
    return f" cases={len(CASES)}"


if __name__ == "__main__":
    harness.main(checks)
