"""A plain small CNN for the curvature study (issue 13): ``depth`` blocks of a 3x3 convolution
(padding 1, ``width`` channels, bias) and a ReLU, a 2x2 max-pool after every second block while the
feature map is still at least 2x2, global average pooling and a Linear classifier ``fc``.

No BatchNorm, for the reason given in ``app/models/mlp.py`` (the plain parametrisation; BN networks
are the ``cifar_resnet*`` models). Where the pools go depends on the input's height and width, so the
network is built for one input shape: on 8x8 digits with depth 4 the pools follow blocks 2 and 4
(8 -> 4 -> 2); on a 1 x d strip (a Gaussian mixture whose dimension is not a square) there is none.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 2


class SmallCNN(nn.Module):
    """``conv1 .. conv<depth>`` (He-normal weights, zero biases), ``pool_after`` (the 1-based blocks a
    max-pool follows), an optional ``dropout`` on the pooled features (no module at rate 0) and ``fc``."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = DEFAULT_WIDTH,
                 depth: int = DEFAULT_DEPTH, dropout: float = 0.0) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"model: cnn needs width and depth >= 1 (got width={width}, depth={depth})")
        channels, h, w = input_shape
        pools = []
        for i in range(depth):
            conv = nn.Conv2d(channels if i == 0 else width, width, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # typed optional; bias=True made it
            self.add_module(f"conv{i + 1}", conv)
            if i % 2 == 1 and min(h, w) >= 2:
                pools.append(i + 1)
                h, w = h // 2, w // 2
        self.depth, self.pool_after = depth, tuple(pools)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = torch.relu(getattr(self, f"conv{i}")(x))
            if i in self.pool_after:
                x = nn.functional.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3))
        return self.fc(x if self.dropout is None else self.dropout(x))
