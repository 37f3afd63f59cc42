"""Per-example squared gradients (``app.bayes.sqgrad``) against a float64 oracle: torch.func's per-example
gradients of the per-example losses, squared and summed over the batch."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from app.bayes.sqgrad import SquaredGradients

Loss = Callable[[Tensor, Tensor], Tensor]  # per-example losses, shape (B,)


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


def squared_error(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().flatten(1).sum(1)


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def oracle(model: nn.Module, loss: Loss, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``sum_i (dl_i/dtheta)^2`` from vmap(grad) of each example's own loss."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g.square().sum(0) for n, g in grads.items()}


def captured(model: nn.Module, loss: Loss, *batches: tuple[Tensor, Tensor], loss_scale: float = 1.0,
             ) -> dict[str, Tensor]:
    """The hooks' squares after one mean-loss forward/backward per batch."""
    sq = SquaredGradients(model)
    sq.armed = True
    for x, y in batches:
        (loss(model(x), y).mean() * loss_scale).backward()
    names = {p: n for n, p in model.named_parameters()}
    out = {names[p]: s for p, s in sq.squares(loss_scale=loss_scale).items()}
    sq.remove()
    return out


def assert_match(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert got[n].shape == w.shape, n
        torch.testing.assert_close(got[n], w, rtol=rtol, atol=rtol * float(w.abs().max()), msg=n)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5)], ids=["2d", "3d"])
def test_linear(bias: bool, shape: tuple[int, ...]) -> None:
    model = nn.Linear(5, 3, bias=bias)
    x, y = torch.randn(shape), torch.randn(*shape[:-1], 3)
    assert_match(captured(model, squared_error, (x, y)), oracle(model, squared_error, x, y))


CONV_GRID = [(s, p, d, b) for s, p, d, b in itertools.product([1, 2], [0, 1, "same"], [1, 2], [True, False])
             if not (p == "same" and s != 1)]  # PyTorch refuses padding='same' with stride > 1


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kernel", [(3, 2), (1, 1)], ids=["3x2", "1x1"])
@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"), CONV_GRID)
def test_conv2d(stride: int, padding: int | str, dilation: int, bias: bool, kernel: tuple[int, int]) -> None:
    model = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(5, 3, 9, 8)
    y = torch.randn_like(model(x))
    assert_match(captured(model, squared_error, (x, y)), oracle(model, squared_error, x, y))


def eval_batchnorm(channels: int) -> nn.BatchNorm2d:
    """An eval-mode BN with non-trivial running statistics and affine parameters."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def test_batchnorm_eval_is_exact() -> None:
    model = eval_batchnorm(3)
    x = torch.randn(6, 3, 4, 5)
    y = torch.randn_like(x)
    assert_match(captured(model, squared_error, (x, y)), oracle(model, squared_error, x, y))


def test_batchnorm_train_uses_each_example_at_the_batch_statistics() -> None:
    """Train mode: the documented VOGN choice, ``(sum_hw xhat_i delta_i)^2`` with the batch's own mean and
    (biased) variance and delta_i = B dL/dy_i, not the exact per-example gradient through the statistics."""
    model = nn.BatchNorm2d(3)
    x = torch.randn(6, 3, 4, 5) * 2 + 1
    y = torch.randn_like(x)
    got = captured(model, squared_error, (x, y))
    out = model(x)
    (delta,) = torch.autograd.grad(squared_error(out, y).mean() * x.shape[0], out)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
    xhat = (x - mean) / torch.sqrt(var + model.eps)
    want = {"weight": (xhat * delta).sum((2, 3)).square().sum(0), "bias": delta.sum((2, 3)).square().sum(0)}
    assert_match(got, want)


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), eval_batchnorm(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 3, (2, 3), stride=2), nn.Flatten(), nn.Linear(3 * 3 * 3, 5))


def test_small_network_every_parameter() -> None:
    """Conv -> BN(eval) -> in-place ReLU -> conv -> flatten -> linear, cross-entropy mean loss."""
    model = small_net()
    x, y = torch.randn(7, 2, 6, 7), torch.randint(0, 5, (7,))
    got = captured(model, cross_entropy, (x, y))
    assert got.keys() == dict(model.named_parameters()).keys()
    assert_match(got, oracle(model, cross_entropy, x, y))


def test_micro_batches_accumulate() -> None:
    model = small_net()
    x, y = torch.randn(7, 2, 6, 7), torch.randint(0, 5, (7,))
    split = captured(model, cross_entropy, (x[:3], y[:3]), (x[3:], y[3:]))
    assert_match(split, captured(model, cross_entropy, (x, y)), rtol=1e-12)


def test_loss_scale_is_divided_out() -> None:
    model = small_net()
    x, y = torch.randn(4, 2, 6, 7), torch.randint(0, 5, (4,))
    assert_match(captured(model, cross_entropy, (x, y), loss_scale=1024.0), oracle(model, cross_entropy, x, y))
    with pytest.raises(ValueError, match="loss_scale must be positive"):
        SquaredGradients(model).squares(loss_scale=0.0)


@pytest.mark.parametrize(("module", "why"), [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2; only groups=1"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.BatchNorm2d(4, affine=False), "not affine"),
    (nn.LayerNorm(4), "LayerNorm is not a Linear, Conv2d or BatchNorm2d"),
])
def test_unsupported_module_refused_by_name(module: nn.Module, why: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(ValueError, match=f"module '1': .*{why}") as exc:
        SquaredGradients(model, modules=[module])
    assert "\n" not in str(exc.value)
    if isinstance(module, nn.Conv2d):  # the default selection refuses it too, rather than skip it
        with pytest.raises(ValueError, match="module '1'"):
            SquaredGradients(model)


def test_hooks_inactive_unless_armed_and_grad_enabled() -> None:
    model = small_net()
    (xa, ya), (xb, yb) = [(torch.randn(4, 2, 6, 7), torch.randint(0, 5, (4,))) for _ in range(2)]
    sq = SquaredGradients(model)
    with pytest.raises(RuntimeError, match="no armed backward reached module '0' since clear"):
        sq.squares()
    F.cross_entropy(model(xb), yb).backward()  # not armed
    sq.armed = True
    with torch.no_grad():
        model(xb)  # armed, but no graph: nothing recorded, nothing outstanding
    F.cross_entropy(model(xa), ya).backward()
    names = {p: n for n, p in model.named_parameters()}
    got = {names[p]: s for p, s in sq.squares().items()}
    sq.armed = False  # the hooks would also fire inside the oracle's torch.func.grad
    assert_match(got, oracle(model, cross_entropy, xa, ya))
    sq.clear()
    with pytest.raises(RuntimeError, match="since clear"):
        sq.squares()


def test_forward_without_backward_and_shared_weights_refused() -> None:
    model = small_net()
    x = torch.randn(4, 2, 6, 7)
    sq = SquaredGradients(model)
    sq.armed = True
    model(x)
    with pytest.raises(RuntimeError, match="module '0' has an armed forward whose output got no gradient"):
        sq.squares()
    with pytest.raises(RuntimeError, match="module '0' ran again before its last armed output got a gradient"):
        model(x)
    sq.clear()
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()  # fine once cleared
    sq.squares()
    shared = nn.Linear(3, 3)
    SquaredGradients(shared).armed = True
    with pytest.raises(RuntimeError, match="module '' ran again"):
        shared(shared(torch.randn(2, 3)))


def test_remove_detaches_hooks() -> None:
    model = nn.Linear(3, 2)
    sq = SquaredGradients(model)
    sq.armed = True
    sq.remove()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="no armed backward"):
        sq.squares()
