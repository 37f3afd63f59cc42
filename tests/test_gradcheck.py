"""``spngd check``: finite differences that skip ReLU/max-pool kinks, still catch a wrong backward,
and pass on the model of every shipped config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.config import load
from app.gradcheck import check_gradients
from app.models import build_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _kinked_net() -> nn.Module:
    """One sample x = (1, 2), three hidden ReLU units: unit 0's input is exactly 0 (every +/- step
    crosses its kink), unit 1's is 5e-6 (a 1e-5 step on one of its weights crosses it, 1e-6 does
    not), unit 2's is 1.5 (no step crosses)."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, 0.25], [0.25, 0.5], [0.5, 0.5]]))
        net[0].bias.copy_(torch.tensor([-1.0, 5e-6 - 1.25, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.5, -1.0], [-1.0, 0.25, 2.0]]))
        net[2].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return net


def test_kink_crossings_are_retried_smaller_then_skipped() -> None:
    net, x, y = _kinked_net(), torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([1])
    results = check_gradients(net, F.cross_entropy, x, y, eps=1e-5, max_per_tensor=9)
    w, b, head = results["0.weight"], results["0.bias"], results["2.weight"]
    assert (w.checked, w.skipped, w.step) == (4, 2, pytest.approx(1e-6))  # row 0 skipped, row 1 at 1e-6
    assert (b.checked, b.skipped, b.step) == (2, 1, pytest.approx(1e-6))
    assert (head.checked, head.skipped, head.step) == (9, 0, 1e-5)  # nothing downstream of it is a kink
    assert max(r.max_rel_err for r in results.values()) < 1e-6
    # what a plain central difference says about the skipped bias: half the ReLU's slope
    loss = lambda: F.cross_entropy(net(x), y).item()
    with torch.no_grad():
        net[0].bias[0] += 1e-5
        plus = loss()
        net[0].bias[0] -= 2e-5
        minus = loss()
    assert abs((plus - minus) / 2e-5) > 0.1  # autograd says 0: relu'(0) = 0


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        return 1.5 * g


def test_a_wrong_backward_still_fails_in_a_resnet() -> None:
    """Skipping kinks must not hide a backprop bug: every tensor is checked and wrong by ~1/3."""
    torch.manual_seed(0)
    model = build_model(load(None, ["model.arch=cifar_resnet8", "model.zero_init_residual=false"]).model, 4)
    bad = lambda out, y: F.cross_entropy(_WrongGrad.apply(out), y)
    results = check_gradients(model, bad, torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), max_per_tensor=2)
    assert all(r.checked > 0 for r in results.values())
    assert min(r.max_rel_err for r in results.values()) > 0.1


def _check(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "check", "--config", f"configs/{name}"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "smoke.yaml" else pytest.mark.slow)
                                  for n in CONFIGS])
def test_check_passes_on_every_shipped_config(name: str) -> None:
    res = _check(name)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("CHECK OK tensors=") and " skipped=" in last and "unchecked" not in last, last
