"""Averaged SGD (``optim.tail_average``, app/optim/averaging.py): the mean of the tail's weights, put into
the model at the end of ``Trainer.run``, resumed exactly, and nothing at all when off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testlib import smoke_trainer
from torch import Tensor, nn

from app import launch
from app.checkpoint import Checkpointer
from app.comm import Comm
from app.optim.averaging import TailAverage
from app.train import Trainer

SETTINGS = ["train.max_steps=6", "train.log_every=1", "train.dtype=float64", "data.workers=0", "data.batch_size=8",
            "output.plot=false"]


def test_running_mean_is_the_mean_of_the_tail_float64() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    tail = TailAverage(model, 0.4, total_steps=10)  # the last 4 steps: 7..10
    seen = []
    for step in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        tail.update(step)
        seen.append({k: p.detach().clone() for k, p in model.named_parameters()})
    assert tail.count == 4
    for k, avg in tail.average.items():
        expected = torch.stack([s[k] for s in seen[6:]]).mean(0)
        assert torch.allclose(avg, expected, rtol=0, atol=1e-14), k
        longer = torch.stack([s[k] for s in seen[5:]]).mean(0)  # one step more: another average
        assert not torch.allclose(avg, longer, atol=1e-3)
    tail.apply()
    assert all(torch.equal(p, tail.average[k]) for k, p in model.named_parameters())


def test_short_tail_keeps_at_least_the_last_step() -> None:
    model = nn.Linear(2, 1)
    tail = TailAverage(model, 0.01, total_steps=10)
    assert tail.first == 10
    with pytest.raises(ValueError, match="fraction"):
        TailAverage(model, 0.0, total_steps=10)




def _params(trainer: Trainer) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def test_trainer_averages_the_tail_and_ends_on_it(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    trainer = smoke_trainer(world, tmp_path, *SETTINGS, "optim.tail_average=0.5")
    after = [_params(trainer) for _ in trainer.steps()]
    assert trainer.tail is not None and trainer.tail.count == 3
    for k, avg in trainer.tail.average.items():
        assert torch.allclose(avg, torch.stack([a[k] for a in after[3:]]).mean(0), rtol=0, atol=1e-12), k
    # run() from the end: swaps the average in before the final validation and checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer.run(run_dir)
    assert all(torch.equal(p, trainer.tail.average[k]) for k, p in trainer.model.named_parameters())
    saved = Checkpointer(run_dir, 2).load_latest()
    assert saved is not None
    state, _ = saved
    assert all(torch.equal(state["model"][k], v) for k, v in trainer.tail.average.items())
    assert not torch.equal(state["model"]["fc.weight"], after[-1]["fc.weight"])


def test_resume_mid_tail_is_exact(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    straight = smoke_trainer(world, tmp_path, *SETTINGS, "optim.tail_average=0.5")
    for _ in straight.steps():
        pass
    first = smoke_trainer(world, tmp_path, *SETTINGS, "optim.tail_average=0.5")
    for i, _ in enumerate(first.steps()):
        if i == 4:  # 5 of 6 steps done: 2 of the tail's 3 averaged
            break
    assert first.tail is not None and first.tail.count == 2
    state = first.state_dict()
    assert state is not None
    resumed = smoke_trainer(world, tmp_path, *SETTINGS, "optim.tail_average=0.5")
    resumed.load_state_dict(state)
    for _ in resumed.steps():
        pass
    assert straight.tail is not None and resumed.tail is not None and resumed.tail.count == 3
    assert all(torch.equal(straight.tail.average[k], v) for k, v in resumed.tail.average.items())


def test_off_by_default_changes_nothing(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    trainer = smoke_trainer(world, tmp_path, *SETTINGS)
    assert trainer.cfg.optim.tail_average == 0 and trainer.tail is None
    for _ in trainer.steps():
        pass
    last = _params(trainer)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer.run(run_dir)  # at the end already: the model keeps the last step's weights
    assert all(torch.equal(p, last[k]) for k, p in trainer.model.named_parameters())
    state = trainer.state_dict()
    assert state is not None and state["tail_average"] == {}
