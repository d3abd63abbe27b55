"""Fish: gradient matching by a first-order inner loop (Shi et al., ICLR 2022), DomainBed's ``Fish``.

Per step: a copy of the network takes one optimiser step on each source domain's minibatch in turn;
the network then moves a fraction ``meta_lr`` of the way to the copy:

    theta~ <- theta;  for each domain k: theta~ <- Opt(theta~, grad CE(f_theta~(x_k), y_k))
    theta  <- theta + meta_lr * (theta~ - theta)

(to first order, this ascends the inner product of the domains' gradients). Follows ``Fish.update``
and ``Fish.fish`` (``domainbed/algorithms.py``): the inner optimiser is an Adam (here: the
``optimizer`` factory, default ``Adam(lr=5e-5)``) whose state carries over from step to step, the
domains in their fixed order, the interpolation applied to the whole state (parameters and
floating-point buffers such as BatchNorm running statistics; integer buffers are taken from the
copy); ``meta_lr`` = 0.5 (search {0.05, 0.1, 0.5}). The outer network has no optimiser of its own,
as in DomainBed.

In Lightning: manual optimisation; the copy is the network itself (its weights are saved before the
inner loop and interpolated after, equivalent to DomainBed's clone, with the inner Adam state
persisting in the one optimiser). Lightning's ``global_step`` counts optimiser steps: one per source
domain per batch; the schedules here are in epochs, unaffected. The logged ``loss`` is the mean of
the inner losses (DomainBed reports the last domain's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import ManualUpdates, domain_minibatches


def floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point parameters and buffers (DomainBed's ``state_dict`` arithmetic)."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if torch.is_floating_point(v)}


@torch.no_grad()
def fish_interpolate(module: nn.Module, meta: dict[str, torch.Tensor], meta_lr: float) -> None:
    """``theta <- meta + meta_lr * (theta - meta)`` in place, for every entry of ``meta``."""
    for k, v in floating_state(module).items():
        if k in meta:
            v.copy_(meta[k] + meta_lr * (v - meta[k]))


class Fish(ManualUpdates, DGMethod):
    """Sequential per-domain inner steps, then a Reptile-style interpolation towards the result."""

    tasks = ("classification",)

    def __init__(self, meta_lr: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inner loop's objective at the current weights: the mean per-domain CE."""
        ce = torch.stack([F.cross_entropy(self(xk), yk) for xk, yk in domain_minibatches(x, y, domain)]).mean()
        return {"loss": ce}

    def fish_step(self, optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], backward=None) -> torch.Tensor:
        """One Fish update on the per-domain ``batches``; returns the inner losses."""
        backward = backward or (lambda loss: loss.backward())
        meta = {k: v.detach().clone() for k, v in floating_state(self).items()}
        losses = []
        for xk, yk in batches:
            loss = F.cross_entropy(self(xk), yk)
            optimizer.zero_grad()
            backward(loss)
            optimizer.step()
            losses.append(loss.detach())
        fish_interpolate(self, meta, self.hparams.meta_lr)
        return torch.stack(losses)

    def training_step(self, batch, batch_idx):
        x, y, domain, *_ = batch
        losses = self.fish_step(self.optimizers(), domain_minibatches(x, y, domain), self.manual_backward)
        self.log_terms({"loss": losses.mean()}, len(y))
        self.step_schedulers("step")

    def configure_optimizers(self):
        return self.build_optimizers([[p for p in self.parameters() if p.requires_grad]])
