"""CORAL: Deep CORAL (Sun & Saenko, ECCV-W 2016) as a DG baseline, DomainBed's ``CORAL``.

Cross-entropy on each source domain plus the distance between the feature distributions of every
pair of source domains, through their first two moments:

    L = 1/K sum_k CE(f(x_k), y_k)  +  gamma * 2/(K(K-1)) sum_{i<j} coral(phi(x_i), phi(x_j))
    coral(a, b) = mean((mean_a - mean_b)^2) + mean((Cov_a - Cov_b)^2)     (unbiased covariances)

Follows DomainBed's ``AbstractMMD.update`` with ``kernel_type="mean_cov"`` (``domainbed/algorithms.py``):
one forward pass per domain (BatchNorm statistics per domain when BatchNorm trains), the penalty
averaged over pairs, ``mmd_gamma`` = 1 by default (random search 10^U(-1, 1)). The features are the
backbone's pooled output; DomainBed's include the ResNet dropout, which this project applies in front
of the classifier instead (identical at DomainBed's default dropout 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import domain_minibatches, pairwise_mean


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the feature means plus of the (unbiased) covariance matrices."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    ca, cb = a - mean_a, b - mean_b
    cov_a, cov_b = ca.T @ ca / (len(a) - 1), cb.T @ cb / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


class CORAL(DGMethod):
    """Per-domain CE plus ``mmd_gamma`` x the mean pairwise CORAL distance between source domains."""

    tasks = ("classification",)

    def __init__(self, mmd_gamma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

    distance = staticmethod(coral_distance)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        batches = domain_minibatches(x, y, domain)
        features = [self.encode(xk) for xk, _ in batches]  # one pass per domain, as DomainBed
        ce = torch.stack([F.cross_entropy(self.head_logits(f), yk) for f, (_, yk) in zip(features, batches)]).mean()
        penalty = pairwise_mean(features, self.distance)
        return {"loss": ce + self.hparams.mmd_gamma * penalty, "ce": ce, "penalty": penalty}
