"""K-FAC mechanics: capture under in-place ops, layouts, autocast, accumulation, data parallel,
skips, failures, intervals, resume, KL clipping, and the MC backward leaving ``.grad`` alone."""

from __future__ import annotations

import copy
import io
import logging
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from thread_comm import ThreadComm, ThreadWorld
from torch import Tensor, nn

from app.config import KFACConfig
from app.kfac import KFAC
from app.kfac.inverse import Retries, cholesky_inverse


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def net(inplace: bool = True, bn: bool = True) -> nn.Module:
    norm: list[tuple[str, nn.Module]] = [("bn", nn.BatchNorm2d(3))] if bn else []
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(2, 3, 3, padding=1)), *norm,
                                      ("relu", nn.ReLU(inplace=inplace)), ("flat", nn.Flatten()),
                                      ("fc", nn.Linear(48, 4)), ("relu2", nn.ReLU(inplace=inplace)),
                                      ("out", nn.Linear(4, 3))]))


def data(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_step(model: nn.Module, kfac: KFAC, step: int, batches: list[tuple[Tensor, Tensor]],
               lr: float = 0.1, autocast: bool = False) -> None:
    """begin_step, k micro-batches (loss mean / k), step: the training loop's contract."""
    model.zero_grad(set_to_none=True)
    kfac.begin_step(step, micro_batches=len(batches))
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        kfac.fisher_backward(out)
        (F.cross_entropy(out.float() if autocast else out, y) / len(batches)).backward()
    kfac.step(lr)


def factors(kfac: KFAC) -> dict[str, list[Tensor]]:
    return {name: layer.factors for name, layer in kfac.layers.items()}  # type: ignore[misc]


def assert_factors_close(a: KFAC, b: KFAC, **tol: float) -> None:
    fa, fb = factors(a), factors(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        for s, t in zip(fa[name], fb[name]):
            torch.testing.assert_close(s, t, **tol)


# -- capture ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["emp", "exact"])
def test_inplace_relu_gives_the_same_factors(fisher: str) -> None:
    a, b = net(inplace=True), net(inplace=False)
    b.load_state_dict(a.state_dict())
    ka, kb = KFAC(a, KFACConfig(fisher=fisher)), KFAC(b, KFACConfig(fisher=fisher))
    train_step(a, ka, 0, [data()])
    train_step(b, kb, 0, [data()])
    assert_factors_close(ka, kb)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_bn_block_of_one_example_is_its_gradient_outer_product() -> None:
    """Training-mode BN followed by in-place ReLU: for B=1, u and v are dl/dgamma and dl/dbeta."""
    model = net()
    kfac = KFAC(model, KFACConfig(fisher="emp", kl_clip=0.0))
    model.zero_grad()
    kfac.begin_step(0)
    x, y = data(1)
    F.cross_entropy(model(x), y).backward()
    grad = torch.stack([model.bn.weight.grad, model.bn.bias.grad], -1).clone()
    kfac.step(0.1)
    (block,) = kfac.layers["bn"].factors  # type: ignore[misc]
    torch.testing.assert_close(block, grad[:, :, None] * grad[:, None, :])


def test_channels_last_gives_the_same_factors_and_update() -> None:
    a = net()
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    ka, kb = KFAC(a, KFACConfig()), KFAC(b, KFACConfig())
    x, y = data()
    train_step(a, ka, 0, [(x, y)])
    train_step(b, kb, 0, [(x.contiguous(memory_format=torch.channels_last), y)])
    assert_factors_close(ka, kb)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("fisher", ["emp", "mc"])
def test_bf16_autocast_accumulates_float32_factors(fisher: str) -> None:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    a = net().float()
    b = copy.deepcopy(a)
    x, y = data(16)
    x = x.float()
    ka, kb = KFAC(a, KFACConfig(fisher=fisher)), KFAC(b, KFACConfig(fisher=fisher))
    torch.manual_seed(1)
    train_step(a, ka, 0, [(x, y)], autocast=True)
    torch.manual_seed(1)
    train_step(b, kb, 0, [(x, y)])
    for name, fs in factors(ka).items():
        for s, t in zip(fs, factors(kb)[name]):
            assert s.dtype == torch.float32
            assert (s - t).norm() / t.norm() < 0.05, name


@pytest.mark.parametrize("fisher", ["emp", "exact"])
def test_gradient_accumulation_equals_one_batch(fisher: str) -> None:
    a = net()
    a.eval()  # batch statistics differ between micro-batches in training mode
    b = copy.deepcopy(a)
    ka, kb = KFAC(a, KFACConfig(fisher=fisher)), KFAC(b, KFACConfig(fisher=fisher))
    x, y = data(6)
    train_step(a, ka, 0, [(x, y)])
    train_step(b, kb, 0, [(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])])
    assert_factors_close(ka, kb)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_mc_and_exact_backward_leave_grad_untouched() -> None:
    x, y = data()
    plain = net()
    F.cross_entropy(plain(x), y).backward()
    for fisher in ("mc", "exact"):
        model = copy.deepcopy(plain)
        model.zero_grad(set_to_none=True)
        kfac = KFAC(model, KFACConfig(fisher=fisher))
        kfac.begin_step(0)
        out = model(x)
        kfac.fisher_backward(out)
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(out, y).backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad)
        assert kfac.layers["fc"]._out_sum is not None


def test_missing_fisher_backward_is_a_clear_error() -> None:
    model = net()
    kfac = KFAC(model, KFACConfig(fisher="mc"))
    kfac.begin_step(0)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="fisher_backward"):
        kfac.step(0.1)


# -- data parallel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["emp", "mc"])
def test_factors_leave_during_the_last_micro_batch(fisher: str) -> None:
    """Overlap: nothing is sent while statistics still accumulate; on the last micro-batch every
    layer's bucket (one per layer here) is launched before ``step``: emp during backward, mc
    right after ``fisher_backward``."""
    base = net()

    def rank(comm: ThreadComm) -> list[tuple[int, int, int]]:
        model = copy.deepcopy(base)
        kfac = KFAC(model, KFACConfig(fisher=fisher, bucket_mb=1e-6), comm)
        assert kfac.comm is comm  # the world communicator: one issue order with the gradient buckets

        def sent() -> int:
            counts = comm.counters.snapshot()
            return counts["kfac.factors"].calls if "kfac.factors" in counts else 0

        seen = []
        kfac.begin_step(0, micro_batches=2)
        for x, y in [data(4, seed=comm.rank), data(4, seed=2 + comm.rank)]:
            out = model(x)
            kfac.fisher_backward(out)
            after_fisher = sent()
            (F.cross_entropy(out, y) / 2).backward()
            seen.append((after_fisher, sent()))
        kfac.step(0.1)
        seen.append((sent(), sent()))
        return seen

    layers = 4  # conv, bn, fc, out
    for seen in ThreadWorld(2).run(rank):
        last = (layers, layers) if fisher == "mc" else (0, layers)
        assert seen == [(0, 0), last, (layers, layers)]



@pytest.mark.parametrize("share", ["inverses", "gradients"])
def test_stats_report_what_the_kfac_collectives_really_moved(share: str) -> None:
    """metrics.csv's kfac_comm_* fields are the communicator's counters of the K-FAC call sites: after a
    refresh step every rank received data (the other owner's factors and share), and received - data is
    only the exchanged lengths (8 bytes a rank per length exchange), never padding."""
    base = net()

    def rank(comm: ThreadComm) -> tuple[dict[str, float], int, int]:
        model = copy.deepcopy(base)
        kfac = KFAC(model, KFACConfig(share=share), comm)
        kfac.begin_step(0)
        x, y = data(4, seed=comm.rank)
        out = model(x)
        kfac.fisher_backward(out)
        F.cross_entropy(out, y).backward()
        kfac.step(0.1)
        counts = {k: v for k, v in comm.counters.snapshot().items() if k.startswith("kfac.")}
        return kfac.stats, sum(c.received for c in counts.values()), sum(c.data for c in counts.values())

    for stats, received, data_bytes in ThreadWorld(2).run(rank):
        assert stats["kfac_comm_received"] == received and stats["kfac_comm_received_data"] == data_bytes
        assert data_bytes > 0 and stats["kfac_comm_sent"] > 0
        assert 0 <= received - data_bytes <= 8 * 2 * 2  # at most two length exchanges of 2 ranks

def test_more_micro_batches_than_announced_is_a_clear_error() -> None:
    model = net()
    kfac = KFAC(model, KFACConfig())
    kfac.begin_step(0)
    x, y = data()
    kfac.fisher_backward(model(x))
    with pytest.raises(RuntimeError, match="micro_batches"):
        kfac.fisher_backward(model(x))
    with pytest.raises(ValueError, match="micro_batches=0"):
        kfac.begin_step(1, micro_batches=0)


def test_data_parallel_equals_one_rank_on_the_global_batch() -> None:
    base = net(bn=False)
    x, y = data(8)
    single = copy.deepcopy(base)
    cfg = KFACConfig(damping=0.1)  # well conditioned: the comparison is about data, not round-off
    k1 = KFAC(single, cfg)
    train_step(single, k1, 0, [(x, y)])

    models = [copy.deepcopy(base) for _ in range(2)]

    def rank(comm: ThreadComm) -> dict[str, object] | None:
        r = comm.rank
        m, k = models[r], KFAC(models[r], cfg, comm)
        m.zero_grad(set_to_none=True)
        k.begin_step(0)
        xs, ys = x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]
        k.fisher_backward(out := m(xs))
        F.cross_entropy(out, ys).backward()
        for p in m.parameters():  # the trainer's data-parallel gradient averaging
            comm.allreduce(p.grad)
        k.step(0.1)
        return k.state_dict()  # collective: gathers each owner's factors to rank 0

    state, other = ThreadWorld(2).run(rank)
    assert state is not None and other is None
    gathered = KFAC(copy.deepcopy(base), cfg)
    gathered.load_state_dict(state)
    assert_factors_close(gathered, k1)
    for m in models:
        for p, q in zip(m.parameters(), single.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


# -- layer selection ----------------------------------------------------------------------------------
def test_skip_patterns_and_batchnorm_switch() -> None:
    model = net()
    kfac = KFAC(model, KFACConfig(skip=["f*"], batchnorm=False))
    assert list(kfac.layers) == ["conv", "out"]
    x, y = data()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    train_step(model, kfac, 0, [(x, y)])
    for name in ("fc.weight", "fc.bias", "bn.weight", "bn.bias"):
        assert torch.equal(model.get_parameter(name).grad, ref.get_parameter(name).grad)
    assert not torch.allclose(model.conv.weight.grad, ref.conv.weight.grad)
    assert kfac.stats["kfac_layers"] == 2


@pytest.mark.parametrize("conv,match", [(nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                                        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode")])
def test_unsupported_convolutions_are_refused_by_name(conv: nn.Module, match: str) -> None:
    model = nn.Sequential(OrderedDict(body=conv))
    with pytest.raises(ValueError, match=f"'body'.*{match}.*kfac.skip"):
        KFAC(model, KFACConfig())
    assert KFAC(model, KFACConfig(skip=["body"])).layers == {}


# -- failures -----------------------------------------------------------------------------------------
def test_nonfinite_factors_skip_the_layer_and_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    """A huge input feature with a zero weight column: layer 0's A overflows, its output does not."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    kfac = KFAC(model, KFACConfig(stat_decay=0.5, kl_clip=0.0))  # a clip would scale by layer 0's inf update
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    train_step(model, kfac, 0, [(x, y)])
    before = {n: [t.clone() for t in fs] for n, fs in factors(kfac).items()}
    bad = x.clone()
    bad[:, 0] = 1e200
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            train_step(model, kfac, step, [(bad, y.roll(1))])
    assert kfac.stats["kfac_nan_skips"] == 2
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 2 and all(m.startswith("K-FAC: layer 0 had non-finite factors") for m in warned)  # each time
    assert all(torch.equal(s, t) for s, t in zip(factors(kfac)["0"], before["0"]))
    assert not torch.equal(factors(kfac)["2"][1], before["2"][1])  # G moved with the new labels
    assert kfac.stats["kfac_layers"] == 2  # layer 0 still preconditioned with its last inverse
    assert all(torch.isfinite(p.grad).all() for p in model[2].parameters())


def test_cholesky_retries_in_float64_then_with_more_damping() -> None:
    # Rank one and exact in float32, where 1 + 1e-9 == 1: singular in float32, positive definite in float64.
    v = torch.tensor([1.0, 2.0, 3.0])
    M = torch.outer(v, v).float()
    M_inv, retries = cholesky_inverse(M, torch.tensor(1e-9, dtype=torch.float32))
    assert retries == Retries(fp64=1, damping=0)
    assert M_inv.dtype == torch.float32
    torch.testing.assert_close(M_inv, torch.linalg.inv(M.double() + 1e-9 * torch.eye(3)).float())
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -0.5]))
    inv, retries = cholesky_inverse(indefinite, torch.tensor(0.01))
    assert retries == Retries(fp64=0, damping=2)  # float64 input: no precision retry; 0.01 -> 1.0
    torch.testing.assert_close(inv, torch.linalg.inv(indefinite + torch.eye(3)))


def test_inverse_retries_are_counted_in_stats() -> None:
    model = nn.Sequential(nn.Linear(2, 3))
    kfac = KFAC(model, KFACConfig(factor_interval=10, inverse_interval=10, damping=1e-4))
    state = kfac.state_dict()
    state["layers"]["0"] = {"factors": [torch.diag(torch.tensor([1.0, 1.0, -0.5])), torch.eye(3)],
                            "inverse": None}
    kfac.load_state_dict(state)
    train_step(model, kfac, 1, [(torch.randn(4, 2), torch.randint(0, 3, (4,)))])
    assert kfac.stats["kfac_damping_retries"] > 0
    assert kfac.stats["kfac_inverse_updates"] == 1 and kfac.stats["kfac_factor_updates"] == 0


# -- schedule, resume, clipping -------------------------------------------------------------------------
def test_factor_and_inverse_intervals() -> None:
    model = net()
    kfac = KFAC(model, KFACConfig(factor_interval=2, inverse_interval=4))
    seen = []
    for step in range(8):
        before = kfac.stats
        train_step(model, kfac, step, [data(seed=step)])
        after = kfac.stats
        seen.append((after["kfac_factor_updates"] - before["kfac_factor_updates"],
                     after["kfac_inverse_updates"] - before["kfac_inverse_updates"], after["kfac_layers"]))
    assert seen == [(1, 1, 4), (0, 0, 4), (1, 0, 4), (0, 0, 4), (1, 1, 4), (0, 0, 4), (1, 0, 4), (0, 0, 4)]


def test_resume_equals_uninterrupted() -> None:
    cfg = KFACConfig(factor_interval=1, inverse_interval=2, stat_decay=0.8, kl_clip=1e-2)

    def make(model: nn.Module) -> tuple[KFAC, torch.optim.Optimizer]:
        return KFAC(model, cfg), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def run(model: nn.Module, kfac: KFAC, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            train_step(model, kfac, step, [data(seed=step)], lr=0.1)
            opt.step()

    model = net()
    kfac, opt = make(model)
    run(model, kfac, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kfac": kfac.state_dict()}, buf)
    run(model, kfac, opt, range(3, 6))

    buf.seek(0)
    saved = torch.load(buf)
    resumed = net()
    resumed.load_state_dict(saved["model"])
    kfac2, opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    kfac2.load_state_dict(saved["kfac"])
    run(resumed, kfac2, opt2, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert kfac.stats == kfac2.stats


def test_load_state_dict_refuses_other_layers() -> None:
    state = KFAC(net(), KFACConfig()).state_dict()
    with pytest.raises(ValueError, match="only in checkpoint: \\['bn'\\]"):
        KFAC(net(), KFACConfig(batchnorm=False)).load_state_dict(state)


def test_kl_clip_bounds_the_update() -> None:
    lr, kl = 0.5, 1e-4
    x, y = data()
    runs = {}
    for clip in (0.0, kl, 1e6):
        torch.manual_seed(0)
        model = net()
        F.cross_entropy(model(x), y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        kfac = KFAC(model, KFACConfig(kl_clip=clip))
        train_step(model, kfac, 0, [(x, y)], lr=lr)
        vg = sum((p.grad * g).sum() for p, g in zip(model.parameters(), raw))
        runs[clip] = ([p.grad.clone() for p in model.parameters()], float(vg), kfac.stats["kfac_kl_scale"])
    unclipped, vg0, _ = runs[0.0]
    _, vg, scale = runs[kl]
    assert lr ** 2 * vg0 > kl  # the bound is active...
    # ...and met with equality by the quadratic KL estimate lr^2 (nu p)^T F (nu p) = lr^2 nu <nu p, g>
    assert scale < 1 and lr ** 2 * scale * vg == pytest.approx(kl, rel=1e-9)
    loose, _, scale = runs[1e6]
    assert scale == 1.0 and all(torch.equal(a, b) for a, b in zip(loose, unclipped))
