"""Weight posteriors: what a run leaves behind to sample from, and the one way every caller samples.

A ``Posterior`` draws weights for the model's parameters by name. Training (VOGN, noisy K-FAC, IVON),
``spngd evaluate`` and users (``sampled_params``) all go through the same ``sampled_params`` context,
so a sample means the same thing everywhere. ``export()`` gives plain data (tensors, strings) that
``torch.save`` writes into checkpoints and ``posterior.pt``; ``from_export`` reads it back.

Kinds:

* ``point`` - a deterministic model (SGD, Adam, averaged SGD): the weights the model holds; S = 1.
* ``dropout`` - MC-dropout: the weights the model holds, with its dropout layers sampling masks.
* ``gaussian`` - mean-field N(mean, std^2) per parameter (VOGN, IVON); parameters it does not name
  keep the model's values.
* ``ensemble`` - a finite set of weight snapshots (SGLD's chain), drawn uniformly.
* ``matrix_normal`` - added by noisy K-FAC (``app.bayes.noisy_kfac``).

Random numbers come only from the ``torch.Generator`` the caller passes (``generator_for``), never
from torch's global stream, so a sample depends on (seed, indices) and not on the rank layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from app.storage import write_atomic

KINDS: dict[str, Callable[[Mapping[str, Any]], Posterior]] = {}


def generator_for(device: torch.device | str, seed: int, *index: int) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, *index) by NumPy's SeedSequence: independent
    streams for distinct indices (e.g. (seed, step, sample)), the same on every rank and layout."""
    state = np.random.SeedSequence([seed, *index]).generate_state(2, np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


class Posterior(ABC):
    """A distribution over some of a model's parameters, by ``named_parameters`` name."""

    kind: ClassVar[str]
    stochastic: ClassVar[bool] = True  # False: every draw is the same, so S = 1 suffices
    global_stream: ClassVar[bool] = False  # True: the model's own layers draw (dropout masks)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls.from_data

    @abstractmethod
    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        """One sample: a tensor per parameter name it covers (others keep the model's values)."""

    @abstractmethod
    def data(self) -> dict[str, Any]:
        """Plain data for ``from_data`` (without the kind)."""

    @classmethod
    @abstractmethod
    def from_data(cls, data: Mapping[str, Any]) -> Posterior:
        """The posterior ``data()`` described."""

    def export(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.data()}

    def prepare(self, model: nn.Module) -> None:  # noqa: B027 - a hook, by default nothing to prepare
        """Called with the model inside ``sampled_params`` before drawing (dropout turns masks on)."""


def from_export(data: Mapping[str, Any]) -> Posterior:
    """The posterior an ``export()`` (a checkpoint's ``posterior`` entry, a ``posterior.pt``) holds."""
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind not in KINDS:
        raise ValueError(f"posterior: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind](data)


class Point(Posterior):
    kind = "point"
    stochastic = False

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {}

    def data(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Posterior:
        return cls()


class Dropout(Point):
    """MC-dropout: every draw samples fresh masks in the model's dropout layers (BatchNorm stays in the
    mode the caller chose). Masks come from torch's global stream, which the caller seeds per sample
    (``sampled_params`` does, from its generator)."""

    kind = "dropout"
    stochastic = True
    global_stream = True

    def prepare(self, model: nn.Module) -> None:  # noqa: B027 - a hook, by default nothing to prepare
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()


class Gaussian(Posterior):
    """Mean-field N(mean, std^2) over the named parameters."""

    kind = "gaussian"

    def __init__(self, mean: Mapping[str, Tensor], std: Mapping[str, Tensor]) -> None:
        if mean.keys() != std.keys():
            raise ValueError("posterior: gaussian mean and std name different parameters")
        self.mean, self.std = dict(mean), dict(std)

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {k: torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype).mul_(self.std[k]).add_(m)
                for k, m in self.mean.items()}

    def data(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Posterior:
        return cls(data["mean"], data["std"])


class Ensemble(Posterior):
    """Equally weighted weight snapshots; a draw picks one with the generator."""

    kind = "ensemble"

    def __init__(self, members: list[dict[str, Tensor]]) -> None:
        if not members:
            raise ValueError("posterior: an ensemble needs at least one member")
        self.members = members

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        pick = int(torch.randint(len(self.members), (1,), generator=generator, device=generator.device))
        return self.members[pick]

    def data(self) -> dict[str, Any]:
        return {"members": self.members}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Posterior:
        return cls(list(data["members"]))


@contextmanager
def sampled_params(model: nn.Module, posterior: Posterior, generator: torch.Generator) -> Iterator[None]:
    """Within the block the model's parameters hold one draw of ``posterior``; on exit they are put
    back exactly (gradients computed inside stay in ``.grad``, taken at the sample, as VOGN needs).

    Dropout masks (``Dropout``) draw from torch's global stream; it is seeded from ``generator`` for
    the block and restored after, so the sample still depends only on the generator.
    """
    params = dict(model.named_parameters())
    sample = posterior.draw(generator)
    unknown = [k for k in sample if k not in params]
    if unknown:
        raise ValueError(f"posterior: names a parameter the model does not have: {unknown[0]}")
    modes = {m: m.training for m in model.modules()}
    kept = {k: params[k].detach().clone() for k in sample}
    rng = torch.random.get_rng_state() if posterior.global_stream else None
    if rng is not None:
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
    try:
        with torch.no_grad():
            for k, value in sample.items():
                params[k].copy_(value)
        posterior.prepare(model)
        yield
    finally:
        with torch.no_grad():
            for k, value in kept.items():
                params[k].copy_(value)
        for m, mode in modes.items():
            m.training = mode
        if rng is not None:
            torch.random.set_rng_state(rng)


def save(posterior: Posterior, path: Any) -> None:
    """``posterior.pt``: the export, loadable with ``torch.load(path, weights_only=True)``."""
    write_atomic(path, lambda f: torch.save(posterior.export(), f))


def load(path: Any, map_location: str | torch.device = "cpu") -> Posterior:
    """The posterior a ``save`` wrote."""
    return from_export(torch.load(path, map_location=map_location, weights_only=True))
