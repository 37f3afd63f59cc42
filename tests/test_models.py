"""ResNet family: parameter counts, shapes, memory formats, initialisation, names."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from app.config import ModelConfig
from app.models import ARCHS, BasicBlock, Bottleneck, ResNet, build_model, resnet


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
    model = build_model(ModelConfig(arch=arch), num_classes=7, in_channels=1 if cifar else 3)
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
                        in_channels=1 if cifar else 3)
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
