"""IRM: invariant risk minimisation (Arjovsky et al., 2019), IRMv1 as DomainBed's ``IRM``.

    L = 1/K sum_k R_k  +  lambda_t * 1/K sum_k P_k
    R_k = CE(f(x_k), y_k)
    P_k = (d/dw CE(w * f(x_k^odd), y_k^odd)) * (d/dw CE(w * f(x_k^even), y_k^even)) at w = 1

P_k is DomainBed's unbiased estimate of ||grad_w R_k||^2 (the product of the gradients on the
even- and odd-indexed halves of the domain's minibatch). ``lambda_t`` is 1 for the first
``irm_penalty_anneal_iters`` updates and ``irm_lambda`` afterwards; at the update where it jumps
the optimiser's state is reset (DomainBed builds a new Adam: "it doesn't like the sharp jump in
gradient magnitudes"). Follows ``IRM.update`` (``domainbed/algorithms.py``): one forward pass over the
whole batch, then per-domain terms; defaults lambda 100, anneal 500 updates (DomainBed's, for its
5,000 steps: a shorter schedule never leaves the annealing phase unless you lower it).

Differences: the update counter is a buffer saved in checkpoints (so a resumed run keeps its phase);
the reset clears the state of the configured optimiser and keeps its learning rate (a scheduler's,
if any), where DomainBed's new Adam restarts from the base learning rate (DomainBed has no scheduler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import domain_indices, reset_optimizer_state


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Product of the gradients of the CE w.r.t. a dummy scale ``w = 1`` on the two halves
    (even, odd positions) of one domain's minibatch."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    g1 = torch.autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), [scale], create_graph=True)[0]
    g2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
    return (g1 * g2).sum()


class AnnealedPenalty(DGMethod):
    """A per-domain penalty whose weight jumps from 1 to ``penalty_weight`` after ``anneal_iters``
    updates, the optimiser's state reset at the jump (DomainBed's IRM and VREx)."""

    tasks = ("classification",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    anneal_iters: int = 0
    final_weight: float = 1.0

    def penalty_weight(self) -> float:
        return self.final_weight if int(self.update_count) >= self.anneal_iters else 1.0

    def training_step(self, batch, batch_idx):
        if int(self.update_count) == self.anneal_iters and self._trainer is not None:
            # runs inside the optimiser's closure, before its update: the update starts from fresh state
            reset_optimizer_state(self.optimizers())
        loss = super().training_step(batch, batch_idx)
        self.update_count += 1
        return loss


class IRM(AnnealedPenalty):
    """IRMv1: per-domain CE plus the annealed gradient-norm penalty of a dummy classifier scale."""

    def __init__(self, irm_lambda: float = 100.0, irm_penalty_anneal_iters: int = 500, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.anneal_iters, self.final_weight = irm_penalty_anneal_iters, irm_lambda

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(x)
        idx = domain_indices(domain)
        nll = torch.stack([F.cross_entropy(logits[i], y[i]) for i in idx]).mean()
        penalty = torch.stack([irm_penalty(logits[i], y[i]) for i in idx]).mean()
        return {"loss": nll + self.penalty_weight() * penalty, "nll": nll, "penalty": penalty}
