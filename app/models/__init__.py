"""Model construction from ``ModelConfig`` (torchvision cannot be imported here, so the ResNets are ours)."""

from __future__ import annotations

import torch
from torch import nn

from app.config import ModelConfig
from app.models import cnn, mlp
from app.models.cnn import SmallCNN
from app.models.mlp import MLP
from app.models.resnet import ARCHS, BasicBlock, Bottleneck, ResNet, resnet

__all__ = ["ARCHS", "MLP", "BasicBlock", "Bottleneck", "ResNet", "SmallCNN", "build_model", "resnet"]


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int] = (3, 224, 224)) -> nn.Module:
    """The configured network on the CPU, in float32, in train mode, for inputs of ``input_shape``
    (channels, height, width: ``DatasetInfo.input_shape``). The ResNets read only the channels; the
    MLP's first layer and the CNN's pools are sized from all three.

    ``num_classes`` is the dataset's class count; ``cfg.num_classes`` overrides it when > 0 (it
    may only be larger, or labels would fall outside the logits). With ``cfg.channels_last`` the
    parameters are converted here; the caller still converts inputs (``x.to(memory_format=
    torch.channels_last)``), and moving the model to a device or dtype afterwards keeps the format.
    ``cfg.dropout`` > 0 adds MC-dropout's layer before the classifier. ``cfg.width``/``cfg.depth``
    of 0 take the arch's defaults (mlp 128 x 2, cnn 32 x 2).
    """
    if num_classes < 1:
        raise ValueError(f"model: the dataset has {num_classes} classes; need at least 1")
    if cfg.num_classes and cfg.num_classes < num_classes:
        raise ValueError(f"model: model.num_classes={cfg.num_classes} is smaller than the dataset's "
                         f"{num_classes} classes")
    classes = cfg.num_classes or num_classes
    model: nn.Module
    if cfg.arch == "mlp":
        model = MLP(input_shape, classes, cfg.width or mlp.DEFAULT_WIDTH, cfg.depth or mlp.DEFAULT_DEPTH,
                    cfg.dropout)
    elif cfg.arch == "cnn":
        model = SmallCNN(input_shape, classes, cfg.width or cnn.DEFAULT_WIDTH, cfg.depth or cnn.DEFAULT_DEPTH,
                         cfg.dropout)
    else:
        model = resnet(cfg.arch, classes, input_shape[0], cfg.zero_init_residual, cfg.dropout)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
