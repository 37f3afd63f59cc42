"""Model construction from ``ModelConfig`` (torchvision cannot be imported here, so the ResNets are ours)."""

from __future__ import annotations

import torch
from torch import nn

from app.config import ModelConfig
from app.models.resnet import ARCHS, BasicBlock, Bottleneck, ResNet, resnet

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ResNet", "build_model", "resnet"]


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The configured network on the CPU, in float32, in train mode.

    ``num_classes`` is the dataset's class count; ``cfg.num_classes`` overrides it when > 0 (it
    may only be larger, or labels would fall outside the logits). With ``cfg.channels_last`` the
    parameters are converted here; the caller still converts inputs (``x.to(memory_format=
    torch.channels_last)``), and moving the model to a device or dtype afterwards keeps the format.
    ``cfg.dropout`` > 0 adds MC-dropout's layer before the classifier (``ResNet``).
    """
    if num_classes < 1:
        raise ValueError(f"model: the dataset has {num_classes} classes; need at least 1")
    if cfg.num_classes and cfg.num_classes < num_classes:
        raise ValueError(f"model: model.num_classes={cfg.num_classes} is smaller than the dataset's "
                         f"{num_classes} classes")
    model = resnet(cfg.arch, cfg.num_classes or num_classes, in_channels, cfg.zero_init_residual, cfg.dropout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
