"""Cross-check of app/analysis against curvlinops-for-pytorch, an independent implementation."""

from __future__ import annotations

import pytest
import torch
from curvlinops import EFLinearOperator, GGNLinearOperator, HessianLinearOperator, KFACLinearOperator
from torch import nn

from app.analysis.operators import Curvature
from app.analysis.spectra import kfac_factors
from app.comm.solo import SoloComm
from tests.test_analysis_spectra import cnn, data, mlp

COMM = SoloComm(torch.device("cpu"))
THEIRS = {"hessian": HessianLinearOperator, "ggn": GGNLinearOperator, "emp": EFLinearOperator}


@pytest.mark.parametrize("matrix", sorted(THEIRS))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_products_equal_curvlinops(matrix: str, net: str) -> None:
    model, (x, y) = (mlp(), data(7)) if net == "mlp" else (cnn(), data(7, (2, 5, 5)))
    ours = Curvature(model, x, y, matrix, COMM, total=7, chunk=3)
    params = [p for p in model.parameters()]
    theirs = THEIRS[matrix](model, nn.CrossEntropyLoss(), params, [(x[:3], y[:3]), (x[3:], y[3:])])
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(ours.dim, generator=g, dtype=torch.float64)
        expected = torch.cat([t.reshape(-1) for t in theirs @ list(ours.unflatten(v).values())])
        torch.testing.assert_close(ours.matvec(v), expected, atol=1e-12, rtol=1e-10)


def test_kfac_equals_curvlinops_exact_fisher_kfac() -> None:
    """curvlinops' K-FAC with the exact (type-2) Fisher, weight and bias joined, is A (x) G per layer:
    the same eigenvalues as ours."""
    model, (x, y) = mlp(), data(7)
    factors, _ = kfac_factors(Curvature(model, x, y, "ggn", COMM, total=7))
    theirs = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                                fisher_type="type-2", separate_weight_and_bias=False)
    view = Curvature(model, x, y, "ggn", COMM, total=7).unflatten
    dim = sum(p.numel() for p in model.parameters())
    dense = torch.stack([torch.cat([t.reshape(-1) for t in theirs @ list(
        view(torch.eye(dim, dtype=torch.float64)[i]).values())]) for i in range(dim)], 1)
    ours = torch.cat([torch.linalg.eigvalsh(torch.kron(a, g)) for a, g in factors.values()]).sort().values
    torch.testing.assert_close(torch.linalg.eigvalsh((dense + dense.T) / 2), ours, atol=1e-12, rtol=1e-9)
