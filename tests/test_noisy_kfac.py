"""Noisy K-FAC (issue 12, deliver 3, and its oracle of deliver 4), in float64: the sample covariance of
the posterior's draws equals ``(tau/N) (A_d (x) G_d)^-1`` for a Kronecker layer and ``(tau/N)
(F_c + gamma I)^-1`` for a BatchNorm block, within a Monte-Carlo tolerance from the sample count (and
wrong-side Cholesky factors fail the same checks); the update adds the prior before preconditioning;
the exported posterior draws what training sampled; a short run trains and writes posterior.pt; 2 ranks
keep equal replicas and match 1 rank."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mpi_helpers import REPO, run_mpi, skip_unless_runnable
from testlib import smoke_trainer
from torch import Tensor, nn

from app import config, launch
from app.bayes.noisy_kfac import MatrixNormal, NoisyKFAC, cholesky_factor
from app.bayes.posterior import from_export, generator_for
from app.bayes.posterior import load as load_posterior
from app.comm import Comm
from app.config import BayesConfig, KFACConfig
from app.errors import ConfigError
from app.kfac import KFAC
from app.train import train

DRAWS = 20_000
SIGMAS = 5.0  # per-entry bound in standard errors: a false failure among ~100 entries has p < 1e-4
N, TAU, PRIOR_VAR, DAMPING, NOISE = 40.0, 0.5, 0.5, 1e-2, 1.5
GAMMA = DAMPING + TAU / (N * PRIOR_VAR)  # extrinsic + intrinsic damping
SCALE2 = NOISE ** 2 * TAU / N  # the noise's variance factor s^2


def _spd(n: int, seed: int) -> Tensor:
    """A well-correlated SPD matrix (far from diagonal, so a wrong-side factor shows)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    return b @ b.T / n + 0.05 * torch.eye(n, dtype=torch.float64)


def _noisy(model: nn.Module, x: Tensor, *, warmup: int = 0, **kfac: object) -> tuple[KFAC, NoisyKFAC]:
    """KFAC + NoisyKFAC on ``model`` after one real step on ``x`` (so every layer has an inverse)."""
    kf = KFAC(model, KFACConfig(damping=DAMPING, kl_clip=0.0, **kfac))  # type: ignore[arg-type]
    opt = NoisyKFAC(model, kf, lr=0.1, bayes=BayesConfig(prior_variance=PRIOR_VAR, tempering=TAU, noise_scale=NOISE),
                    dataset_size=N, momentum=0.0, kl_warmup_steps=warmup)
    kf.begin_step(0)
    out = model(x)
    kf.fisher_backward(out)
    out.square().mean().backward()
    opt.step()
    opt.zero_grad()
    return kf, opt


def _set_factors(kf: KFAC, factors: list[Tensor]) -> None:
    (layer,) = kf.layers.values()
    layer.factors = factors
    layer.invert(kf.damping, kf.cfg.inverse, kf.cfg.eigen_damping)


def _matches(x: Tensor, cov: Tensor) -> bool:
    """Is the zero-mean sample ``x`` (draws, d) of covariance ``cov``? Each entry of the sample
    covariance within SIGMAS standard errors, ``sqrt((S_ii S_jj + S_ij^2) / n)`` for Gaussian draws."""
    n = x.shape[0]
    sample = x.T @ x / n
    se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov ** 2) / n).sqrt()
    return bool(((sample - cov).abs() <= SIGMAS * se).all())


def _mean_matches(stat: Tensor, expected: Tensor) -> bool:
    """Is the mean over draws of the per-draw statistic ``stat`` (draws, ...) ``expected``? Within
    SIGMAS standard errors estimated from the draws themselves."""
    se = stat.std(0) / math.sqrt(stat.shape[0])
    return bool(((stat.mean(0) - expected).abs() <= SIGMAS * se + 1e-12).all())


def _kron_checks(noise: Tensor, A_d: Tensor, G_d: Tensor) -> dict[str, bool]:
    """noise: (draws, out, k) samples of W - M. Full covariance of the row-major vec, and the two sides:
    E[X X^T] = s^2 tr(A_d^-1) G_d^-1 (rows, the G side), E[X^T X] = s^2 tr(G_d^-1) A_d^-1 (columns)."""
    A_inv, G_inv = torch.linalg.inv(A_d), torch.linalg.inv(G_d)
    return {"full": _matches(noise.flatten(1), SCALE2 * torch.kron(G_inv, A_inv)),
            "rows": _mean_matches(noise @ noise.mT, SCALE2 * A_inv.trace() * G_inv),
            "cols": _mean_matches(noise.mT @ noise, SCALE2 * G_inv.trace() * A_inv)}


def _damped(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """The damped factors, written out here: pi = sqrt((tr A / dim A) / (tr G / dim G))."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    root = math.sqrt(GAMMA)
    return A + pi * root * torch.eye(A.shape[0], dtype=A.dtype), G + root / pi * torch.eye(G.shape[0], dtype=G.dtype)


def _draws(posterior: MatrixNormal, n: int) -> Iterator[dict[str, Tensor]]:
    gen = generator_for("cpu", 0)
    for _ in range(n):
        yield posterior.draw(gen)


@pytest.mark.parametrize("inverse", ["cholesky", "eigen"])
def test_kron_sample_covariance_is_the_scaled_inverse_kronecker_product(inverse: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()  # W | b: (4, 4), vec of 16
    kf, opt = _noisy(model, torch.randn(8, 3, dtype=torch.float64), inverse=inverse)
    A, G = _spd(4, 1), _spd(4, 2)
    _set_factors(kf, [A, G])
    A_d, G_d = _damped(A, G)
    post = opt.posterior()
    M = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    noise = torch.stack([torch.cat([d["weight"], d["bias"][:, None]], 1) for d in _draws(post, DRAWS)]) - M
    assert _kron_checks(noise, A_d, G_d) == {"full": True, "rows": True, "cols": True}

    # the formula, W = M + s L_G^-T E L_A^-1, passes too; either side's factor taken the wrong
    # way round fails its side's check (and the full covariance)
    L_A, L_G = torch.linalg.cholesky(A_d), torch.linalg.cholesky(G_d)
    E = torch.randn(DRAWS, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(SCALE2)
    inv_A, inv_G = torch.linalg.inv(L_A), torch.linalg.inv(L_G)
    assert _kron_checks(inv_G.T @ E @ inv_A, A_d, G_d) == {"full": True, "rows": True, "cols": True}
    wrong_g = _kron_checks(inv_G @ E @ inv_A, A_d, G_d)
    wrong_a = _kron_checks(inv_G.T @ E @ inv_A.T, A_d, G_d)
    assert not wrong_g["full"] and not wrong_g["rows"] and wrong_g["cols"]
    assert not wrong_a["full"] and not wrong_a["cols"] and wrong_a["rows"]


def test_batchnorm_blocks_sample_the_damped_2x2_inverse() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3)).double()
    kf, opt = _noisy(model, torch.randn(6, 3, 2, 2, dtype=torch.float64))
    F = torch.stack([_spd(2, 10 + c) for c in range(3)])
    _set_factors(kf, [F])
    cov = torch.block_diag(*(SCALE2 * torch.linalg.inv(F[c] + GAMMA * torch.eye(2, dtype=torch.float64))
                             for c in range(3)))  # channels independent
    mean = torch.stack([model[0].weight, model[0].bias], -1).detach()
    noise = torch.stack([torch.stack([d["0.weight"], d["0.bias"]], -1) for d in _draws(opt.posterior(), DRAWS)]) - mean
    assert _matches(noise.flatten(1), cov)
    # the factor transposed (R^T e: covariance R^T R) fails
    R = cholesky_factor(torch.linalg.inv(F + GAMMA * torch.eye(2, dtype=torch.float64)))
    e = torch.randn(DRAWS, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(SCALE2)
    assert _matches(torch.einsum("cij,ncj->nci", R, e).flatten(1), cov)
    assert not _matches(torch.einsum("cji,ncj->nci", R, e).flatten(1), cov)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2)).double()


def test_factors_reproduce_the_damped_inverses_for_both_methods() -> None:
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for inverse in ("cholesky", "eigen"):
        model = _net()
        kf, opt = _noisy(model, x, inverse=inverse)
        post = opt.posterior()
        assert list(post.blocks) == list(kf.layers)
        for name, layer in kf.layers.items():
            block = post.blocks[name]
            if block.col is None:
                torch.testing.assert_close(block.row @ block.row.mT, layer.inverse)
                continue
            a, g = kf.layers[name].factors
            A_d, G_d = _damped(a, g)
            torch.testing.assert_close(block.row @ block.row.T, torch.linalg.inv(G_d))
            torch.testing.assert_close(block.col.T @ block.col, torch.linalg.inv(A_d))


def test_cholesky_factor_falls_back_on_a_not_quite_definite_matrix() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    M = torch.block_diag(v.T @ v, torch.eye(2, dtype=torch.float64))  # rank 3 of 5: Cholesky fails
    assert int(torch.linalg.cholesky_ex(M).info) != 0
    L = cholesky_factor(M)
    torch.testing.assert_close(L @ L.T, M)


def test_export_round_trip_and_sampled_params_draw_the_same_weights() -> None:
    model = _net()
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, opt = _noisy(model, x)
    post = opt.posterior()
    buf = io.BytesIO()
    torch.save(post.export(), buf)
    buf.seek(0)
    loaded = from_export(torch.load(buf, weights_only=True))
    assert isinstance(loaded, MatrixNormal) and loaded.kind == "matrix_normal"
    for seed in (0, 1):
        a, b = post.draw(generator_for("cpu", seed)), loaded.draw(generator_for("cpu", seed))
        assert a.keys() == b.keys() == dict(model.named_parameters()).keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model(x).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    drawn = post.draw(generator_for("cpu", 5))
    with opt.sampled_params(generator_for("cpu", 5)):
        assert all(torch.equal(p, drawn[k]) and not torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p, before[k]) and torch.equal(p.grad, grads[k]) for k, p in model.named_parameters())


def test_before_the_first_inverse_samples_are_the_mean() -> None:
    model = _net()
    kf = KFAC(model, KFACConfig())
    opt = NoisyKFAC(model, kf, lr=0.1, bayes=BayesConfig(), dataset_size=N, momentum=0.9, kl_warmup_steps=0)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params(generator_for("cpu", 0)):
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.posterior().blocks == {}


def test_prior_term_goes_in_before_preconditioning_with_kl_warmup() -> None:
    """One step, momentum 0, no KL clip: mu <- mu - lr (G_d^-1 (grad + w_t gamma_in mu) A_d^-1), and the
    damping K-FAC inverted with is kfac.damping + w_t gamma_in, w_t = t / warm-up steps."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    kf, opt = _noisy(model, x, warmup=4)  # step 0: w_0 = 0
    prior = TAU / (N * PRIOR_VAR)
    assert [opt.prior_weight(t) for t in (0, 2, 4, 9)] == [0.0, prior / 2, prior, prior]
    kf.begin_step(1)
    assert kf.damping == pytest.approx(DAMPING + prior / 4)
    out = model(x)
    kf.fisher_backward(out)
    out.square().mean().backward()
    mu = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    opt.step()
    (layer,) = kf.layers.values()  # its inverse: the damped factors' (test_factors_reproduce_...)
    expected = mu - 0.1 * layer.inverse.apply(grad + prior / 4 * mu)
    torch.testing.assert_close(torch.cat([model.weight, model.bias[:, None]], 1).detach(), expected)
    decoupled = mu - 0.1 * (layer.inverse.apply(grad) + prior / 4 * mu)
    assert not torch.allclose(expected, decoupled)


@pytest.mark.parametrize("override, words", [("kfac.share=gradients", "kfac.share=inverses"),
                                             ("kfac.inverse=eigen kfac.eigen_damping=kron", "eigen_damping")])
def test_configs_it_cannot_sample_are_refused_in_one_line(override: str, words: str) -> None:
    cfg = config.load(REPO / "configs" / "smoke.yaml", ["optim.name=noisy_kfac", *override.split()])
    model = _net()
    kf = KFAC(model, cfg.kfac)
    with pytest.raises(ConfigError, match=words) as err:
        NoisyKFAC(model, kf, lr=0.1, bayes=cfg.bayes, dataset_size=N, momentum=0.9, kl_warmup_steps=0)
    assert "\n" not in str(err.value)


# -- the trainer -------------------------------------------------------------------------------------
RUN = ["optim.name=noisy_kfac", "data.workers=0", "bayes.tempering=0.1", "output.plot=false"]




def test_short_run_trains_and_writes_a_matrix_normal_posterior(world: tuple[launch.World, Comm],
                                                               tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = config.load(REPO / "configs" / "smoke.yaml", [*RUN, f"output.dir={tmp_path}", "output.name=nk",
                                                        "data.batch_size=32", "train.max_steps=30",
                                                        "train.log_every=1"])
    train(cfg, world[0], world[1], torch.device("cpu"))
    with (tmp_path / "nk" / "metrics.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["kind"] == "train"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 30 and last < first - 0.1, losses
    post = load_posterior(tmp_path / "nk" / "posterior.pt")
    assert isinstance(post, MatrixNormal) and len(post.blocks) == 19  # every conv, BN and the classifier


def test_resume_draws_and_steps_as_the_uninterrupted_run(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    straight = smoke_trainer(world, tmp_path, *RUN, "train.max_steps=6")
    for _ in straight.steps():
        pass
    first = smoke_trainer(world, tmp_path, *RUN, "train.max_steps=6")
    steps = first.steps()
    for _ in range(3):
        next(steps)
    state = first.state_dict()
    assert state is not None
    second = smoke_trainer(world, tmp_path, *RUN, "train.max_steps=6")
    second.load_state_dict(state)
    for _ in second.steps():
        pass
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


# -- 2 ranks -----------------------------------------------------------------------------------------
WORKER_RUN = ["train.max_steps=4", "train.dtype=float64"]  # tests/mpi/noisy_kfac_worker.py's run


@pytest.mark.mpi
def test_two_ranks_keep_equal_replicas_and_match_one_rank(world: tuple[launch.World, Comm], tmp_path: Path) -> None:
    """tests/mpi/noisy_kfac_worker.py: 2 data ranks and 2 sample groups keep bitwise equal replicas and
    posteriors; the 2 sample groups (each rank the whole batch, samples 0 and 1) equal 1 rank with 2
    samples per step, to float64 rounding."""
    skip_unless_runnable()
    out = tmp_path / "two.pt"
    rc, text = run_mpi(2, REPO / "tests" / "mpi" / "noisy_kfac_worker.py", "--backend", "torch", timeout=120,
                       env={"NOISY_KFAC_OUT": str(out),
                                "NOISY_KFAC_SET": " ".join([*RUN, *WORKER_RUN, f"output.dir={tmp_path}"])})
    assert rc == 0 and "ALL OK backend=torch np=2" in text, text[-4000:]
    two = torch.load(out, weights_only=True)
    one = smoke_trainer(world, tmp_path, *RUN, *WORKER_RUN, "bayes.samples=2")
    for _ in one.steps():
        pass
    params = torch.cat([p.detach().reshape(-1) for p in one.model.parameters()])
    torch.testing.assert_close(params, two["params"], rtol=1e-9, atol=1e-11)
    drawn = one.posterior().draw(generator_for("cpu", 7))
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in drawn.values()]), two["draw"], rtol=1e-8, atol=1e-10)
