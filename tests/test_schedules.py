"""Issue 11, item 5: kfac.damping / kl_clip / stat_decay and optim.momentum as schedules: their values,
their one-line errors, where K-FAC and the optimisers use them, and exact resume mid-schedule."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_kfac import data, net, train_step
from testlib import smoke_trainer
from torch import Tensor, nn

from app import config, launch
from app.comm import Comm
from app.config import ConfigError, KFACConfig, Schedule
from app.kfac import KFAC
from app.optim import LARS, LRSchedule, MomentumSchedule
from app.train import Trainer

REPO = Path(__file__).resolve().parents[1]


# -- values ----------------------------------------------------------------------------------------
def test_poly_runs_from_value_to_end_between_start_and_stop() -> None:
    s = Schedule(value=1.0, kind="poly", end=0.2, power=2.0, unit="step", start=2, stop=6)
    # before start: value; then 0.2 + 0.8 * (1 - (t - 2) / 4)^2; from stop on: end
    assert [s.at(t, 10, 100) for t in range(8)] == pytest.approx([1.0, 1.0, 1.0, 0.65, 0.4, 0.25, 0.2, 0.2])


def test_poly_in_epochs_defaults_to_linear_until_the_end_of_training() -> None:
    s = Schedule(value=2.5e-4, kind="poly", end=1e-4)  # unit epoch, start 0, stop = end of training
    assert [s.at(t, 4, 8) for t in (0, 2, 4, 8, 9)] == pytest.approx([2.5e-4, 2.125e-4, 1.75e-4, 1e-4, 1e-4])


def test_exp_is_geometric() -> None:
    s = Schedule(value=1e-2, kind="exp", end=1e-4, unit="epoch", stop=2)
    assert [s.at(t, 3, 100) for t in range(0, 8)] == pytest.approx(
        [1e-2 * 10 ** (-2 * t / 6) for t in range(7)] + [1e-4])


def test_step_multiplies_at_each_milestone() -> None:
    s = Schedule(value=0.9, kind="step", milestones=(1.0, 2.5), gamma=0.5)  # epochs: steps 4 and 10
    assert [s.at(t, 4, 100) for t in (0, 3, 4, 9, 10, 50)] == [0.9, 0.9, 0.45, 0.45, 0.225, 0.225]
    assert Schedule(value=1.0, kind="step", milestones=(3.0,), unit="step").at(3, 7, 9) == pytest.approx(0.1)


# -- config ----------------------------------------------------------------------------------------
YAML = """\
optim:
  momentum: {kind: step, value: 0.9, milestones: [10, 20], gamma: 0.5, unit: epoch}
kfac:
  damping: {kind: poly, value: 2.5e-4, end: 1.0e-4, power: 1, unit: epoch, start: 0, stop: 40}
  kl_clip: {kind: exp, value: 1.0e-3, end: 1.0e-4, unit: step}
  stat_decay: {kind: constant, value: 0.9}
"""


def test_yaml_schedules_load_dump_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(YAML)
    cfg = config.load(path)
    assert cfg.kfac.damping == Schedule(value=2.5e-4, kind="poly", end=1e-4, power=1.0, unit="epoch", start=0.0,
                                        stop=40.0)
    assert cfg.optim.momentum == Schedule(value=0.9, kind="step", milestones=(10.0, 20.0), gamma=0.5, unit="epoch")
    assert cfg.kfac.stat_decay == Schedule(value=0.9)
    assert cfg.kfac.inverse_interval == 1  # the rest stays at its defaults
    config.dump(cfg, tmp_path / "out.yaml")
    assert "null" not in (tmp_path / "out.yaml").read_text()  # keys not given are left out
    again = config.load(tmp_path / "out.yaml")
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_set_changes_one_key_of_a_schedule_or_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(YAML)
    assert config.load(path, ["kfac.damping.end=5e-5"]).kfac.damping == Schedule(
        value=2.5e-4, kind="poly", end=5e-5, power=1.0, unit="epoch", start=0.0, stop=40.0)
    assert config.load(path, ["kfac.damping=1e-3"]).kfac.damping == 1e-3
    built = config.load(None, ["kfac.damping.value=1e-2", "kfac.damping.kind=exp", "kfac.damping.end=1e-3"])
    assert built.kfac.damping == Schedule(value=1e-2, kind="exp", end=1e-3)


@pytest.mark.parametrize("overrides, message", [
    (["kfac.damping.end=1e-4"], "config: kfac.damping has no value (a schedule is {kind: constant|step|poly|exp, "
                                "value: <number>, ...})"),
    (["kfac.damping.value=1e-3", "kfac.damping.bogus=1"], "config: unknown key 'kfac.damping.bogus' (known: end, "
                                                          "gamma, kind, milestones, power, start, stop, unit, value)"),
    (["kfac.damping.value=1e-3", "kfac.damping.kind=cosine"],
     "config: kfac.damping.kind='cosine' is not one of constant, step, poly, exp"),
    (["kfac.damping.value=1e-3", "kfac.damping.unit=hour"],
     "config: kfac.damping.unit='hour' is not one of epoch, step"),
    (["kfac.damping.value=abc"], "config: kfac.damping.value='abc' is not a number"),
    (["kfac.damping.value=1e-3", "kfac.damping.kind=poly", "kfac.damping.end=-1"],
     "config: kfac.damping.end=-1.0 is out of range (must be > 0.0)"),
    (["kfac.damping.value=0", "kfac.damping.kind=poly", "kfac.damping.end=1e-3"],
     "config: kfac.damping.value=0.0 is out of range (must be > 0.0)"),
    (["kfac.damping.value=1e-3", "kfac.damping.kind=poly"],
     "config: kfac.damping.end is missing (kfac.damping.kind=poly decays from value to end)"),
    (["kfac.damping.value=1e-3", "kfac.damping.end=1e-4"],
     "config: kfac.damping.end is not used by kfac.damping.kind=constant (it reads value)"),
    (["kfac.damping.value=1e-3", "kfac.damping.kind=step", "kfac.damping.milestones=[1]", "kfac.damping.end=1"],
     "config: kfac.damping.end is not used by kfac.damping.kind=step (it reads value, milestones, gamma, unit)"),
    (["optim.momentum.value=0.9", "optim.momentum.kind=step"],
     "config: optim.momentum.milestones is missing (optim.momentum.kind=step multiplies value by gamma at each)"),
    (["optim.momentum.value=0.9", "optim.momentum.kind=step", "optim.momentum.milestones=[20, 10]"],
     "config: optim.momentum.milestones=[20.0, 10.0] must be increasing"),
    (["optim.momentum.value=0.9", "optim.momentum.kind=step", "optim.momentum.milestones=[10, 10]"],
     "config: optim.momentum.milestones=[10.0, 10.0] must be increasing"),
    (["optim.momentum.value=0.5", "optim.momentum.kind=step", "optim.momentum.milestones=[1, 2]",
      "optim.momentum.gamma=1.5"], "config: optim.momentum.value*gamma^2=1.125 is out of range (must be < 1.0)"),
    (["optim.momentum.value=0.5", "optim.momentum.kind=step", "optim.momentum.milestones=[1]",
      "optim.momentum.gamma=0"], "config: optim.momentum.gamma=0.0 is out of range (must be > 0.0)"),
    (["kfac.stat_decay.value=0.9", "kfac.stat_decay.kind=poly", "kfac.stat_decay.end=1.0"],
     "config: kfac.stat_decay.end=1.0 is out of range (must be < 1.0)"),
    (["kfac.stat_decay.value=0.9", "kfac.stat_decay.kind=poly", "kfac.stat_decay.end=0.5",
      "kfac.stat_decay.start=10", "kfac.stat_decay.stop=10"],
     "config: kfac.stat_decay.stop=10.0 must be > kfac.stat_decay.start=10.0"),
    (["kfac.kl_clip.value=0", "kfac.kl_clip.kind=exp", "kfac.kl_clip.end=1e-3"],
     "config: kfac.kl_clip.kind=exp decays geometrically: value=0.0 and end=0.001 must be > 0"),
    (["optim.name=adam", "optim.momentum.value=0.9"],
     "config: optim.name=adam has no momentum to schedule (its first-moment decay is optim.betas[0])"),
    (["optim.name=adamw", "optim.momentum_follows_lr=true"], "config: optim.name=adamw has no momentum to schedule"),
])
def test_bad_schedules_give_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_help_says_which_keys_take_a_schedule() -> None:
    takes = {key for key, _, text in config.describe() if "takes a schedule" in text}
    assert takes == {"optim.momentum", "kfac.damping", "kfac.kl_clip", "kfac.stat_decay"}


# -- K-FAC -----------------------------------------------------------------------------------------
def _switch(before: float, after: float) -> Schedule:
    """``before`` at step 0, ``after`` from step 1 on (``before / after`` is a power of 2: exact)."""
    return Schedule(value=before, kind="step", milestones=(1.0,), gamma=after / before, unit="step")


def _grads_per_step(cfg: KFACConfig, steps: int = 2) -> list[list[Tensor]]:
    """The preconditioned ``.grad`` K-FAC writes at each step on fixed weights and data."""
    torch.manual_seed(0)
    model = net()
    kfac = KFAC(model, cfg)
    out = []
    for step in range(steps):
        train_step(model, kfac, step, [data(seed=step)], lr=1.0)
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return out


@pytest.mark.parametrize("key, before, after", [("damping", 0.4, 0.1), ("kl_clip", 4e-6, 1e-6),
                                                ("stat_decay", 0.2, 0.8)])
def test_kfac_uses_the_value_in_force_at_each_step(key: str, before: float, after: float) -> None:
    """A schedule switching from ``before`` to ``after`` at step 1 gives step 1 what a constant ``after``
    gives (step 0 initialises the running average, so stat_decay shows from step 1 on), and step 0 what
    a constant ``before`` gives."""
    base = {"kl_clip": 0.0, "stat_decay": 0.5} if key != "kl_clip" else {"damping": 0.05}
    scheduled = _grads_per_step(KFACConfig(**{**base, key: _switch(before, after)}))  # type: ignore[arg-type]
    constant_after = _grads_per_step(KFACConfig(**{**base, key: after}))  # type: ignore[arg-type]
    constant_before = _grads_per_step(KFACConfig(**{**base, key: before}))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(scheduled[1], constant_after[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(scheduled[0], constant_before[0], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(constant_before[1], constant_after[1], strict=True))


def test_kfac_reports_the_values_in_force() -> None:
    torch.manual_seed(0)
    model = net()
    cfg = KFACConfig(damping=Schedule(value=1e-2, kind="exp", end=1e-4, unit="step"), stat_decay=0.9, kl_clip=0.0)
    kfac = KFAC(model, cfg, steps_per_epoch=2, total_steps=2)
    assert kfac.stats["kfac_damping"] == 1e-2  # before the first step: step 0's values
    for step in range(3):
        train_step(model, kfac, step, [data(seed=step)])
        assert kfac.stats["kfac_damping"] == pytest.approx(1e-2 * 1e-2 ** (min(step, 2) / 2))
        assert (kfac.stats["kfac_stat_decay"], kfac.stats["kfac_kl_clip"]) == (0.9, 0.0)


def test_checkpointed_inverses_are_kept_under_the_same_schedule_only() -> None:
    sched = Schedule(value=1e-1, kind="poly", end=1e-2, unit="step", stop=4)
    torch.manual_seed(0)
    model = net()
    kfac = KFAC(model, KFACConfig(damping=sched, inverse_interval=2, factor_interval=2), total_steps=4)
    for step in range(3):
        train_step(model, kfac, step, [data(seed=step)])
    state = kfac.state_dict()

    def restored(damping: float | Schedule) -> KFAC:
        other = KFAC(net(), KFACConfig(damping=damping, inverse_interval=2, factor_interval=2), total_steps=4)
        other.load_state_dict(state)
        return other
    assert all(restored(sched).clock.has_inverse)
    assert not any(restored(Schedule(value=1e-1, kind="poly", end=1e-3, unit="step", stop=4)).clock.has_inverse)
    assert not any(restored(1e-1).clock.has_inverse)


# -- momentum --------------------------------------------------------------------------------------
def _heavy_ball(momenta: list[float], lr: float) -> Tensor:
    """SGD's update written out: v = m v + g, w -= lr v, on the quadratic 0.5 |w|^2 (g = w)."""
    w, v = torch.tensor([1.0, -2.0]), torch.zeros(2)
    for m in momenta:
        v = m * v + w
        w = w - lr * v
    return w


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_optimisers_take_the_momentum_of_each_step(name: str) -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    groups = [{"params": [w], "weight_decay": 0.0, "lars": False}]
    opt: torch.optim.Optimizer = (torch.optim.SGD(groups, lr=0.1, momentum=0.9) if name == "sgd"
                                  else LARS(groups, lr=0.1, momentum=0.9))
    sched = MomentumSchedule(opt, Schedule(value=0.9, kind="step", milestones=(2.0, 3.0), gamma=0.5, unit="step"),
                             steps_per_epoch=1, total_steps=5)
    for step in range(5):
        assert sched.set_step(step) == [0.9, 0.9, 0.45, 0.225, 0.225][step]
        opt.zero_grad()
        (0.5 * w.pow(2).sum()).backward()
        opt.step()
    torch.testing.assert_close(w.detach(), _heavy_ball([0.9, 0.9, 0.45, 0.225, 0.225], 0.1), rtol=1e-6, atol=1e-7)


def test_momentum_follows_a_falling_lr() -> None:
    """chainerkfac's adjust_momentum: m * lr(s) / lr(s - 1) where the lr falls. Warm-up (steps 0, 1) and the
    first step at the peak (2) keep m; then lr(s) = ((10 - s) / 8)^3.5, so the ratio is ((10 - s) / (11 - s))^3.5."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.97)
    lr = LRSchedule(opt, 1.0, "poly", warmup_steps=2, total_steps=10, power=3.5)
    sched = MomentumSchedule(opt, 0.97, steps_per_epoch=1, total_steps=10, lr=lr)
    expected = [0.97] * 3 + [0.97 * ((10 - s) / (11 - s)) ** 3.5 for s in range(3, 10)]
    assert [sched.momentum_at(s) for s in range(10)] == pytest.approx(expected, rel=1e-12)


# -- the training loop -----------------------------------------------------------------------------
SCHEDULES = [
    "optim.preconditioner=kfac", "optim.schedule=poly", "optim.power=2", "optim.momentum_follows_lr=true",
    "optim.momentum.value=0.9", "optim.momentum.kind=step", "optim.momentum.milestones=[2, 4]",
    "optim.momentum.unit=step", "kfac.damping.value=1e-2", "kfac.damping.kind=exp", "kfac.damping.end=1e-3",
    "kfac.damping.unit=step", "kfac.kl_clip.value=1e-2", "kfac.kl_clip.kind=poly", "kfac.kl_clip.end=1e-3",
    "kfac.stat_decay.value=0.5", "kfac.stat_decay.kind=poly", "kfac.stat_decay.end=0.9",
    "kfac.inverse_interval=2", "train.max_steps=6", "train.log_every=1", "data.workers=0", "data.batch_size=8",
]




def _weights(trainer: Trainer) -> list[Tensor]:
    return [t.detach().clone() for t in trainer.model.state_dict().values()]


def test_resume_mid_schedule_equals_uninterrupted(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    straight = smoke_trainer(world, tmp_path, *SCHEDULES)
    for _ in straight.steps():
        pass
    first = smoke_trainer(world, tmp_path, *SCHEDULES)
    for i, _ in enumerate(first.steps()):
        if i == 2:  # stopped after 3 of 6 steps: between inverse refreshes, mid-way through every schedule
            break
    state = first.state_dict()
    resumed = smoke_trainer(world, tmp_path, *SCHEDULES)
    resumed.load_state_dict(state)
    assert resumed.pos.step == 3
    for _ in resumed.steps():
        pass
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed), strict=True))
    # the schedules matter: another one trains elsewhere
    different = smoke_trainer(world, tmp_path, *SCHEDULES, "kfac.damping.end=1e-4")
    for _ in different.steps():
        pass
    assert not all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(different), strict=True))


def test_metrics_show_the_values_in_force(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    trainer = smoke_trainer(world, tmp_path, *SCHEDULES, "output.plot=false")
    (tmp_path / "run").mkdir()
    trainer.run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert trainer.momentum is not None
    for r in rows:
        last = int(r["step"]) - 1  # the row after step s shows the values step s - 1 used
        assert float(r["momentum"]) == csv_value(trainer.momentum.momentum_at(last))
        assert float(r["kfac_damping"]) == csv_value(1e-2 * 0.1 ** (last / 6))
        assert float(r["kfac_kl_clip"]) == csv_value(1e-2 - 9e-3 * last / 6)
        assert float(r["kfac_stat_decay"]) == csv_value(0.5 + 0.4 * last / 6)
    assert [float(r["momentum"]) for r in rows][:2] == [csv_value(0.9), csv_value(0.9 * _lr_ratio(1))]
    assert float(rows[-1]["momentum"]) == csv_value(0.9 * 0.1 ** 2 * _lr_ratio(5))  # gamma 0.1 by default


def _lr_ratio(step: int) -> float:
    """lr(step) / lr(step - 1) of the poly (power 2) decay over 6 steps without warm-up."""
    return ((1 - step / 6) / (1 - (step - 1) / 6)) ** 2


def csv_value(x: float) -> object:
    """``x`` as metrics.csv holds it (6 significant digits)."""
    return pytest.approx(x, rel=1e-5)
