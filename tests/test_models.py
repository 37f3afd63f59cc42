"""ResNet family and the plain MLP / CNN: parameter counts, shapes, memory formats, initialisation, names."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from app.config import ConfigError, ModelConfig, load
from app.models import ARCHS, MLP, BasicBlock, Bottleneck, ResNet, SmallCNN, build_model, resnet


@pytest.mark.parametrize("arch,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                        ("resnet50", 25_557_032), ("resnet101", 44_549_160)])
def test_imagenet_parameter_counts_match_torchvision(arch: str, count: int) -> None:
    with torch.device("meta"):  # no allocation or init: counting ResNet-101 costs nothing
        model = resnet(arch, 1000)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("arch,depth", [("cifar_resnet8", 8), ("cifar_resnet20", 20),
                                        ("cifar_resnet56", 56)])
def test_cifar_depth_is_6n_plus_2(arch: str, depth: int) -> None:
    with torch.device("meta"):
        model = resnet(arch, 10)
    weighted = [n for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in n]
    assert len(weighted) == depth
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape(arch: str) -> None:
    torch.manual_seed(0)
    cifar = arch.startswith("cifar")
    model = build_model(ModelConfig(arch=arch), num_classes=7, input_shape=(1, 16, 16) if cifar else (3, 32, 32))
    x = torch.randn(2, 1, 16, 16) if cifar else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_channels_last_forward_equals_contiguous() -> None:
    torch.manual_seed(0)
    ref = build_model(ModelConfig(arch="resnet18", zero_init_residual=False), 10).eval()
    torch.manual_seed(0)
    nhwc = build_model(ModelConfig(arch="resnet18", zero_init_residual=False, channels_last=True),
                       10).eval()
    assert isinstance(nhwc, ResNet) and nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x.to(memory_format=torch.channels_last)), ref(x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda zero: resnet("cifar_resnet8", 10, zero_init_residual=zero),
    lambda zero: resnet("resnet18", 10, zero_init_residual=zero),
    lambda zero: ResNet(Bottleneck, [2, 1], [8, 16], 10, zero_init_residual=zero),  # small Bottleneck net
], ids=["cifar", "basic", "bottleneck"])
@pytest.mark.parametrize("zero", [True, False])
def test_zero_init_residual(make: Callable[[bool], ResNet], zero: bool) -> None:
    blocks = [m for m in make(zero).modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    for b in blocks:
        assert torch.all(b.last_bn.weight == (0.0 if zero else 1.0))
        assert torch.all(b.bn1.weight == 1.0) and torch.all(b.last_bn.bias == 0.0)


def test_conv_init_is_kaiming_fan_out() -> None:
    torch.manual_seed(0)
    w = dict(resnet("resnet18", 10).named_parameters())["layer4.0.conv2.weight"]  # 512 x 512 x 3 x 3
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() / (2.0 / fan_out) ** 0.5 - 1.0) < 0.01


def test_module_names_are_stable() -> None:
    with torch.device("meta"):
        names = dict(resnet("resnet50", 10).named_modules())
    for name in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn3", "layer1.0.downsample.0",
                 "layer4.2.conv3", "fc"):
        assert name in names
    assert sum(isinstance(m, nn.Conv2d) for m in names.values()) == 53


def test_num_classes_from_config_and_errors() -> None:
    with torch.device("meta"):
        for cfg_classes, out in ((0, 10), (12, 12)):
            model = build_model(ModelConfig(arch="cifar_resnet8", num_classes=cfg_classes), 10)
            assert isinstance(model, ResNet) and model.fc.out_features == out
        with pytest.raises(ValueError, match="smaller than the dataset"):
            build_model(ModelConfig(arch="cifar_resnet8", num_classes=5), 10)
        with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
            build_model(ModelConfig(arch="vgg16"), 10)


# -- MC-dropout (model.dropout) ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "cifar_resnet8"])
def test_dropout_samples_masks_in_train_mode_only(arch: str) -> None:
    torch.manual_seed(0)
    cifar = arch.startswith("cifar")
    model = build_model(ModelConfig(arch=arch, dropout=0.5, zero_init_residual=False), 10,
                        (1, 16, 16) if cifar else (3, 16, 16))
    x = torch.randn(4, 1 if cifar else 3, 16, 16)
    model.eval()  # BatchNorm's batch statistics must not be what differs
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.dropout.train()
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)  # two masks of p = 0.5 on 512 / 64 features


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_adds_no_parameter_and_p0_no_module(arch: str) -> None:
    with torch.device("meta"):
        plain, dropped = resnet(arch, 10), resnet(arch, 10, dropout=0.3)
        zero = build_model(ModelConfig(arch=arch, dropout=0.0), 10)
    assert [(n, p.shape) for n, p in plain.named_parameters()] == \
        [(n, p.shape) for n, p in dropped.named_parameters()]
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert [n for n, _ in zero.named_modules()] == [n for n, _ in plain.named_modules()]
    assert not any(isinstance(m, nn.Dropout) for m in zero.modules())
    assert [(n, type(m)) for n, m in dropped.named_modules() if isinstance(m, nn.Dropout)] == [("dropout", nn.Dropout)]


def test_dropout_state_dicts_are_interchangeable() -> None:
    torch.manual_seed(0)
    plain = resnet("cifar_resnet8", 10, in_channels=1).eval()
    dropped = resnet("cifar_resnet8", 10, in_channels=1, dropout=0.2).eval()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # eval mode: dropout is the identity


# -- plain MLP and CNN (model.arch mlp / cnn) -----------------------------------------------------------
def mlp_params(inputs: int, width: int, depth: int, classes: int) -> int:
    return inputs * width + width + (depth - 1) * (width * width + width) + width * classes + classes


def cnn_params(channels: int, width: int, depth: int, classes: int) -> int:
    return 9 * channels * width + width + (depth - 1) * (9 * width * width + width) + width * classes + classes


@pytest.mark.parametrize(("width", "depth"), [(0, 0), (16, 1), (8, 3), (5, 7)])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 6), (1, 1, 50)])
def test_mlp_and_cnn_sizes_follow_width_and_depth(width: int, depth: int, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, *shape)
    for arch, count, default in (("mlp", mlp_params, (128, 2)), ("cnn", cnn_params, (32, 2))):
        model = build_model(ModelConfig(arch=arch, width=width, depth=depth), 7, shape)
        w, d = width or default[0], depth or default[1]
        inputs = shape[0] * shape[1] * shape[2] if arch == "mlp" else shape[0]
        assert sum(p.numel() for p in model.parameters()) == count(inputs, w, d, 7), arch
        layer = "linear" if arch == "mlp" else "conv"
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert names == [f"{layer}{i}" for i in range(1, d + 1)] + ["fc"]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        out = model(x)
        assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(("shape", "depth", "pools"), [
    ((1, 8, 8), 1, ()), ((1, 8, 8), 2, (2,)), ((1, 8, 8), 4, (2, 4)), ((1, 8, 8), 8, (2, 4, 6)),
    ((1, 1, 64), 4, ()), ((3, 3, 9), 5, (2,)),
])
def test_cnn_pools_after_every_second_block_while_the_map_is_2x2(shape: tuple[int, int, int], depth: int,
                                                                  pools: tuple[int, ...]) -> None:
    model = SmallCNN(shape, 10, width=4, depth=depth)
    assert model.pool_after == pools
    sizes = []
    for i in range(1, depth + 1):
        getattr(model, f"conv{i}").register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[2:])))
    model(torch.randn(2, *shape))
    h, w = shape[1:]
    for i, size in enumerate(sizes, start=1):
        assert size == (h, w)
        if i in pools:
            h, w = h // 2, w // 2


def test_plain_nets_dropout_and_init() -> None:
    torch.manual_seed(0)
    for make in (lambda p: MLP((1, 8, 8), 10, 256, 2, p), lambda p: SmallCNN((1, 8, 8), 10, 64, 2, p)):
        assert make(0.0).dropout is None
        dropped = make(0.5)
        assert isinstance(dropped.dropout, nn.Dropout)
        assert dropped.state_dict().keys() == make(0.0).state_dict().keys()
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            dropped.eval()
            assert torch.equal(dropped(x), dropped(x))
            dropped.train()
            assert not torch.equal(dropped(x), dropped(x))
    hidden = MLP((1, 32, 32), 10, 512, 2).linear2.weight  # He-normal for the ReLUs: std sqrt(2 / fan_in)
    assert abs(hidden.std().item() / (2 / 512) ** 0.5 - 1) < 0.01 and not MLP((4,), 2).linear1.bias.any()


def test_cnn_channels_last_forward_equals_contiguous() -> None:
    torch.manual_seed(0)
    ref = build_model(ModelConfig(arch="cnn", depth=4), 10, (1, 8, 8))
    torch.manual_seed(0)
    nhwc = build_model(ModelConfig(arch="cnn", depth=4, channels_last=True), 10, (1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x.to(memory_format=torch.channels_last)), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.width=-1"], "model.width=-1 is out of range"),
    (["model.depth=-2", "model.arch=mlp"], "model.depth=-2 is out of range"),
    (["model.width=64"], "model.arch=resnet50 has a fixed shape"),
    (["model.arch=cifar_resnet8", "model.depth=3"], "apply to mlp and cnn only"),
    (["model.arch=vgg"], "model.arch='vgg' is not one of"),
])
def test_bad_model_keys_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load(None, overrides)
    assert "\n" not in str(err.value)
