"""Distributed K-FAC against single-process K-FAC on the same global batch, on a real backend.

Run under mpirun: ``mpirun -np N python tests/mpi/kfac_worker.py --backend torch|horovod``.
Every rank also runs the single-process reference on the whole batch (deterministic, so alike on
all ranks) and compares after ``STEPS`` steps: parameters (relative Frobenius error per tensor),
bitwise agreement of the replicas, intervals, the checkpoint factors gathered to rank 0, and the byte
counters against packed sizes computed here from the module shapes. Mismatches are recorded,
not raised, so all ranks keep issuing the same collectives; rank 0 ends with ``ALL OK``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import harness
import torch
import torch.nn.functional as F
from harness import expect, failures
from torch import Tensor, nn

from app.comm import Comm, Count
from app.comm.grad_sync import GradientAverager
from app.config import ConfigError, KFACConfig
from app.kfac import KFAC

STEPS = 20
BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
LR = 0.02
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
        conv2=nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False), flat=nn.Flatten(), fc=nn.Linear(27, 5)))
    return model.to(dtype).eval()  # BN on running statistics: a shard's forward is the batch's


def batch(step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 2, 6, 6, generator=g).to(dtype), torch.randint(0, 5, (BATCH,), generator=g)


def tri(n: int) -> int:
    return n * (n + 1) // 2


def sizes(model: nn.Module, inverse: str) -> dict[str, tuple[int, int]]:
    """(packed factor numel, packed inverse numel) per K-FAC layer, from the module shapes."""
    out = {}
    for name, m in model.named_children():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            a, g = m.weight[0].numel() + (m.bias is not None), m.weight.shape[0]
            inv = tri(a) + tri(g) if inverse == "cholesky" else a * a + a + g * g + g + 1
            out[name] = (tri(a) + tri(g), inv)
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = (3 * m.num_features, 3 * m.num_features)
    return out


@dataclass
class Case:
    share: str
    dtype: torch.dtype
    kfac: dict[str, object] = field(default_factory=dict)
    rotate_owners: bool = False  # force re-placements to exercise moving layer state
    tolerance: tuple[float, float] | None = None  # (parameters, factors); default TOLERANCE[dtype] for both

    def config(self) -> KFACConfig:
        base: dict[str, object] = {"damping": 0.05, "stat_decay": 0.9, "kl_clip": 1e-2, "share": self.share,
                                   "bucket_mb": 200 / 2 ** 20, "max_rebalances": 3 if self.rotate_owners else 0}
        return KFACConfig(**{**base, **self.kfac})  # type: ignore[arg-type]

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kfac.items())
        return f"[{self.share} {str(self.dtype)[6:]} {extra}{' rotate' if self.rotate_owners else ''}]"


def train(model: nn.Module, kfac: KFAC, comm: Comm | None, rows: slice) -> list[list[bool]]:
    """STEPS steps of momentum SGD on K-FAC-preconditioned gradients; returns the due flags per step."""
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    averager = GradientAverager(model, comm) if comm is not None else None
    history = []
    for step in range(STEPS):
        x, y = batch(step, dtype)
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        history.append([layer.due for layer in kfac.layers.values()])
        out = model(x[rows])
        kfac.fisher_backward(out)
        F.cross_entropy(out, y[rows]).backward()
        if averager is not None:
            averager.wait()
        kfac.step(LR)
        opt.step()
    if averager is not None:
        averager.remove()
    kfac.close()
    return history


def rotate(kfac: KFAC) -> Callable[[list[float]], list[int] | None]:
    """A ``Placement.update`` that shifts every layer to the next rank while re-placements are allowed."""
    placement = kfac.placement

    def update(costs: list[float]) -> list[int] | None:
        if placement.rebalances >= placement.max_rebalances or placement.ranks == 1:
            return None
        old, placement.owners = placement.owners, [(o + 1) % placement.ranks for o in placement.owners]
        placement.rebalances += 1
        return old
    return update


def check_case(comm: Comm, case: Case) -> None:
    cfg = case.config()
    tol, factor_tol = case.tolerance or (TOLERANCE[case.dtype],) * 2
    reference = make_model(case.dtype)
    ref_kfac = KFAC(reference, cfg)
    train(reference, ref_kfac, None, slice(None))

    model = make_model(case.dtype)
    kfac = KFAC(model, cfg, comm)
    if case.rotate_owners:
        kfac.placement.update = rotate(kfac)  # type: ignore[method-assign]
    per = BATCH // comm.size
    comm.counters.reset()
    history = train(model, kfac, comm, slice(comm.rank * per, (comm.rank + 1) * per))
    counts = comm.counters.snapshot()

    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = float((p.detach() - q.detach()).norm() / q.detach().norm())
        expect(err <= tol, f"{case} {name}: relative error {err:.2e} > {tol:g}")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expect(all(torch.equal(part, flat) for part in comm.allgather(flat, name="check")),
           f"{case}: the replicas' parameters are not bitwise identical")
    expect(kfac.clock.intervals == ref_kfac.clock.intervals,
           f"{case}: intervals {kfac.clock.intervals} != single-process {ref_kfac.clock.intervals}")
    expect(kfac.stats["kfac_nan_skips"] == 0 and kfac.stats["kfac_layers"] == 4, f"{case}: stats {kfac.stats}")
    if case.rotate_owners and comm.size > 1:
        expect(kfac.stats["kfac_rebalances"] >= 1, f"{case}: no re-placement happened")

    itemsize = 2 if cfg.wire_dtype == "bfloat16" else case.dtype.itemsize
    layer_sizes = list(sizes(model, cfg.inverse).values())
    factor_bytes = sum(size for due in history for d, (size, _) in zip(due, layer_sizes) if d) * itemsize
    # every rank sends the packed factors (Horovod pads them), and each segment reaches one owner
    got = counts.get("kfac.factors", Count())
    owned = int(comm.allreduce(torch.tensor([got.data]), op="sum", name="check").item())
    expect(got.sent >= factor_bytes == owned, f"{case}: factor bytes {got}, {owned} owned != packed {factor_bytes}")
    mine = [o == comm.rank for o in kfac.placement.owners]
    if cfg.share == "gradients":
        name, want = "kfac.gradients", STEPS * sum(p.numel() for m, (_, layer) in zip(mine, kfac.layers.items())
                                                   if m for p in layer.params) * case.dtype.itemsize
    else:
        inverse_every = cfg.inverse_interval
        name, want = "kfac.inverses", sum(inv for step, due in enumerate(history)
                                          for d, m, (_, inv) in zip(due, mine, layer_sizes)
                                          if d and m and step % inverse_every == 0) * case.dtype.itemsize
    if not case.rotate_owners:
        # The payload is exact: this rank's parts in `sent`, every other rank's in `data`; the rest is
        # the optional length exchange (8 bytes sent, 8 per rank received, per call).
        c = counts[name]
        others = int(comm.allreduce(torch.tensor([want]), op="sum", name="check").item()) - want
        lengths = c.sent - want
        expect(c.data == others and lengths % 8 == 0 and c.received - c.data == comm.size * lengths,
               f"{case}: {name} {c} != packed {want} sent, {others} received (+ lengths)")

    state = kfac.state_dict()  # collective: the owners' factors gathered to rank 0, None elsewhere
    if comm.rank != 0:
        expect(state is None, f"{case}: rank {comm.rank} got a checkpoint state")
        return
    assert state is not None
    for lname, layer in ref_kfac.layers.items():
        assert layer.factors is not None
        for s, t in zip(state["layers"][lname]["factors"], layer.factors):
            err = float((s - t).norm() / t.norm())
            expect(err <= factor_tol, f"{case} checkpoint factors of {lname}: relative error {err:.2e}")


def check_wire_bf16_refused(comm: Comm) -> None:
    """Horovod 0.28 cannot reduce bfloat16: a one-line configuration error on every rank."""
    model = make_model(torch.float32)
    kfac = KFAC(model, KFACConfig(wire_dtype="bfloat16"), comm)
    kfac.begin_step(0)
    x, y = batch(0, torch.float32)
    F.cross_entropy(model(x), y).backward()
    try:
        kfac.step(0.1)
        failures.append("wire_dtype=bfloat16 on Horovod did not raise")
    except ConfigError as exc:
        expect("kfac.wire_dtype=bfloat16" in str(exc) and "\n" not in str(exc), f"bf16 error message: {exc}")


def cases(backend: str) -> list[Case]:
    out = [Case(share, dtype, kfac) for share in ("inverses", "gradients")
           for dtype in (torch.float64, torch.float32)
           for kfac in ({}, {"adaptive_lambda": 0.3})]
    out += [Case("inverses", torch.float64, {"inverse": "eigen", "factor_interval": 2, "inverse_interval": 4}),
            Case("gradients", torch.float64, {"fisher": "exact", "inverse": "eigen", "eigen_damping": "kron"}),
            Case("inverses", torch.float64, {"adaptive_lambda": 0.3}, rotate_owners=True),
            Case("gradients", torch.float64, {"adaptive_lambda": 0.3}, rotate_owners=True)]
    if backend == "torch":
        # bf16 keeps ~3 digits of each factor; through 20 preconditioned steps that grows to a few %
        out.append(Case("inverses", torch.float32, {"wire_dtype": "bfloat16"}, tolerance=(0.1, 5e-2)))
    return out


def _checks(comm: Comm, backend: str) -> str:
    for case in cases(backend):
        check_case(comm, case)
    if backend == "horovod" and comm.size > 1:
        check_wire_bf16_refused(comm)
    return f" cases={len(cases(backend))}"


if __name__ == "__main__":
    harness.main(_checks)
