"""SGLD (app/bayes/sgld.py) against the exact Gaussian posterior of a Bayesian linear regression (float64),
with replicas that stay equal, an exact resume and its snapshot ensemble."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mpi_helpers import REPO
from torch import Tensor, nn

from app import config, launch
from app.bayes.posterior import Ensemble
from app.bayes.sgld import SGLD, snapshot_steps
from app.comm import Comm
from app.config import BayesConfig
from app.train import Trainer

N, D, R = 20, 2, 2000  # examples, features, independent chains (replicas of theta in one parameter)


class Regression(nn.Module):
    """R independent copies of a linear model: the loss sums their mean NLLs, so each copy is its own chain."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(R, D, dtype=torch.float64))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return ((y - self.theta @ x.T) ** 2 / 2).mean(1).sum()  # unit-variance Gaussian NLL, mean over N


def _data(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64) @ torch.tensor([[1.0, 0.6], [0.0, 0.8]],
                                                                               dtype=torch.float64)
    return x, x @ torch.tensor([1.5, -0.5], dtype=torch.float64) + torch.randn(N, generator=gen, dtype=torch.float64)


def _chain(opt: SGLD, model: Regression, x: Tensor, y: Tensor, steps: int) -> Iterator[Tensor]:
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
        yield model.theta.detach().clone()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_run_moments_match_the_exact_posterior(seed: int) -> None:
    """Full-batch gradients, so the only error is Monte-Carlo and the known discretisation: the stationary law
    of theta <- theta - h (A theta - b) + sqrt(2 h tau) xi (h = lr / N) is N(A^-1 b, tau (A (I - h A / 2))^-1),
    which tends to the tempered posterior N(A^-1 b, tau A^-1). Tolerance: 5 standard errors of the estimates,
    from their spread over the R independent chains."""
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    x, y = _data(seed)
    variance, tau, lr, steps, burn = 2.0, 0.5, 0.2, 1500, 300
    a = x.T @ x + torch.eye(D, dtype=torch.float64) / variance  # the posterior precision (tempering aside)
    mean = torch.linalg.solve(a, x.T @ y)
    h = lr / N
    stationary = tau * torch.linalg.inv(a @ (torch.eye(D, dtype=torch.float64) - h * a / 2))
    posterior = tau * torch.linalg.inv(a)
    model = Regression()
    opt = SGLD(model, lr=lr, bayes=BayesConfig(prior_variance=variance, tempering=tau), dataset_size=N, seed=seed,
               total_steps=steps)
    chain = torch.stack(list(_chain(opt, model, x, y, steps))[burn:])  # (T, R, D)
    per_chain_mean = chain.mean(0)  # (R, D)
    centred = chain - mean
    per_chain_cov = torch.einsum("tri,trj->rij", centred, centred) / chain.shape[0]  # (R, D, D)
    se_mean = per_chain_mean.std(0) / R**0.5
    se_cov = per_chain_cov.std(0) / R**0.5
    assert (per_chain_mean.mean(0) - mean).abs().le(5 * se_mean).all(), (per_chain_mean.mean(0), mean, se_mean)
    cov = per_chain_cov.mean(0)
    assert (cov - stationary).abs().le(5 * se_cov).all(), (cov, stationary, se_cov)
    # the discretisation is small here: the chain also matches the exact posterior within the bias plus 5 s.e.
    assert (cov - posterior).abs().le(5 * se_cov + (stationary - posterior).abs()).all()
    assert ((stationary - posterior).abs() / posterior.diagonal().min()).max() < 0.15
    # and the test can tell: the noise without its 1/N would give N times the variance; 2x off is > 5 s.e.
    assert ((cov - 2 * stationary).abs() > 5 * se_cov).any()


def test_snapshot_steps_cover_the_last_half() -> None:
    assert snapshot_steps(100, 4) == [63, 75, 88, 100]
    assert snapshot_steps(10, 16) == [6, 7, 8, 9, 10]  # at most the half's steps
    assert snapshot_steps(1, 3) == [1]


def _stepped(seed: int, steps: int, *, global_seed: int | None = None) -> tuple[Regression, SGLD]:
    x, y = _data(0)
    model = Regression()
    opt = SGLD(model, lr=0.2, bayes=BayesConfig(ensemble_size=3), dataset_size=N, seed=seed, total_steps=10)
    for t in range(steps):
        if global_seed is not None:
            torch.manual_seed(global_seed + t)  # another global stream on every "rank" and step
        for _ in _chain(opt, model, x, y, 1):
            pass
    return model, opt


def test_replicas_stay_equal_whatever_the_global_stream() -> None:
    first, _ = _stepped(7, 5, global_seed=0)
    second, _ = _stepped(7, 5, global_seed=1000)
    assert torch.equal(first.theta, second.theta)
    other, _ = _stepped(8, 5, global_seed=0)
    assert not torch.allclose(first.theta, other.theta)


def test_state_dict_round_trip_resumes_exactly() -> None:
    straight, straight_opt = _stepped(3, 10)
    model, opt = _stepped(3, 6)  # mid-way: one snapshot (after step 6) of 3 taken
    assert len(opt.posterior().members) == 1
    state = copy.deepcopy(opt.state_dict())
    resumed = Regression()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = SGLD(resumed, lr=0.2, bayes=BayesConfig(ensemble_size=3), dataset_size=N, seed=3, total_steps=10)
    resumed_opt.load_state_dict(state)
    x, y = _data(0)
    for _ in _chain(resumed_opt, resumed, x, y, 4):
        pass
    assert torch.equal(resumed.theta, straight.theta)
    ours, theirs = resumed_opt.posterior().members, straight_opt.posterior().members
    assert len(ours) == 3 and all(torch.equal(a["theta"], b["theta"]) for a, b in zip(ours, theirs, strict=True))
    assert torch.equal(ours[-1]["theta"], straight.theta)  # the last step is the last member



def test_trainer_runs_sgld_to_an_ensemble(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = config.load(REPO / "configs" / "smoke.yaml", [
        "optim.name=sgld", "optim.lr=0.01", "train.max_steps=6", "bayes.ensemble_size=2", "data.workers=0",
        "data.batch_size=8", f"output.dir={tmp_path}"])
    trainer = Trainer(cfg, world[0], world[1], torch.device("cpu"))
    assert isinstance(trainer.optimizer, SGLD) and trainer.optimizer.keep == {5, 6}
    for _ in trainer.steps():
        pass
    posterior = trainer.posterior()
    assert isinstance(posterior, Ensemble) and len(posterior.members) == 2
    assert all(torch.equal(p, posterior.members[-1][k]) for k, p in trainer.model.named_parameters())
