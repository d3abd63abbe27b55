"""V-REx: risk extrapolation by variance of the domain risks (Krueger et al., ICML 2021), DomainBed's ``VREx``.

    L = mean_k R_k  +  lambda_t * 1/K sum_k (R_k - mean_j R_j)^2,     R_k = CE(f(x_k), y_k)

``lambda_t`` is 1 for the first ``vrex_penalty_anneal_iters`` updates, then ``vrex_lambda``, with the
optimiser's state reset at the jump, as for IRM (:mod:`dg_lightning.methods.irm`, same differences).
Follows ``VREx.update`` (``domainbed/algorithms.py``): one forward pass over the whole batch, the
population variance of the per-domain risks; defaults lambda 10, anneal 500 updates. DomainBed logs
the last domain's risk as ``nll``; here ``nll`` is their mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_lightning.methods.common import domain_indices
from dg_lightning.methods.irm import AnnealedPenalty


class VREx(AnnealedPenalty):
    """Mean of the per-domain risks plus the annealed variance of the risks."""

    def __init__(self, vrex_lambda: float = 10.0, vrex_penalty_anneal_iters: int = 500, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.anneal_iters, self.final_weight = vrex_penalty_anneal_iters, vrex_lambda

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(x)
        risks = torch.stack([F.cross_entropy(logits[i], y[i]) for i in domain_indices(domain)])
        mean = risks.mean()
        penalty = (risks - mean).pow(2).mean()
        return {"loss": mean + self.penalty_weight() * penalty, "nll": mean, "penalty": penalty}
