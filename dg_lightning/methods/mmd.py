"""MMD: domain feature distributions matched by maximum mean discrepancy (Li et al., CVPR 2018,
MMD-AAE's regulariser), DomainBed's ``MMD``.

    L = 1/K sum_k CE(f(x_k), y_k)  +  gamma * 2/(K(K-1)) sum_{i<j} MMD^2(phi(x_i), phi(x_j))
    MMD^2(a, b) = mean k(a, a') + mean k(b, b') - 2 mean k(a, b),   k(u, v) = sum_g exp(-g ||u - v||^2)
    g in {0.001, 0.01, 0.1, 1, 10, 100, 1000}

Follows DomainBed's ``AbstractMMD.update`` with the Gaussian kernel (``domainbed/algorithms.py``):
the biased estimator (diagonal terms included), squared distances clamped at 1e-30, one forward pass
per domain, ``mmd_gamma`` = 1 (random search 10^U(-1, 1)). Features: the backbone's pooled output
(see :mod:`dg_lightning.methods.coral` on dropout).
"""

from __future__ import annotations

import torch

from dg_lightning.methods.coral import CORAL

GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, gammas: tuple[float, ...] = GAMMAS) -> torch.Tensor:
    """Sum over ``gammas`` of ``exp(-g * ||a_i - b_j||^2)``, (len(a), len(b))."""
    sq = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2 * a @ b.T).clamp_min(1e-30)
    return sum(torch.exp(-g * sq) for g in gammas)


def mmd_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Biased squared MMD between the samples ``a`` and ``b`` under :func:`gaussian_kernel`."""
    return gaussian_kernel(a, a).mean() + gaussian_kernel(b, b).mean() - 2 * gaussian_kernel(a, b).mean()


class MMD(CORAL):
    """Per-domain CE plus ``mmd_gamma`` x the mean pairwise Gaussian-kernel MMD between source domains."""

    distance = staticmethod(mmd_distance)
