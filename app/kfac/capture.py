"""Hooks that feed layer inputs and output gradients to the per-layer statistics.

One forward hook per layer records the module *input* (never the output, which an in-place ReLU
may overwrite). Output gradients are taken at the output's autograd edge as it was when the
module returned, so later in-place ops do not change what is seen:

* ``emp``: a tensor hook on the output fires during the user's ``loss.backward()``.
* ``mc``/``exact``: the output's ``GradientEdge`` is kept and ``torch.autograd.grad`` is called on
  the sampled losses w.r.t. those edges (``retain_graph=True``), so ``.grad`` is never touched and
  no weight gradients are computed.

Hooks do nothing unless ``armed``, the layer is ``due`` (its factors are refreshed this step) and
the output requires grad (no-grad validation forwards).

**Completion** (emp): during the step's last backward (``final``), a layer whose output-gradient
hooks have all fired has its final statistics; ``on_complete(layer)`` is called right then, so
its factors can travel while backward goes on through the layers below.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from app.kfac.factors import Layer


class Capture:
    def __init__(self, layers: Iterable[Layer], hooked_backward: bool,
                 on_complete: Callable[[Layer], None]) -> None:
        """``hooked_backward``: take G from the user's backward (emp) instead of from ``backward``."""
        self.armed = False
        self.final = False
        self._hooked_backward = hooked_backward
        self._on_complete = on_complete
        self._outstanding: Counter[Layer] = Counter()  # output-gradient hooks registered, not fired yet
        self._pending: list[tuple[Layer, GradientEdge, Any]] = []
        self._handles = [layer.module.register_forward_hook(partial(self._forward_hook, layer))
                         for layer in layers]

    def _forward_hook(self, layer: Layer, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if not (self.armed and layer.due and output.requires_grad):
            return
        ctx = layer.add_input(inputs[0])
        if self._hooked_backward:
            self._outstanding[layer] += 1
            output.register_hook(partial(self._hooked_grad, layer, ctx))
        else:
            self._pending.append((layer, get_gradient_edge(output), ctx))

    def backward(self, losses: Iterable[Tensor]) -> None:
        """Feed the gradients of each loss w.r.t. the outputs recorded since the last call."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        edges = [edge for _, edge, _ in pending]
        for loss in losses:
            grads = torch.autograd.grad(loss, edges, retain_graph=True, allow_unused=True)
            for (layer, _, ctx), g in zip(pending, grads):
                if g is not None:
                    layer.add_output_grad(g, ctx)

    def _hooked_grad(self, layer: Layer, ctx: Any, g: Tensor) -> None:
        layer.add_output_grad(g, ctx)
        self._outstanding[layer] -= 1
        if self.final and self._outstanding[layer] == 0:
            self._on_complete(layer)

    def clear(self) -> None:
        self._pending = []
        self._outstanding.clear()
        self.final = False

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()

