"""Float64 oracles that define a correct K-FAC: exact Fisher blocks, dense solves, MC -> exact -> GGN,
Cholesky == eigen, and finite differences == autograd."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from testlib import WrongGrad
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from app.config import KFACConfig
from app.gradcheck import check_gradients
from app.kfac import KFAC
from app.kfac.factors import KronLayer, UnitLayer, input_rows, output_rows


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def kfac_step(model: nn.Module, x: Tensor, y: Tensor, **cfg: object) -> tuple[KFAC, dict[str, Tensor]]:
    """One K-FAC step on (x, y); returns the K-FAC (hooks removed) and the raw gradients. KL clipping is
    off unless asked for: the oracles compare the unscaled solve."""
    kfac = KFAC(model, KFACConfig(**{"kl_clip": 0.0, **cfg}))  # type: ignore[arg-type]
    model.zero_grad(set_to_none=True)
    kfac.begin_step(0)
    out = model(x)
    kfac.fisher_backward(out)
    F.cross_entropy(out, y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    kfac.step(lr=0.1)
    kfac.close()
    return kfac, raw


def ggn(J: Tensor, logits: Tensor) -> Tensor:
    """``J^T (diag p - p p^T) J`` for the Jacobian J of the logits (classes, params)."""
    p = logits.detach().softmax(-1)
    return J.T @ (torch.diag(p) - torch.outer(p, p)) @ J


def layer_jacobian(model: nn.Module, name: str, x1: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, d logits / d vec([W.flatten(1) | b])) for one example, row-major."""
    mod = model.get_submodule(name)

    def logits(w: Tensor, b: Tensor) -> Tensor:
        return functional_call(model, {f"{name}.weight": w, f"{name}.bias": b}, (x1,))[0]

    w, b = mod.weight.detach(), mod.bias.detach()
    Jw, Jb = jacrev(logits, argnums=(0, 1))(w, b)
    c, out = Jw.shape[0], w.shape[0]
    return logits(w, b), torch.cat([Jw.reshape(c, out, -1), Jb.reshape(c, out, 1)], 2).reshape(c, -1)


def kron_factors(kfac: KFAC, name: str) -> tuple[Tensor, Tensor]:
    A, G = kfac.layers[name].factors  # type: ignore[misc]
    return A, G


def damped(A: Tensor, G: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """The damped factors, written out independently of app.kfac.inverse."""
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    return A + pi * lam ** 0.5 * torch.eye(A.shape[0]), G + lam ** 0.5 / pi * torch.eye(G.shape[0])


def vec_grad(model: nn.Module, name: str, grads: dict[str, Tensor]) -> Tensor:
    w = grads[f"{name}.weight"]
    return torch.cat([w.reshape(w.shape[0], -1), grads[f"{name}.bias"][:, None]], 1).reshape(-1)


# -- a) one example, one position: G (x) A is the exact Fisher block ------------------------------
CONVS = [
    {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "hw": (4, 4)},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (2, 1), "hw": (4, 2)},
]


@pytest.mark.parametrize("spec", CONVS, ids=["square", "asymmetric"])
def test_one_example_kron_block_is_exact_fisher(spec: dict) -> None:
    torch.manual_seed(0)
    spec = dict(spec)
    hw = spec.pop("hw")
    model = nn.Sequential(nn.Conv2d(2, 3, **spec), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4))
    x, y = torch.randn(1, 2, *hw), torch.tensor([1])
    assert model[0](x).shape[-2:] == (1, 1)
    kfac, _ = kfac_step(model, x, y, fisher="exact")
    for name in ("0", "3"):
        A, G = kron_factors(kfac, name)
        logits, J = layer_jacobian(model, name, x)
        torch.testing.assert_close(torch.kron(G, A), ggn(J, logits), rtol=1e-10, atol=1e-12)


def test_emp_G_scaling_for_mean_loss() -> None:
    """Mean loss: autograd gives g_i / B, and G must be (1/B) sum_i g_i g_i^T."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(7, 3), torch.randint(0, 4, (7,))
    kfac, _ = kfac_step(model, x, y, fisher="emp")
    s = model[0](x).detach()
    g = vmap(torch.func.grad(lambda s1, y1: F.cross_entropy(model[2](model[1](s1))[None], y1[None])))(s, y)
    torch.testing.assert_close(kron_factors(kfac, "0")[1], g.T @ g / len(x))
    torch.testing.assert_close(kron_factors(kfac, "0")[0], torch.cat([x, torch.ones(7, 1)], 1).T
                               @ torch.cat([x, torch.ones(7, 1)], 1) / 7)


@pytest.mark.parametrize("spec", [
    {"kernel_size": (3, 4), "stride": (2, 1), "padding": 0, "dilation": (1, 2)},
    {"kernel_size": (3, 4), "padding": "same", "dilation": (1, 2)},  # uneven padding
    {"kernel_size": 1, "stride": 2},  # the no-im2col path
], ids=["strided", "same", "1x1"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_im2col_rows_reproduce_weight_gradient(spec: dict, channels_last: bool) -> None:
    """For many positions, sum over rows of g a^T is the weight gradient: im2col order is W's."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, bias=False, **spec)
    x = torch.randn(2, 2, 7, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    rows = output_rows(g, 1).T @ input_rows(conv, x)
    torch.testing.assert_close(rows, conv.weight.grad.reshape(3, -1))


# -- b) the preconditioned gradient is the dense solve ---------------------------------------------
def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(12, 4))


@pytest.mark.parametrize("inverse,eigen_damping", [("cholesky", "factored"), ("eigen", "factored"),
                                                   ("eigen", "kron")])
def test_preconditioned_gradient_is_dense_solve(inverse: str, eigen_damping: str) -> None:
    torch.manual_seed(3)
    lam = 1e-2
    model = small_net()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    kfac, raw = kfac_step(model, x, y, damping=lam, inverse=inverse, eigen_damping=eigen_damping)
    for name in ("0", "4"):
        A, G = kron_factors(kfac, name)
        if eigen_damping == "kron":
            M = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0])
        else:
            A_d, G_d = damped(A, G, lam)
            M = torch.kron(G_d, A_d)
        expect = torch.linalg.solve(M, vec_grad(model, name, raw))
        torch.testing.assert_close(vec_grad(model, name, {n: p.grad for n, p in model.named_parameters()}),
                                   expect)
    (block,) = kfac.layers["1"].factors  # type: ignore[misc]
    gb = torch.stack([raw["1.weight"], raw["1.bias"]], -1)
    expect = torch.linalg.solve(block + lam * torch.eye(2), gb)
    torch.testing.assert_close(torch.stack([model[1].weight.grad, model[1].bias.grad], -1), expect)


# -- c) BN unit-wise blocks are the exact Fisher of (gamma_c, beta_c) --------------------------------
def test_bn_unitwise_blocks_are_exact_fisher() -> None:
    """Oracle in eval mode: with running statistics examples are independent, so per-example
    Jacobians are exact (SP-NGD ignores the batch-statistics coupling in training mode as well)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(12, 4))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))
    kfac, _ = kfac_step(model, x, y, fisher="exact")
    (blocks,) = kfac.layers["1"].factors  # type: ignore[misc]

    def logits(gamma: Tensor, beta: Tensor, x1: Tensor) -> Tensor:
        return functional_call(model, {"1.weight": gamma, "1.bias": beta}, (x1[None],))[0]

    gamma, beta = bn.weight.detach(), bn.bias.detach()
    Jg, Jb = vmap(jacrev(logits, argnums=(0, 1)), in_dims=(None, None, 0))(gamma, beta, x)
    fisher = torch.stack([ggn(torch.cat([jg, jb], 1), logits(gamma, beta, x1))
                          for jg, jb, x1 in zip(Jg, Jb, x)]).mean(0)
    c = torch.arange(3)
    expect = torch.stack([torch.stack([fisher[c, c], fisher[c, c + 3]], -1),
                          torch.stack([fisher[c + 3, c], fisher[c + 3, c + 3]], -1)], -2)
    torch.testing.assert_close(blocks, expect)


# -- d) MC -> exact, exact == GGN ----------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))


def test_exact_fisher_equals_ggn() -> None:
    """Definition E_{y~p}[grad log p(y) grad log p(y)^T] over all parameters == J^T (diag p - pp^T) J."""
    torch.manual_seed(5)
    model = mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x1 = torch.randn(3)

    def flat_jac(fn: object) -> Tensor:
        jac = jacrev(lambda ps: fn(functional_call(model, ps, (x1,))))(params)  # type: ignore[operator]
        return torch.cat([j.reshape(4, -1) for j in jac.values()], 1)

    logits = functional_call(model, params, (x1,))
    J_logp, J_z = flat_jac(lambda z: z.log_softmax(-1)), flat_jac(lambda z: z)
    p = logits.softmax(-1)
    fisher = J_logp.T @ torch.diag(p) @ J_logp
    torch.testing.assert_close(fisher, ggn(J_z, logits))


def test_exact_G_is_ggn_of_the_layer_output_over_a_batch() -> None:
    torch.manual_seed(6)
    model = mlp()
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    kfac, _ = kfac_step(model, x, y, fisher="exact")
    s = model[0](x).detach()
    head = lambda s1: model[2](model[1](s1))
    J = vmap(jacrev(head))(s)
    expect = torch.stack([ggn(j, head(s1)) for j, s1 in zip(J, s)]).mean(0)
    torch.testing.assert_close(kron_factors(kfac, "0")[1], expect)


def test_mc_fisher_converges_to_exact() -> None:
    torch.manual_seed(7)
    model = mlp()
    x = torch.randn(3, 3).repeat(3000, 1)  # 3000 label draws per example in one pass
    y = torch.zeros(len(x), dtype=torch.long)
    exact, _ = kfac_step(copy.deepcopy(model), x, y, fisher="exact")
    mc, _ = kfac_step(model, x, y, fisher="mc")
    for name in ("0", "2"):
        G_exact, G_mc = kron_factors(exact, name)[1], kron_factors(mc, name)[1]
        assert (G_mc - G_exact).norm() / G_exact.norm() < 0.05


# -- e) Cholesky == eigen ---------------------------------------------------------------------------
def test_cholesky_and_eigen_give_the_same_update() -> None:
    torch.manual_seed(8)
    model = small_net()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    other = copy.deepcopy(model)
    kfac_step(model, x, y, inverse="cholesky", damping=1e-3)
    kfac_step(other, x, y, inverse="eigen", damping=1e-3)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10)


def test_layer_kinds() -> None:
    kfac = KFAC(small_net(), KFACConfig())
    assert [type(layer) for layer in kfac.layers.values()] == [KronLayer, UnitLayer, KronLayer]


# -- f) finite differences == autograd -----------------------------------------------------------------
def conv_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 4, 3, stride=2, dilation=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3))


def test_finite_differences_agree_with_autograd() -> None:
    torch.manual_seed(9)
    model = conv_bn_net().float()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    errors = check_gradients(model, F.cross_entropy, x, y, max_per_tensor=6)
    assert set(errors) == {n for n, _ in model.named_parameters()}
    assert all(r.checked for r in errors.values()) and max(r.max_rel_err for r in errors.values()) < 1e-6, errors
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_finite_differences_catch_a_wrong_backward() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    bad = lambda out, y: F.cross_entropy(WrongGrad.apply(out), y)
    errors = check_gradients(model, bad, torch.randn(5, 3), torch.randint(0, 3, (5,)), max_per_tensor=4)
    assert min(r.max_rel_err for r in errors.values()) > 0.1


# -- the step-aware running average and Diff ------------------------------------------------------------
def statistics(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, list[Tensor]]:
    """One step's statistics X of every layer: what a fresh K-FAC's first refresh initialises to."""
    kfac, _ = kfac_step(model, x, y)
    return {name: [t.clone() for t in layer.factors] for name, layer in kfac.layers.items()}  # type: ignore[union-attr]


def test_fold_with_a_gap_is_the_per_step_recursion() -> None:
    """decay**gap on the old average == ``gap`` per-step folds of the same statistics."""
    layer = KronLayer("fc", nn.Linear(3, 2), torch.float64)
    old, new = [torch.randn(4, 4), torch.randn(2, 2)], [torch.randn(4, 4), torch.randn(2, 2)]
    layer.fold(old, 0.9, gap=1)  # the first fold initialises, whatever the gap
    assert all(torch.equal(f, o) for f, o in zip(layer.factors, old))  # type: ignore[arg-type]
    layer.fold(new, 0.9, gap=7)
    expected = [o.clone() for o in old]
    for _ in range(7):
        expected = [0.9 * e + 0.1 * n for e, n in zip(expected, new)]
    for f, e in zip(layer.factors, expected):  # type: ignore[arg-type]
        torch.testing.assert_close(f, e, rtol=1e-13, atol=1e-13)


def test_fixed_interval_refresh_decays_by_the_interval() -> None:
    """factor_interval=3: step 3's refresh is 0.8**3 F + (1 - 0.8**3) X (weights held, so X is known)."""
    torch.manual_seed(0)
    model = small_net()
    x0, y0 = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    x3, y3 = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    f0, s3 = statistics(model, x0, y0), statistics(model, x3, y3)
    kfac = KFAC(model, KFACConfig(kl_clip=0.0, factor_interval=3, inverse_interval=3, stat_decay=0.8))
    for step, (x, y) in enumerate([(x0, y0), (x0, y0), (x0, y0), (x3, y3)]):
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        out = model(x)
        kfac.fisher_backward(out)
        F.cross_entropy(out, y).backward()
        kfac.step(lr=0.1)  # no optimiser step: the weights stay, so the statistics are the ones above
    w = 0.8 ** 3
    for name, layer in kfac.layers.items():
        for f, a, b in zip(layer.factors, f0[name], s3[name]):  # type: ignore[arg-type]
            torch.testing.assert_close(f, w * a + (1 - w) * b, rtol=1e-12, atol=1e-12)


def test_diff_compares_the_statistics_with_the_average_they_update() -> None:
    """Adaptive: at every refresh after the first, the traced Diff is max ||X - F|| / ||F|| with F the
    average before the fold and X recovered from the fold, F' = d**gap F + (1 - d**gap) X."""
    torch.manual_seed(1)
    model = small_net()
    decay = 0.7
    kfac = KFAC(model, KFACConfig(kl_clip=0.0, adaptive_lambda=0.3, stat_decay=decay))
    seen = 0
    for step in range(12):
        before = {n: None if l.factors is None else [t.clone() for t in l.factors] for n, l in kfac.layers.items()}
        last = list(kfac.clock.last)
        due = kfac.clock.factors_due(step)
        x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))
        model.zero_grad(set_to_none=True)
        kfac.begin_step(step)
        out = model(x)
        kfac.fisher_backward(out)
        F.cross_entropy(out, y).backward()
        kfac.step(lr=0.1)
        for i, (name, layer) in enumerate(kfac.layers.items()):
            old = before[name]
            if not due[i] or old is None:
                continue
            w = 1 - decay ** (step - last[i])
            xs = [(f - (1 - w) * o) / w for f, o in zip(layer.factors, old)]  # type: ignore[arg-type]
            expected = max(float(torch.linalg.norm(a - o) / torch.linalg.norm(o)) for a, o in zip(xs, old))
            assert kfac.clock.diffs[i] == pytest.approx(expected, rel=1e-9)
            seen += 1
    assert seen > 10 and max(kfac.clock.intervals) > 1


def test_checkpoint_with_previous_statistics_still_loads() -> None:
    """Checkpoints written before Diff compared with the average carry each layer's "previous": ignored."""
    torch.manual_seed(2)
    model = small_net()
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    kfac, _ = kfac_step(model, x, y, adaptive_lambda=0.3)
    state = kfac.state_dict()
    for entry in state["layers"].values():
        assert "previous" not in entry
        entry["previous"] = [t.clone() for t in entry["factors"]]
    restored = KFAC(model, KFACConfig(kl_clip=0.0, adaptive_lambda=0.3))
    restored.load_state_dict(state)
    for name, layer in restored.layers.items():
        for f, g in zip(layer.factors, kfac.layers[name].factors):  # type: ignore[arg-type]
            assert torch.equal(f, g)
