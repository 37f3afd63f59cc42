"""VOGN against the conjugate-Gaussian oracle, and its distributed update against one process.

Bayesian linear regression with orthogonal features (X^T X diagonal) has the exact posterior
N(m, P^-1) with P = X^T X / s2 + I / v (v the prior variance) and m = P^-1 X^T y / s2; mean-field
Gaussian VI is exact there because P is diagonal. VOGN's fixed point mu solves g + delta mu = 0,
i.e. m, whatever its curvature estimate; its precision N (s + delta) is P's diagonal when s converges
to the Gauss-Newton diagonal diag(X^T X) / (N s2).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from mpi_helpers import REPO, run_check_worker
from thread_comm import ThreadComm, ThreadWorld
from torch import Tensor, nn

from app.bayes.posterior import generator_for
from app.bayes.vogn import VOGN
from app.config import BayesConfig, ConfigError

N, D, NOISE_VAR, PRIOR_VAR = 64, 4, 0.25, 2.0


def _problem(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X, y, exact posterior mean, exact posterior precision diagonal), float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    x = q * scales * math.sqrt(N)  # orthogonal columns: X^T X = N diag(scales^2)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + NOISE_VAR**0.5 * torch.randn(N, generator=g,
                                                                                            dtype=torch.float64)
    precision = (x * x).sum(0) / NOISE_VAR + 1 / PRIOR_VAR
    mean = (x.T @ y / NOISE_VAR) / precision
    return x, y, mean, precision


def _regression(comm: Any, lr: float, tempering: float, **bayes: Any) -> tuple[nn.Linear, VOGN]:
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    cfg = BayesConfig(prior_variance=PRIOR_VAR, tempering=tempering, **bayes)
    return model, VOGN(model, comm, lr=lr, bayes=cfg, dataset_size=N, momentum=0.5)


def _full_batch_step(model: nn.Linear, opt: VOGN, x: Tensor, y: Tensor, step: int, samples: int) -> None:
    """One step as the trainer runs it: every sample a forward/backward of the whole batch, each
    forward's mean loss divided by the number of forwards."""
    for k in range(samples):
        with opt.sampled_params(generator_for("cpu", 7, step, k)):
            loss = ((model(x).squeeze(1) - y) ** 2 / (2 * NOISE_VAR)).mean() / samples
            loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_batch_vogn_reaches_the_exact_posterior_mean(seed: int) -> None:
    """With a tiny tempering the samples hardly move and the mean converges to m (to 1e-9); with tau = 1
    it fluctuates around m, and its average over the last 1000 steps is within 5 posterior standard
    errors of the average (a stated Monte-Carlo margin, checked over 3 data seeds)."""
    x, y, mean, precision = _problem(seed)
    comm = ThreadComm(ThreadWorld(1), 0)
    model, opt = _regression(comm, lr=0.3, tempering=1e-20, precision_decay=0.9)
    for t in range(1500):
        _full_batch_step(model, opt, x, y, t, samples=1)
    assert torch.allclose(model.weight[0].detach(), mean, rtol=0, atol=1e-9)

    model, opt = _regression(comm, lr=0.3, tempering=1.0, precision_decay=0.9)
    tail = []
    for t in range(2000):
        _full_batch_step(model, opt, x, y, t, samples=2)
        if t >= 1000:
            tail.append(model.weight[0].detach().clone())
    avg = torch.stack(tail).mean(0)
    assert ((avg - mean).abs() <= 5 * precision.rsqrt()).all(), (avg, mean)


def test_vogn_precision_recursion_reaches_the_exact_diagonal_precision() -> None:
    """s follows s <- beta2 s + (1 - beta2) h, so fed the Gauss-Newton diagonal h = diag(X^T X) / (N s2)
    (what a linear-Gaussian model's per-example curvature averages to) N (s + delta) becomes the exact
    precision and sigma^2 its inverse, tau = 1; the squared gradients themselves are checked against
    torch.func per-example gradients in tests/test_sqgrad.py."""
    x, y, _, precision = _problem(3)
    comm = ThreadComm(ThreadWorld(1), 0)
    model, opt = _regression(comm, lr=0.3, tempering=1.0, precision_decay=0.95)
    gn = ((x * x).sum(0) / (N * NOISE_VAR)).reshape(1, D)
    for t in range(800):  # 0.95^800: the initial s is forgotten to 1e-18
        _full_batch_step(model, opt, x, y, t, samples=1)
        opt.squares.squares = lambda loss_scale=1.0: {model.weight: gn * N}  # type: ignore[method-assign]
    posterior = opt.posterior()
    assert torch.allclose(posterior.std["weight"][0] ** -2, precision, rtol=1e-10)


def _net() -> nn.Module:
    """The same weights on every thread rank (from a generator: the global stream is shared by threads)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3), nn.ReLU(), nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def _train_net(comm: Any, steps: int, samples: int, state: dict[str, Any] | None = None,
               start: int = 0) -> tuple[list[Tensor], list[Tensor], dict[str, Any]]:
    """VOGN on a conv-BN-linear net, each rank its own shard of a fixed batch of 12, ``samples`` weight
    samples per rank with sample ids ``rank * samples + k``."""
    model = _net()
    opt = VOGN(model, comm, lr=0.05, bayes=BayesConfig(prior_variance=1.0, init_precision=0.5, precision_decay=0.9,
                                                        damping=0.01, kl_warmup_epochs=1.0),
               dataset_size=100, momentum=0.9, kl_warmup_steps=3)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    rows = slice(comm.rank * 12 // comm.size, (comm.rank + 1) * 12 // comm.size)
    for t in range(start, start + steps):
        for k in range(samples):
            with opt.sampled_params(generator_for("cpu", 3, t, comm.rank * samples + k)):
                loss = nn.functional.cross_entropy(model(x[rows]), y[rows]) / samples
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    return [p.detach().clone() for p in model.parameters()], [opt.std[p].clone() for p in model.parameters()], saved


@pytest.mark.parametrize("ranks", [2, 3])
def test_owner_update_equals_one_process(ranks: int) -> None:
    """Layers split over owners (reduce-scatter, owner update, allgather) give one process's result on
    the same examples; every rank holds the same mean and sigma. Each rank takes a third or half of the
    batch with one sample, the reference all of it with the same one sample per step: the trainer's
    data-parallel case (BN on the whole shard differs, so the net's BN sees each rank's shard both ways:
    here the reference runs ``ranks`` shards as separate forwards)."""
    results = ThreadWorld(ranks).run(lambda comm: _train_net(comm, 5, 1))

    def reference(comm: ThreadComm) -> tuple[list[Tensor], list[Tensor]]:
        model = _net()
        opt = VOGN(model, comm, lr=0.05, bayes=BayesConfig(prior_variance=1.0, init_precision=0.5,
                                                            precision_decay=0.9, damping=0.01),
                   dataset_size=100, momentum=0.9, kl_warmup_steps=3)
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(12, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
        for t in range(5):
            for r in range(ranks):  # rank r's shard at rank r's sample, as a separate forward
                rows = slice(r * 12 // ranks, (r + 1) * 12 // ranks)
                with opt.sampled_params(generator_for("cpu", 3, t, r)):
                    loss = nn.functional.cross_entropy(model(x[rows]), y[rows]) / ranks
                    loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()], [opt.std[p].clone() for p in model.parameters()]

    ref_mu, ref_std = ThreadWorld(1).run(reference)[0]
    for mu, std, _ in results:
        for a, b in zip(mu + std, ref_mu + ref_std):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    for mu, std, _ in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(mu + std, results[0][0] + results[0][1]))


def test_checkpoint_gathers_the_owners_state_and_resumes_exactly() -> None:
    """state_dict on rank 0 holds every parameter's m and s (the owners' parts gathered), the other ranks
    get {}; every rank resuming from it after 3 of 6 steps continues bitwise as the uninterrupted run
    (sigma recomputed from s, each rank keeping its own layers' m and s)."""
    straight = ThreadWorld(3).run(lambda comm: _train_net(comm, 6, 1))
    first = ThreadWorld(3).run(lambda comm: _train_net(comm, 3, 1))
    saved = first[0][2]
    assert len(saved["opt"]["state"]) == len(list(_net().parameters()))
    assert first[1][2]["opt"] == {} and first[2][2]["opt"] == {}
    again = ThreadWorld(3).run(lambda comm: _train_net(comm, 3, 1, copy.deepcopy(saved), start=3))  # a file each
    for a, b in zip(again[0][0] + again[0][1], straight[0][0] + straight[0][1]):
        assert torch.equal(a, b)


def test_refuses_what_it_cannot_estimate() -> None:
    comm = ThreadComm(ThreadWorld(1), 0)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ConfigError, match=r"1\.weight is not in a Linear, Conv2d or BatchNorm2d layer"):
        VOGN(model, comm, lr=0.1, bayes=BayesConfig(), dataset_size=10, momentum=0.9)
    with pytest.raises(ConfigError, match="init_precision=0 with a KL warm-up"):
        VOGN(nn.Linear(3, 3), comm, lr=0.1, bayes=BayesConfig(init_precision=0.0), dataset_size=10, momentum=0.9,
             kl_warmup_steps=5)
    opt = VOGN(nn.Linear(3, 3), comm, lr=0.1, bayes=BayesConfig(), dataset_size=10, momentum=0.9)
    with pytest.raises(RuntimeError, match="without a forward/backward inside sampled_params"):
        opt.step()


WORKER = REPO / "tests" / "mpi" / "bayes_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["torch", pytest.param("horovod", marks=pytest.mark.horovod)])
@pytest.mark.parametrize("np", [2, 4])
def test_n_ranks_one_sample_equal_one_rank_n_samples(backend: str, np: int) -> None:
    """``spngd train``'s Trainer: np ranks in np sample groups x 1 sample == 1 rank x np samples."""
    run_check_worker(WORKER, backend, np, timeout=300)


def test_one_sample_spans_every_micro_batch_of_a_step(tmp_path: Any) -> None:
    """Regression: the trainer reused each sample's generator across micro-batches, so with
    optim.grad_accum=2 the second micro-batch ran at other weights than the first. Now the weights a
    step's forwards see are the same for both micro-batches, and differ between steps and samples."""
    from app import config, launch
    from app.train import Trainer

    cfg = config.load(REPO / "configs" / "smoke.yaml", ["optim.name=vogn", "optim.lr=0.01", "optim.grad_accum=2",
                                                        "bayes.samples=2", "train.max_steps=2", "data.batch_size=8",
                                                        f"output.dir={tmp_path}"])
    single = launch.World(rank=0, size=1, local_rank=0, local_size=1, launcher="single")
    trainer = Trainer(cfg, single, ThreadComm(ThreadWorld(1), 0), torch.device("cpu"))
    seen: list[Tensor] = []
    first = next(trainer.model.parameters())
    hook = trainer.model.register_forward_pre_hook(lambda m, i: seen.append(first.detach().clone()))
    for _ in trainer.steps():
        pass
    hook.remove()
    assert len(seen) == 8  # 2 steps x 2 micro-batches x 2 samples, in micro-batch-major order
    for step in (0, 4):
        assert torch.equal(seen[step], seen[step + 2]) and torch.equal(seen[step + 1], seen[step + 3])
        assert not torch.equal(seen[step], seen[step + 1])
    assert not torch.equal(seen[0], seen[4])


def test_trainer_resume_is_exact(tmp_path: Any) -> None:
    """A VOGN run checkpointed after 2 of 4 steps (Trainer.state_dict through torch.save) and resumed in a
    new Trainer ends bitwise where the uninterrupted run ends: mean, sigma, m and s (the samples need no
    saved stream: their generators are a function of (seed, step, sample))."""
    from app import config, launch
    from app.train import Trainer

    single = launch.World(rank=0, size=1, local_rank=0, local_size=1, launcher="single")

    def trainer(steps: int) -> Trainer:
        cfg = config.load(REPO / "configs" / "smoke.yaml", ["optim.name=vogn", "optim.lr=0.01", "bayes.samples=2",
                                                            f"train.max_steps={steps}", "data.batch_size=8",
                                                            f"output.dir={tmp_path}", "optim.schedule=constant"])
        return Trainer(cfg, single, ThreadComm(ThreadWorld(1), 0), torch.device("cpu"))

    def run(t: Trainer) -> list[Tensor]:
        for _ in t.steps():
            pass
        opt = t.optimizer
        assert isinstance(opt, VOGN)
        params = list(t.model.parameters())
        return [p.detach() for p in params] + [opt.std[p] for p in params] + \
            [opt.state[p][k] for p in params for k in ("m", "s")]

    straight = run(trainer(4))
    first = trainer(2)
    run(first)
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    second = trainer(4)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(run(second), straight))
