"""A plain multilayer perceptron for the curvature study (issue 13): ``depth`` hidden Linear + ReLU
layers of ``width`` units on the flattened input, then a Linear classifier ``fc``.

No BatchNorm, on purpose: the curvature study wants the plain parametrisation, whose Hessian and
Fisher are those of the weights alone (a BN layer makes the loss invariant to the scale of the weights
before it, which adds flat directions and couples the examples of a batch); BN networks are covered by
the ``cifar_resnet*`` models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_WIDTH = 128
DEFAULT_DEPTH = 2


class MLP(nn.Module):
    """``linear1 .. linear<depth>`` (He-normal weights for the ReLUs, zero biases), an optional
    ``dropout`` (MC-dropout, as ``ResNet``: no module at rate 0) and the classifier ``fc`` (torch's
    default initialisation). Any input shape: everything after the batch dimension is flattened."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = DEFAULT_WIDTH,
                 depth: int = DEFAULT_DEPTH, dropout: float = 0.0) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"model: mlp needs width and depth >= 1 (got width={width}, depth={depth})")
        self.depth = depth
        features = math.prod(input_shape)
        for i in range(depth):
            layer = nn.Linear(features if i == 0 else width, width)
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
            self.add_module(f"linear{i + 1}", layer)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for i in range(self.depth):
            x = torch.relu(getattr(self, f"linear{i + 1}")(x))
        return self.fc(x if self.dropout is None else self.dropout(x))
