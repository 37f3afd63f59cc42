"""What a checkpoint and a re-placement move, per rank, on a real backend.

Run under mpirun at 3 or more ranks: ``mpirun -np N python tests/mpi/ckpt_worker.py --backend torch``.
A K-FAC ``Trainer`` (configs/smoke.yaml, share=gradients) takes two steps; then, from the byte
counters of the call sites:

* ``Trainer.state_dict``: only rank 0 (the writer) receives anything at ``checkpoint`` (RNG states,
  BatchNorm statistics) and ``kfac.checkpoint`` (K-FAC's layers and generators); what it receives is
  exactly the others' parts (the RNG and BN sizes from here; the K-FAC parts as the others sent them),
  and it gets a complete state while the others get None.
* A forced re-placement of rank 1's layers onto rank 2: only rank 2 receives state, exactly what
  rank 1 sent; afterwards the writer's checkpoint is still complete.
"""

from __future__ import annotations

from pathlib import Path

import harness
import torch
from harness import expect

from app import config, launch
from app.comm import Comm
from app.comm.base import Count
from app.comm.traffic import LENGTH_BYTES
from app.kfac import KFAC
from app.train import Trainer

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
SETTINGS = ["optim.preconditioner=kfac", "kfac.share=gradients", "kfac.adaptive_lambda=0.3", "train.max_steps=2",
            "data.workers=0"]


def _counts(comm: Comm, sites: tuple[str, ...]) -> tuple[list[Count], list[list[int]]]:
    """This rank's counts of ``sites`` and every rank's bytes sent at each, by rank."""
    snap = comm.counters.snapshot()
    mine = [snap.get(site, Count()) for site in sites]
    sent = comm.allgather(torch.tensor([[c.sent for c in mine]], dtype=torch.int64), name="check")
    return mine, [part[0].tolist() for part in sent]


def _complete(state: dict[str, object] | None, kfac: KFAC, what: str) -> None:
    entries = state["kfac"]["layers"] if isinstance(state, dict) else {}  # type: ignore[index]
    expect(set(entries) == set(kfac.layers), f"{what}: checkpoint layers {sorted(entries)}")
    expect(all(e["factors"] is not None and e["inverse"] is not None for e in entries.values()),
           f"{what}: a layer's factors or inverse missing from the checkpoint")


def check_checkpoint(comm: Comm, trainer: Trainer) -> None:
    assert trainer.kfac is not None
    comm.counters.reset()
    state = trainer.state_dict()
    (plain, kfac), sent = _counts(comm, ("checkpoint", "kfac.checkpoint"))
    if comm.rank != 0:
        expect(state is None, "a non-writer got a checkpoint state")
        expect(plain.received == kfac.received == 0,
               f"non-writer received {plain.received} B (checkpoint) and {kfac.received} B (kfac.checkpoint)")
        return
    per_rank = torch.get_rng_state().numel() + sum(t.numel() * t.element_size()
                                                   for t in trainer._bn_stats.values())
    expect(plain.data == (comm.size - 1) * per_rank, f"writer's checkpoint data {plain.data} B != "
           f"{comm.size - 1} x {per_rank} B")
    others = sum(s[1] - LENGTH_BYTES for s in sent[1:])
    expect(kfac.data == others > 0, f"writer's kfac.checkpoint data {kfac.data} B != the others' parts {others} B")
    expect(isinstance(state, dict) and len(state["rng"]) == len(state["batchnorm"]) == comm.size,
           "writer's state lacks a rank's RNG or BN statistics")
    _complete(state, trainer.kfac, "checkpoint")


def check_replacement(comm: Comm, trainer: Trainer) -> None:
    kfac = trainer.kfac
    assert kfac is not None
    old = list(kfac.placement.owners)
    new = [2 if o == 1 else o for o in old]

    def update(costs: list[float]) -> list[int]:
        kfac.placement.owners = new
        return old
    kfac.placement.update = update  # type: ignore[method-assign,assignment]
    comm.counters.reset()
    kfac._rebalance()
    (count,), sent = _counts(comm, ("kfac.rebalance",))
    expect(1 in old, f"rank 1 owns no layer to move: owners {old}")
    if comm.rank == 2:
        expect(count.data == sent[1][0] - LENGTH_BYTES > 0,
               f"new owner received {count.data} B of state, rank 1 sent {sent[1][0] - LENGTH_BYTES} B")
        expect(count.received == count.data + LENGTH_BYTES * comm.size, f"new owner received {count}")
    else:
        expect(count.received == 0, f"rank {comm.rank} (no new layers) received {count.received} B")
    for i, layer in enumerate(kfac.layers.values()):
        mine = new[i] == comm.rank
        expect((layer.factors is not None) == mine and (layer.inverse is not None) == mine,
               f"layer {layer.name} (owner {new[i]}) held wrongly after the re-placement")
    state = trainer.state_dict()
    if comm.rank == 0:
        _complete(state, kfac, "checkpoint after the re-placement")


def _checks(comm: Comm, backend: str) -> str:
    if comm.size < 3:
        raise SystemExit("ckpt_worker needs at least 3 ranks")
    cfg = config.load(SMOKE, SETTINGS)
    trainer = Trainer(cfg, launch.discover(), comm, comm.device)
    for _ in trainer.steps():
        pass
    check_checkpoint(comm, trainer)
    check_replacement(comm, trainer)
    return ""


if __name__ == "__main__":
    harness.main(_checks)
