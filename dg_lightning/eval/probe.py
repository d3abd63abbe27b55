"""Linear-probe evaluation of a frozen encoder: the standard judge of self-supervised pre-training.

``fit_linear_probe`` fits a multinomial logistic regression on standardised features (full-batch
L-BFGS, L2 penalty, deterministic) and returns it as an ``nn.Linear`` acting on the *raw*
features (the standardisation is folded into its weights), so it can sit in a model and be saved
with its checkpoint. ``extract`` runs a feature function over loaders; under DDP each rank extracts
its shard and ``unshard`` puts the gathered shards back in dataset order.

The self-supervised methods (:class:`dg_lightning.methods.ssl.SSLMethod`) use both at the start of
every validation epoch: features of the source domains' training ("in") splits, one probe per part
of the representation (full, invariant, each style space, ...); the usual per-domain metrics then
score the probes on the source "out" splits (in-domain) and on the held-out domains (unseen).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], loaders: Iterable, device: torch.device
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``fn(images) -> {part: features}`` over every batch ``(x, y, ...)`` of every loader;
    returns concatenated features per part (on the CPU) and labels."""
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for loader in loaders:
        for x, y, *_ in loader:
            for part, f in fn(x.to(device)).items():
                feats.setdefault(part, []).append(f.float().cpu())
            labels.append(y)
    if not labels:
        raise ValueError("no samples to fit a linear probe on")
    return {p: torch.cat(v) for p, v in feats.items()}, torch.cat(labels)


def unshard(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """Undo :class:`~dg_lightning.core.data.ShardSampler` after an all-gather.

    ``gathered`` is (world, m, ...): rank ``r``'s features of samples ``r, r + world, ...``, padded
    to the longest shard ``m``; returns the ``n`` samples in dataset order."""
    world = gathered.shape[0]
    out = gathered.new_empty((n, *gathered.shape[2:]))
    for r in range(world):
        k = len(range(r, n, world))
        out[r::world] = gathered[r, :k]
    return out


def pad_rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """``t`` (k, ...) padded with zeros to ``m`` rows (equal shapes for an all-gather)."""
    return torch.cat([t, t.new_zeros((m - len(t), *t.shape[1:]))]) if len(t) < m else t


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decay: float = 1e-4, max_iter: int = 100) -> nn.Linear:
    """Logistic regression on standardised ``features`` (N, D) minimising
    ``CE(W z + b, y) + weight_decay * ||W||^2`` with ``z = (f - mean) / std``; returned as a
    Linear on raw features: ``W' = W / std``, ``b' = b - W' mean``."""
    # Lightning evaluates under inference mode: leave it (and no_grad) to optimise the probe
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().clone().double()
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - mean) / std
        y = labels.detach().clone().long()
        w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, y) + weight_decay * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    probe = nn.Linear(z.shape[1], num_classes)
    with torch.no_grad():
        w_raw = w.detach() / std
        probe.weight.copy_(w_raw.float())
        probe.bias.copy_((b.detach() - w_raw @ mean).float())
    return probe
