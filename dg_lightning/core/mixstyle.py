"""MixStyle (Zhou et al., ICLR 2021) as a backbone option: feature statistics mixed between images.

After chosen stages of the encoder, in training only and with probability ``p`` per forward pass,
each feature map's per-channel mean and standard deviation (its "style") are replaced by a convex
combination with those of another image of the batch:

    mu, sig = mean and std of x over (H, W)          (treated as constants: no gradient)
    x_mix   = (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]
    lam ~ Beta(alpha, alpha) per image,  perm = a random permutation of the batch

Follows ``MixStyle`` in the official release (KaiyangZhou/mixstyle-release, ``imcls/mixstyle.py``;
Dassl's ``MixStyle`` op with ``mix="random"``), defaults p = 0.5, alpha = 0.1, eps = 1e-6, and the
placement of ``resnet18_ms_l123`` (after ResNet's layer1, layer2, layer3). Stages are indices into the
timm backbone's ``feature_info`` (ResNets: 1, 2, 3 = layer1, layer2, layer3; EfficientNets: the
blocks that end the stride-4, -8 and -16 levels), for the classification backbone and the
segmentation encoder alike.

Differences from the official code: the draw of "apply or not" uses torch's generator instead of
Python's ``random`` (both are reseeded every step here); the domain-label variant (``mix="crossdomain"``,
which assumes a batch made of two single-domain halves) is not provided.

The layer is a forward hook on the stage module (no parameters, so state dicts and pretrained
weights are unchanged); it reads the stage's own ``training`` flag, so it is off in evaluation. A
``deepcopy`` of the backbone carries the hook along (GCISG's EMA teacher, in training mode, mixes too).
"""

from __future__ import annotations

import torch
from torch import nn


def mix_style(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's channel statistics mixed with those of image ``perm[i]``
    by weight ``lam[i]`` (N,). The statistics are detached, as in the official code."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()
    lam = lam.view(-1, 1, 1, 1).to(x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (x - mu) / sig * sig_mix + mu_mix


class MixStyleHook:
    """The forward hook placed on a stage: with probability ``p`` (training only), :func:`mix_style`
    with ``lam ~ Beta(alpha, alpha)`` and a random permutation of the batch."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6):
        if not 0 <= p <= 1 or alpha <= 0:
            raise ValueError(f"MixStyle needs 0 <= p <= 1 and alpha > 0 (got p={p}, alpha={alpha})")
        self.p, self.alpha, self.eps = p, alpha, eps

    def __call__(self, module: nn.Module, inputs, output):
        if not module.training or output.dim() != 4 or output.shape[0] < 2:
            return output
        if torch.rand(()) >= self.p:
            return output
        n = output.shape[0]
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((n,)).to(output.device)
        perm = torch.randperm(n).to(output.device)
        return mix_style(output, lam, perm, self.eps)

    def __repr__(self) -> str:
        return f"MixStyle(p={self.p}, alpha={self.alpha}, eps={self.eps})"


def stage_modules(encoder: nn.Module) -> tuple[nn.Module, list[str]]:
    """(the timm model, the module name of each ``feature_info`` level) of a classification backbone
    or a segmentation encoder (segmentation-models-pytorch's ``tu-`` encoders wrap it as ``.model``)."""
    model = getattr(encoder, "model", encoder)
    info = model.feature_info
    names = info.module_name() if hasattr(info, "module_name") else [f["module"] for f in info]
    return model, list(names)


def insert_mixstyle(encoder: nn.Module, stages: list[int], p: float = 0.5, alpha: float = 0.1,
                    eps: float = 1e-6) -> list[str]:
    """Put :class:`MixStyleHook` after each ``stages`` level of ``encoder``; returns the module names."""
    model, names = stage_modules(encoder)
    placed = []
    for s in stages:
        if not 0 <= s < len(names):
            raise ValueError(f"mixstyle stage {s} does not exist: the backbone has levels 0..{len(names) - 1} "
                             f"({names})")
        name = names[s]
        try:
            module = model.get_submodule(name)
        except AttributeError:  # timm's flattened feature wrappers name "blocks.1" as "blocks_1"
            module = model.get_submodule(name.replace(".", "_"))
        module.register_forward_hook(MixStyleHook(p, alpha, eps))
        placed.append(name)
    return placed
