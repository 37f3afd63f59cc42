"""ResNets: ImageNet (18/34/50/101, torchvision "v1.5") and CIFAR-style (6n+2) variants.

Module and parameter names follow torchvision (``conv1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``) so K-FAC skip patterns stay readable and ImageNet state dicts
are interchangeable with torchvision's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first one carries the stride."""

    expansion: ClassVar[int] = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; the stride sits on the 3x3 conv ("v1.5", +~0.5% top-1)."""

    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A stem, one ``layerN`` stage per entry of ``widths``, global average pooling and ``fc``.

    ``imagenet_stem`` selects the 7x7/2 conv + 3x3/2 max-pool stem (4x downsampling, for 224 px);
    otherwise a 3x3/1 conv keeps the resolution of small images (CIFAR, 28 px MNIST) and
    ``maxpool`` is an identity. Shortcuts that change shape are 1x1 conv + BN projections in both
    variants (He et al.'s option B), so every parametrised layer is a conv, BN or linear that
    K-FAC can precondition.

    ``dropout`` > 0 puts an ``nn.Dropout`` (no parameters) on the pooled features before ``fc``:
    MC-dropout's one stochastic layer (``spngd evaluate`` samples its masks). At 0
    there is no dropout module at all, so the module list and the state dict are those of the
    plain network, and state dicts load across dropout rates.
    """

    def __init__(self, block: Block, layers: list[int], widths: list[int], num_classes: int,
                 in_channels: int = 3, imagenet_stem: bool = True,
                 zero_init_residual: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"resnet: {len(layers)} stage depths for {len(widths)} stage widths")
        self._in_planes = widths[0]
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3,
                                   bias=False)
        else:
            self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                                   if imagenet_stem else nn.Identity())
        for i, (depth, width) in enumerate(zip(layers, widths)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, width, depth,
                                                              stride=1 if i == 0 else 2))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, depth: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_planes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self._in_planes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self._in_planes, planes, stride, downsample)]
        self._in_planes = planes * block.expansion
        blocks += [block(self._in_planes, planes) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Residual branches start at zero, which steadies large-batch warmup (Goyal et al.).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x if self.dropout is None else self.dropout(x))


_IMAGENET: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
_CIFAR_DEPTHS: dict[str, int] = {"cifar_resnet8": 8, "cifar_resnet20": 20, "cifar_resnet32": 32,
                                 "cifar_resnet56": 56}
ARCHS: tuple[str, ...] = (*_IMAGENET, *_CIFAR_DEPTHS)


def resnet(arch: str, num_classes: int, in_channels: int = 3,
           zero_init_residual: bool = False, dropout: float = 0.0) -> ResNet:
    """The network called ``arch`` (one of ``ARCHS``), with dropout rate ``dropout`` before ``fc``."""
    if arch in _IMAGENET:
        block, layers = _IMAGENET[arch]
        return ResNet(block, layers, [64, 128, 256, 512], num_classes, in_channels,
                      imagenet_stem=True, zero_init_residual=zero_init_residual, dropout=dropout)
    if arch in _CIFAR_DEPTHS:
        n = (_CIFAR_DEPTHS[arch] - 2) // 6
        return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels,
                      imagenet_stem=False, zero_init_residual=zero_init_residual, dropout=dropout)
    raise ValueError(f"model: unknown arch {arch!r} (known: {', '.join(ARCHS)})")
