"""The Bayesian optimisers behind ``optim.name`` vogn, noisy_kfac, sgld and ivon.

Each is a ``torch.optim.Optimizer`` (so the LR schedule, checkpoints and ``spngd bench`` treat it
like SGD) with, beyond ``step()``:

* ``posterior() -> Posterior`` - the distribution the run ends with (checkpoint, ``posterior.pt``,
  ``spngd evaluate``); local: every rank holds all of it, so only the writer builds it;
* ``sampled_params(generator)`` - a context in which the parameters hold one weight sample, for the
  forward/backward of a step (vogn, noisy_kfac, ivon; SGLD's noise is in its step instead);
* ``reduces_gradients`` - True when ``step()`` averages the gradients over the ranks itself (VOGN:
  gradients and squared gradients in one collective), so the trainer adds no ``GradientAverager``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from app.bayes.posterior import Posterior
from app.comm import Comm
from app.config import Config
from app.optim import peak_lr


@runtime_checkable
class Sampling(Protocol):
    """An optimiser whose forward/backward run at sampled weights."""

    def sampled_params(self, generator: torch.Generator) -> AbstractContextManager[None]: ...

    def posterior(self) -> Posterior: ...


def dataset_size(cfg: Config, train_images: int) -> float:
    """N_eff: the training images times ``bayes.augmentation``, the N of the prior's weight 1/N."""
    return train_images * cfg.bayes.augmentation


def build_bayes_optimizer(model: nn.Module, cfg: Config, comm: Comm, *, train_images: int, global_batch: int,
                          steps_per_epoch: int, total_steps: int, kfac: object | None = None) -> torch.optim.Optimizer:
    """The configured Bayesian optimiser at the (scaled) peak lr; the schedule then owns ``lr``."""
    lr = peak_lr(cfg.optim, global_batch)
    n_eff = dataset_size(cfg, train_images)
    name = cfg.optim.name
    if name == "vogn":
        from app.bayes.vogn import VOGN

        return VOGN(model, comm, lr=lr, bayes=cfg.bayes, dataset_size=n_eff, momentum=cfg.optim.betas[0],
                    kl_warmup_steps=round(cfg.bayes.kl_warmup_epochs * steps_per_epoch))
    if name == "noisy_kfac":
        from app.bayes.noisy_kfac import NoisyKFAC
        from app.kfac import KFAC

        if not isinstance(kfac, KFAC):
            raise ValueError("noisy_kfac needs the run's KFAC preconditioner")
        return NoisyKFAC(model, kfac, lr=lr, bayes=cfg.bayes, dataset_size=n_eff, momentum=cfg.optim.betas[0],
                         kl_warmup_steps=round(cfg.bayes.kl_warmup_epochs * steps_per_epoch))
    if name == "sgld":
        from app.bayes.sgld import SGLD

        return SGLD(model, lr=lr, bayes=cfg.bayes, dataset_size=n_eff, seed=cfg.train.seed,
                    total_steps=total_steps)
    if name == "ivon":
        from app.bayes.ivon import build_ivon

        return build_ivon(model, comm, lr=lr, bayes=cfg.bayes, dataset_size=n_eff, betas=cfg.optim.betas)
    raise ValueError(f"bayes: {name!r} is not a Bayesian optimiser")
