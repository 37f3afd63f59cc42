"""Optimisers, parameter groups, LARS, lr schedules, linear scaling, loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from app.config import OptimConfig, Schedule
from app.optim import (
    LARS,
    LRSchedule,
    build_criterion,
    build_momentum,
    build_optimizer,
    build_schedule,
    param_groups,
    peak_lr,
)


def _net() -> nn.Sequential:
    """Conv (no bias) + BN + Linear (bias): every kind of parameter the groups distinguish."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 4)).double()


def test_param_groups_exclude_bn_and_bias_from_weight_decay() -> None:
    net = _net()
    decay, no_decay = param_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and decay["lars"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars"] is False
    named = {id(p): n for n, p in net.named_parameters()}
    assert [named[id(p)] for p in decay["params"]] == ["0.weight", "3.weight"]
    assert [named[id(p)] for p in no_decay["params"]] == ["1.weight", "1.bias", "3.bias"]


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("lars", LARS),
                                      ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name: str, cls: type[torch.optim.Optimizer]) -> None:
    opt = build_optimizer(_net(), OptimConfig(name=name, lr=0.2, weight_decay=1e-3), global_batch=64)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert all(g["lr"] == 0.2 for g in opt.param_groups)


def test_sgd_nesterov_and_bad_inputs() -> None:
    opt = build_optimizer(_net(), OptimConfig(nesterov=True, momentum=0.8), 1)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.8
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(_net(), OptimConfig(name="lars", nesterov=True), 1)
    with pytest.raises(ValueError, match="unknown optimiser 'rmsprop'"):
        build_optimizer(_net(), OptimConfig(name="rmsprop"), 1)
    with pytest.raises(ValueError, match="global batch"):
        build_optimizer(_net(), OptimConfig(), 0)


def test_momentum_schedule_starts_at_its_value_and_adam_has_none() -> None:
    cfg = OptimConfig(momentum=Schedule(value=0.8, kind="step", milestones=(1.0,), gamma=0.5, unit="step"))
    opt = build_optimizer(_net(), cfg, 1)
    assert opt.defaults["momentum"] == 0.8
    momentum = build_momentum(opt, cfg, build_schedule(opt, cfg, 1, 4), 1, 4)
    assert momentum is not None and momentum.set_step(1) == 0.4
    assert [g["momentum"] for g in opt.param_groups] == [0.4, 0.4]
    adam = OptimConfig(name="adam")
    opt = build_optimizer(_net(), adam, 1)
    assert build_momentum(opt, adam, build_schedule(opt, adam, 1, 4), 1, 4) is None


def test_linear_scaling_rule() -> None:
    assert peak_lr(OptimConfig(lr=0.1, base_batch=256), 8192) == pytest.approx(3.2)
    assert peak_lr(OptimConfig(lr=0.1, base_batch=0), 8192) == 0.1
    opt = build_optimizer(_net(), OptimConfig(lr=0.1, base_batch=256), 1024)
    assert opt.defaults["lr"] == pytest.approx(0.4)


def test_lars_matches_hand_computation_and_skips_bn_and_bias() -> None:
    net = _net()
    lr, mom, wd, eta = 0.5, 0.9, 1e-2, 0.02
    opt = build_optimizer(net, OptimConfig(name="lars", lr=lr, momentum=mom, weight_decay=wd,
                                           lars_eta=eta), 1)
    named = dict(net.named_parameters())
    watched = {n: named[n] for n in ("0.weight", "1.weight", "3.bias")}  # conv, BN gamma, fc bias
    grads = {n: torch.randn_like(p) for n, p in named.items()}
    velocity: dict[str, torch.Tensor] = {}
    for step in range(2):  # the second step exercises the momentum buffer
        for n, p in named.items():
            p.grad = grads[n] * (step + 1)
        before = {k: p.detach().clone() for k, p in watched.items()}
        opt.step()
        for k, p in watched.items():
            w, g = before[k], grads[k] * (step + 1)
            if k == "0.weight":
                update = lr * eta * w.norm() / (g.norm() + wd * w.norm()) * (g + wd * w)
            else:  # BN parameters and biases: no trust ratio, no weight decay
                update = lr * g
            velocity[k] = update if step == 0 else mom * velocity[k] + update
            torch.testing.assert_close(p.detach(), w - velocity[k], rtol=1e-12, atol=1e-15)


def test_lars_trust_ratio_is_one_for_zero_weights() -> None:
    p = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    LARS([p], lr=0.1, momentum=0.0, eta=0.001).step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, -0.1))


def _schedule(**kw: object) -> tuple[torch.optim.Optimizer, LRSchedule]:
    cfg = OptimConfig(**{"lr": 1.0, **kw})  # type: ignore[arg-type]
    opt = build_optimizer(_net(), cfg, 1)
    return opt, build_schedule(opt, cfg, steps_per_epoch=10, total_steps=100)


def _lr(opt: torch.optim.Optimizer) -> float:
    lrs = {float(g["lr"]) for g in opt.param_groups}
    assert len(lrs) == 1
    return lrs.pop()


def test_warmup_then_step_schedule() -> None:
    opt, sched = _schedule(schedule="step", warmup_epochs=1.0, milestones=[3.0, 6.0], gamma=0.1)
    assert _lr(opt) == pytest.approx(0.1)  # step 0: (0 + 1) / 10 of the peak, near 0 but never 0
    expected = {9: 1.0, 10: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 99: 0.01}
    for step, lr in expected.items():
        assert sched.set_step(step) == pytest.approx(lr) and _lr(opt) == sched.lr_at(step)


@pytest.mark.parametrize("kind,mid", [("cosine", 0.05 + 0.95 * 0.5), ("poly", 0.05 + 0.95 * 0.25),
                                      ("constant", 1.0)])
def test_decay_shapes(kind: str, mid: float) -> None:
    _, sched = _schedule(schedule=kind, warmup_epochs=2.0, end_lr=0.05, power=2.0)
    assert sched.lr_at(19) == pytest.approx(1.0) and sched.lr_at(20) == pytest.approx(1.0)
    assert sched.lr_at(60) == pytest.approx(mid)  # halfway through the 80 decay steps
    assert sched.lr_at(100) == pytest.approx(1.0 if kind == "constant" else 0.05)
    assert sched.lr_at(150) == sched.lr_at(100)


def test_cosine_without_warmup_starts_at_peak() -> None:
    _, sched = _schedule(schedule="cosine", lr=0.4)
    assert sched.lr_at(0) == pytest.approx(0.4)
    assert sched.lr_at(50) == pytest.approx(0.2)
    assert sched.lr_at(100) == pytest.approx(0.0)
    assert sched.lr_at(99) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.99)))


def test_schedule_state_round_trip() -> None:
    opt, sched = _schedule(schedule="poly", warmup_epochs=1.0)
    sched.set_step(37)
    opt2, resumed = _schedule(schedule="poly", warmup_epochs=1.0)
    assert _lr(opt2) == pytest.approx(0.1)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.state_dict() == {"last_step": 37}
    assert _lr(opt2) == _lr(opt) == sched.lr_at(37) == resumed.lr_at(37)


def test_warmup_longer_than_training_and_bad_inputs() -> None:
    opt = build_optimizer(_net(), OptimConfig(lr=1.0), 1)
    sched = build_schedule(opt, OptimConfig(lr=1.0, warmup_epochs=20.0), steps_per_epoch=10, total_steps=5)
    assert sched.lr_at(4) == pytest.approx(5 / 200)  # a smoke run that ends inside the warmup
    with pytest.raises(ValueError, match="unknown kind 'linear'"):
        build_schedule(opt, OptimConfig(schedule="linear"), steps_per_epoch=10, total_steps=100)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        build_schedule(opt, OptimConfig(), steps_per_epoch=0, total_steps=100)
    with pytest.raises(ValueError, match="total_steps=0"):
        build_schedule(opt, OptimConfig(), steps_per_epoch=10, total_steps=0)


def test_criterion_ignores_padding_and_smooths() -> None:
    logits = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, -1, -1])
    plain = build_criterion(OptimConfig())(logits, y)
    torch.testing.assert_close(plain, nn.functional.cross_entropy(logits[:2], y[:2]))
    smooth = build_criterion(OptimConfig(label_smoothing=0.1))(logits, y)
    torch.testing.assert_close(smooth, nn.functional.cross_entropy(logits[:2], y[:2], label_smoothing=0.1))
