"""IVON through our wrapper (app/bayes/ivon.py) against the ``ivon-opt`` package used the documented way, its
posterior, an exact resume, the trainer's path, and (mpirun) data x sample ranks against one process."""

from __future__ import annotations

import copy
from pathlib import Path

import ivon
import pytest
import torch
import torch.nn.functional as F
from mpi_helpers import REPO, run_check_worker
from torch import Tensor, nn

from app import config, launch
from app.bayes.ivon import IVON, build_ivon
from app.bayes.posterior import Gaussian, generator_for
from app.comm import Comm
from app.config import BayesConfig
from app.errors import ConfigError
from app.train import Trainer

BAYES = BayesConfig(prior_variance=2.0, tempering=0.5, init_precision=0.5)
N_EFF, LR, BETAS, SEED = 100.0, 0.05, [0.9, 0.99], 11



def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _ours(comm: Comm, samples: int, steps: range, state: dict | None = None,
          model: nn.Module | None = None) -> tuple[nn.Module, IVON]:
    """The trainer's protocol: each sample's loss / K backward inside sampled_params, then one step."""
    model = model or _model()
    opt = build_ivon(model, comm, lr=LR, bayes=BAYES, dataset_size=N_EFF, betas=BETAS)
    if state is not None:
        opt.load_state_dict(state)
    for t in steps:
        x, y = _batch(t)
        for s in range(samples):
            with opt.sampled_params(generator_for("cpu", SEED, t, s)):
                (F.cross_entropy(model(x), y) / samples).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _raw(samples: int, steps: int) -> tuple[nn.Module, ivon.IVON]:
    """ivon-opt's README loop, the global stream seeded as our sampled_params seeds it."""
    model = _model()
    opt = ivon.IVON(model.parameters(), lr=LR, ess=N_EFF / BAYES.tempering, hess_init=BAYES.init_precision,
                    beta1=BETAS[0], beta2=BETAS[1], weight_decay=1 / (BAYES.prior_variance * N_EFF))
    for t in range(steps):
        x, y = _batch(t)
        for s in range(samples):
            gen = generator_for("cpu", SEED, t, s)
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("samples", [1, 3])
def test_wrapper_equals_the_package_used_the_documented_way(world: tuple[launch.World, Comm], samples: int) -> None:
    ours, opt = _ours(world[1], samples, range(6))
    raw, raw_opt = _raw(samples, 6)
    # one sample: the same operations, bitwise; three: IVON's Welford mean against our sum of loss/K gradients
    tol = {"rtol": 0.0, "atol": 0.0} if samples == 1 else {"rtol": 1e-12, "atol": 1e-14}
    for p, q in zip(ours.parameters(), raw.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)
    torch.testing.assert_close(opt.param_groups[0]["hess"], raw_opt.param_groups[0]["hess"], **tol)
    torch.testing.assert_close(opt.param_groups[0]["momentum"], raw_opt.param_groups[0]["momentum"], **tol)
    assert not torch.allclose(opt.param_groups[0]["hess"], torch.full_like(opt.param_groups[0]["hess"], 0.5))
    # the posterior's std is the one IVON samples with
    group = raw_opt.param_groups[0]
    std = 1 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()
    posterior = opt.posterior()
    assert isinstance(posterior, Gaussian) and list(posterior.std) == [n for n, _ in ours.named_parameters()]
    # std is derived (1 / sqrt) per tensor here and over the flat vector there: the CPU's vector and remainder
    # loops may round one element 1 ulp apart (seen on AMD EPYC: 1.4e-16 relative), so a few ulps, not bits
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in posterior.std.values()]), std,
                               rtol=max(tol["rtol"], 1e-15), atol=tol["atol"])
    assert all(torch.equal(posterior.mean[n], p) for n, p in ours.named_parameters())


def test_a_sample_depends_only_on_the_generator(world: tuple[launch.World, Comm]) -> None:
    draws, mean = [], [p.detach().clone() for p in _model().parameters()]
    for global_seed in (1, 2):
        model = _model()
        opt = build_ivon(model, world[1], lr=LR, bayes=BAYES, dataset_size=N_EFF, betas=BETAS)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        with opt.sampled_params(generator_for("cpu", SEED, 0, 0)):
            draws.append([p.detach().clone() for p in model.parameters()])
        assert torch.equal(torch.get_rng_state(), before)  # the global stream is left as it was
        assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mean, strict=True))  # the mean is back
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))
    assert not all(torch.equal(a, m) for a, m in zip(draws[0], mean, strict=True))


def test_state_dict_round_trip_resumes_exactly(world: tuple[launch.World, Comm]) -> None:
    straight, _ = _ours(world[1], 2, range(6))
    half, opt = _ours(world[1], 2, range(3))
    state = copy.deepcopy(opt.state_dict())
    assert state["current_step"] == 3
    model = _model()
    model.load_state_dict(half.state_dict())
    resumed, _ = _ours(world[1], 2, range(3, 6), state, model)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters(), strict=True))


def test_bayes_keys_map_onto_ivon(world: tuple[launch.World, Comm]) -> None:
    opt = build_ivon(_model(), world[1], lr=LR, bayes=BAYES, dataset_size=N_EFF, betas=[0.8, 0.9])
    group = opt.param_groups[0]
    assert (group["ess"], group["weight_decay"], group["hess_init"]) == (200.0, 1 / 200, 0.5)
    assert (group["beta1"], group["beta2"]) == (0.8, 0.9)
    with pytest.raises(ConfigError, match="init_precision"):
        build_ivon(_model(), world[1], lr=LR, bayes=BayesConfig(init_precision=0.0), dataset_size=N_EFF,
                   betas=BETAS)


def test_trainer_trains_ivon_and_resumes_exactly(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    torch.set_num_threads(1)

    def trainer() -> Trainer:
        cfg = config.load(REPO / "configs" / "smoke.yaml", [
            "optim.name=ivon", "optim.lr=0.1", "train.max_steps=4", "bayes.samples=2", "data.workers=0",
            "data.batch_size=8", f"output.dir={tmp_path}"])
        return Trainer(cfg, world[0], world[1], torch.device("cpu"))

    straight = trainer()
    assert isinstance(straight.optimizer, IVON) and straight.averager is None
    losses = [loss.item() for loss, _, _ in straight.steps()]
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    first = trainer()
    for i, _ in enumerate(first.steps()):
        if i == 1:
            break
    state = first.state_dict()
    assert state is not None and state["posterior"]["kind"] == "gaussian"
    resumed = trainer()
    resumed.load_state_dict(state)
    for _ in resumed.steps():
        pass
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters(), strict=True))


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_ranks_and_sample_groups_equal_one_process(backend: str) -> None:
    run_check_worker(REPO / "tests" / "mpi" / "ivon_worker.py", backend, 2, timeout=120)
