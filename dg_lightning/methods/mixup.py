"""Mixup across domains (Xu et al., AAAI 2020; Yan et al., 2020), DomainBed's ``Mixup``.

Images of two source domains are mixed pixel-wise with one weight per pair, and the loss mixes the
two labels' cross-entropies with the same weight:

    for each pair (i, j) of domains:  lam ~ Beta(alpha, alpha),  x = lam * x_i + (1 - lam) * x_j
        L += lam * CE(f(x), y_i) + (1 - lam) * CE(f(x), y_j)
    L /= K

Follows ``Mixup.update`` and ``random_pairs_of_minibatches`` (``domainbed/algorithms.py``,
``domainbed/lib/misc.py``): the domains in a random order, each paired with the next (cyclically),
so K pairs per step, both minibatches cut to the shorter one, one forward pass per pair;
``mixup_alpha`` = 0.2 (search 10^U(-1, 1)). Images are mixed in [0, 1] before the backbone's input
normalisation, which is affine, so this equals mixing the normalised images as DomainBed does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import domain_minibatches


def random_domain_pairs(k: int) -> list[tuple[int, int]]:
    """The domains in a random order, each paired with the next one, the last with the first."""
    perm = torch.randperm(k).tolist()
    return [(perm[i], perm[(i + 1) % k]) for i in range(k)]


def mixup_objective(model, batches: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]],
                    lams: list[float]) -> torch.Tensor:
    """Sum over ``pairs`` of the mixed-label CE on the mixed images, divided by the number of domains."""
    total = 0.0
    for (i, j), lam in zip(pairs, lams, strict=True):
        (xi, yi), (xj, yj) = batches[i], batches[j]
        n = min(len(xi), len(xj))
        logits = model(lam * xi[:n] + (1 - lam) * xj[:n])
        total = total + lam * F.cross_entropy(logits, yi[:n]) + (1 - lam) * F.cross_entropy(logits, yj[:n])
    return total / len(batches)


class Mixup(DGMethod):
    """Inter-domain mixup of images and labels."""

    tasks = ("classification",)

    def __init__(self, mixup_alpha: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        batches = domain_minibatches(x, y, domain)
        pairs = random_domain_pairs(len(batches))
        alpha = self.hparams.mixup_alpha
        lams = [float(np.random.beta(alpha, alpha)) for _ in pairs]
        loss = mixup_objective(self, batches, pairs, lams)
        return {"loss": loss}
