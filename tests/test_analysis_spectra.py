"""Float64 oracles for app/analysis: every matrix x approximation against dense torch.func matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from app.analysis.operators import MATRICES, Curvature
from app.analysis.spectra import APPROXIMATIONS, kfac_factors, spectrum
from app.comm.solo import SoloComm
from app.errors import UserError

COMM = SoloComm(torch.device("cpu"))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 5x5 input, 3x3 kernel, stride 2 -> 2x2 positions; the last conv covers its input: 1 position
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.Flatten(), nn.Linear(4, 3)).double()


def data(n: int, shape: tuple[int, ...] = (4,), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_matrix(curv: Curvature) -> torch.Tensor:
    """The matrix from its definition, with torch.func's Jacobians and Hessian (no operator code)."""
    model, params = curv.model, curv.params
    names, shapes = list(params), [p.shape for p in params.values()]
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        return functional_call(model, {n: q.view(s) for n, q, s in zip(names, parts, shapes)}, (x,))

    x, y = curv.inputs, curv.targets
    if curv.matrix == "hessian":
        return hessian(lambda w: F.cross_entropy(f(w, x), y))(flat0)
    jac = torch.stack([jacrev(lambda w, xi=xi: f(w, xi[None])[0])(flat0) for xi in x])  # (n, C, P)
    p = F.softmax(f(flat0, x), 1)
    if curv.matrix == "ggn":
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(x)
    labels = curv.labels
    g = torch.einsum("nc,ncp->np", p - F.one_hot(labels, 3).double(), jac)
    m = g.T @ g / len(x)
    if curv.matrix == "cov":
        m = m - torch.outer(g.mean(0), g.mean(0))
    return m


def approximate(m: torch.Tensor, curv: Curvature, approximation: str) -> torch.Tensor:
    if approximation == "full":
        return m
    if approximation == "diag":
        return torch.diag(torch.diag(m))
    out = torch.zeros_like(m)
    for b in curv.blocks:
        out[b.start:b.stop, b.start:b.stop] = m[b.start:b.stop, b.start:b.stop]
    return out


def vals(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def top(m: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(m).flip(0)[:k]


def checked(matrix: str, approximation: str, estimator: str, k: int, n: int, **kw: float) -> Curvature:
    """``spectrum`` of an n-example MLP against eigh and trace of the dense oracle; the operator."""
    x, y = data(n)
    curv = Curvature(mlp(), x, y, matrix, COMM, total=n, seed=3, chunk=4)
    oracle = approximate(dense_matrix(curv), curv, approximation)
    s = spectrum(curv, approximation, k=k, estimator=estimator, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(vals(s.eigenvalues), top(oracle, k), atol=1e-9, rtol=1e-8)
    if estimator != "lanczos" or matrix != "hessian":  # the Hessian's Lanczos trace is Hutchinson's
        assert s.trace == pytest.approx(float(oracle.trace()), abs=1e-10)
    assert s.estimator in {"dense": ("dense",), "lanczos": ("lanczos", "dense+lanczos"),
                           "dual": ("dual",)}[estimator]
    return curv


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("approximation", ["full", "block", "diag"])
def test_dense_estimator_equals_eigh(matrix: str, approximation: str) -> None:
    checked(matrix, approximation, "dense", 5, 6)


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("approximation", ["full", "block"])
def test_lanczos_equals_eigh(matrix: str, approximation: str) -> None:
    checked(matrix, approximation, "lanczos", 3, 6, tol=1e-12)


@pytest.mark.parametrize("matrix", ["ggn", "mc", "emp", "cov"])
@pytest.mark.parametrize("approximation", ["full", "block", "diag"])
def test_dual_gram_equals_eigh_and_lanczos(matrix: str, approximation: str) -> None:
    curv = checked(matrix, approximation, "dual", 4, 5)
    dual = spectrum(curv, approximation, k=4, estimator="dual")
    if approximation != "diag":
        lanczos = spectrum(curv, approximation, k=2, estimator="lanczos", tol=1e-12)
        torch.testing.assert_close(vals(lanczos.eigenvalues), vals(dual.eigenvalues[:2]),
                                   atol=1e-9, rtol=1e-8)


def test_exact_fisher_equals_ggn() -> None:
    """The Fisher of the predictive distribution, E_{y~p}[g g^T] summed exactly over the C labels,
    is the GGN for softmax cross-entropy."""
    x, _ = data(4)
    model = mlp()
    ggn = dense_matrix(Curvature(model, x, torch.zeros(4, dtype=torch.long), "ggn", COMM, total=4))
    p = F.softmax(model(x), 1).detach()
    fisher = torch.zeros_like(ggn)
    for c in range(3):
        emp = dense_matrix(Curvature(model, x, torch.full((4,), c), "emp", COMM, total=4))
        g_rows = Curvature(model, x, torch.full((4,), c), "emp", COMM, total=4).rows() * 2  # sqrt(N)
        fisher += torch.einsum("n,np,nq->pq", p[:, c], g_rows, g_rows) / 4
        assert torch.allclose(g_rows.T @ g_rows / 4, emp, atol=1e-12)
    torch.testing.assert_close(fisher, ggn, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("matrix", ["ggn", "mc", "emp"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_kfac_is_exact_for_one_example(matrix: str, net: str) -> None:
    """One example (and the convolutions' single output position for the second conv): K-FAC's
    blocks are the exact blocks; the first conv has 4 positions, so the test compares it with the
    KFC formula computed from its own definition instead."""
    if net == "mlp":
        model, (x, y) = mlp(), data(1)
    else:
        model, (x, y) = cnn(), data(1, (2, 5, 5))
    curv = Curvature(model, x, y, matrix, COMM, total=1, seed=5)
    oracle = approximate(dense_matrix(curv), curv, "block")
    factors, others = kfac_factors(curv)
    assert not others
    for block in curv.blocks:
        a, g = factors[block.module]
        exact = oracle[block.start:block.stop, block.start:block.stop]
        if net == "cnn" and block.module == "0":
            assert torch.kron(g, a).shape == exact.shape
            continue
        torch.testing.assert_close(torch.linalg.eigvalsh(torch.kron(g, a)), torch.linalg.eigvalsh(exact),
                                   atol=1e-12, rtol=1e-9)
    s = spectrum(curv, "kfac", k=4)
    assert s.estimator == "kronecker" and s.trace == pytest.approx(
        sum(float(a.trace() * g.trace()) for a, g in factors.values()))


def test_kfac_is_the_mean_of_factors_over_examples() -> None:
    """N examples: A and G are the means of the per-example factors (checked from N runs of N=1)."""
    x, y = data(3)
    model = mlp()
    factors, _ = kfac_factors(Curvature(model, x, y, "ggn", COMM, total=3))
    single = [kfac_factors(Curvature(model, x[i:i + 1], y[i:i + 1], "ggn", COMM, total=1))[0] for i in range(3)]
    for name, (a, g) in factors.items():
        torch.testing.assert_close(a, sum(s[name][0] for s in single) / 3)
        torch.testing.assert_close(g, sum(s[name][1] for s in single) / 3)


def test_hutchinson_trace_within_its_standard_error() -> None:
    x, y = data(6)
    curv = Curvature(mlp(), x, y, "hessian", COMM, total=6)
    m = dense_matrix(curv)
    samples = 400
    s = spectrum(curv, "full", k=2, estimator="lanczos", trace_samples=samples, seed=11)
    sd = (2 * (float((m ** 2).sum()) - float((torch.diag(m) ** 2).sum())) / samples) ** 0.5
    assert abs(s.trace - float(m.trace())) < 5 * sd
    assert s.trace_estimator == f"hutchinson{samples}"


def test_mc_labels_depend_on_the_global_index_only() -> None:
    x, y = data(8)
    model = mlp()
    whole = Curvature(model, x, y, "mc", COMM, total=8, seed=9).labels
    parts = [Curvature(model, x[i:i + 3], y[i:i + 3], "mc", COMM, total=8, seed=9, offset=i).labels
             for i in (0, 3, 6)]
    assert torch.equal(whole, torch.cat(parts))
    assert not torch.equal(whole, Curvature(model, x, y, "mc", COMM, total=8, seed=10).labels)


@pytest.mark.parametrize("bad", [dict(approximation="kron"), dict(estimator="power"), dict(k=0)])
def test_bad_arguments_one_line(bad: dict[str, object]) -> None:
    x, y = data(3)
    curv = Curvature(mlp(), x, y, "ggn", COMM, total=3)
    args: dict[str, object] = dict(approximation="full", k=2, estimator="auto") | bad
    with pytest.raises(UserError) as err:
        spectrum(curv, **args)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_no_kronecker_or_gram_for_hessian() -> None:
    x, y = data(3)
    curv = Curvature(mlp(), x, y, "hessian", COMM, total=3)
    with pytest.raises(UserError, match="K-FAC"):
        spectrum(curv, "kfac")
    with pytest.raises(UserError, match="sample-space"):
        spectrum(curv, "full", estimator="dual")
    with pytest.raises(UserError, match="unknown matrix"):
        Curvature(mlp(), x, y, "fim", COMM, total=3)
    assert set(APPROXIMATIONS) == {"full", "block", "kfac", "diag"}


@pytest.mark.parametrize("matrix", MATRICES)
def test_products_equal_with_every_chunk_one_or_none_recorded(matrix: str) -> None:
    """Two chunks of 3: records kept for both (default budget), for one (a budget of one chunk's
    bytes) or for none (cache_mb=0) give the same products, equal to the dense matrix's."""
    x, y = data(6)

    def operator(budget: float) -> Curvature:
        return Curvature(mlp(), x, y, matrix, COMM, total=6, seed=3, chunk=3, cache_mb=budget)

    ops = {budget: operator(budget) for budget in (1024.0, 0.0)}
    oracle = dense_matrix(ops[0.0])
    g = torch.Generator().manual_seed(4)
    vs = [torch.randn(ops[0.0].dim, generator=g, dtype=torch.float64) for _ in range(3)]
    ops[1024.0].matvec(vs[0])
    both = ops[1024.0].cache_bytes
    assert both > 0 and ops[0.0].cache_bytes == 0
    ops[both / 2 / 2 ** 20] = operator(both / 2 / 2 ** 20)
    for v in vs:
        for curv in ops.values():
            torch.testing.assert_close(curv.matvec(v), oracle @ v, atol=1e-12, rtol=1e-10)
    assert [curv.cache_bytes for curv in ops.values()] == [both, 0, both // 2]


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_a_changed_parameter_fails_a_recorded_product_loudly(matrix: str) -> None:
    """The record is the matrix at the operator's point: an in-place step of the model afterwards
    is autograd's version error, not a product mixing two points."""
    x, y = data(4)
    net = mlp()
    curv = Curvature(net, x, y, matrix, COMM, total=4)
    v = torch.ones(curv.dim, dtype=torch.float64)
    curv.matvec(v)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        curv.matvec(v)
