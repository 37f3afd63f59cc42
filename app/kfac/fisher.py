"""Label sources for G under softmax cross-entropy.

``emp`` uses the true labels through the user's own backward, so it needs no loss here. ``mc`` and
``exact`` build sum-reduced losses whose gradient w.r.t. a layer output is the per-example
``g_i`` (G then divides by N, see ``factors``):

* ``mc``: one label per example drawn from the model's softmax with the caller's generator (K-FAC
  owns one per rank and checkpoints it: torch's global RNG is also drawn from by e.g. every
  DataLoader iterator, so it could not make a resumed run exact); an unbiased estimate of ``exact``.
* ``exact``: one loss per class c, each example weighted by ``sqrt(p_ic)`` (no gradient through p), so
  the captured outer products sum to ``E_{y~p}[g g^T]``; C extra backwards, for small class counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_losses(logits: Tensor, fisher: str, generator: torch.Generator) -> Iterator[Tensor]:
    """The losses to differentiate for ``fisher`` in {mc, exact}; logits are (N, classes).
    ``generator`` (on the logits' device) draws the mc labels."""
    if logits.dim() != 2:
        raise ValueError(f"K-FAC: fisher={fisher} needs (batch, classes) logits, got shape {tuple(logits.shape)}")
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    if fisher == "mc":
        with torch.no_grad():
            y = torch.multinomial(logp.exp(), 1, generator=generator)
        yield -logp.gather(1, y).sum()
    elif fisher == "exact":
        weights = logp.detach().exp().sqrt()
        for c in range(logits.shape[1]):
            yield -(weights[:, c] * logp[:, c]).sum()
    else:
        raise ValueError(f"K-FAC: fisher={fisher!r} has no sampled loss (known: mc, exact)")
