"""ISSA stage 2: the masked noise encoder, inverting the frozen generator.

``E(x) = (w+, input noise, noise maps at one resolution)``: w+ as an offset from the generator's
``w_avg``; the input noise (the base layer's noise map, 4 x 8 for 2:1 images) as a Gaussian
posterior ``N(mu, sigma^2)`` sampled during training (its mean at inference); the noise maps of the
styled layers at ``noise_height`` (both layers there). Every other noise map is zero, so the
layout of an image lives in the predicted noise and its appearance in w+: ``G(w_B, noise_A)``
keeps A's layout with B's style.

Masking (training): the predicted noise maps are cut into ``mask_patch`` x ``mask_patch`` patches
and ``mask_ratio`` of them (per image) are replaced by N(0, 1); the pixel loss then ignores the
image area under masked patches, so the encoder cannot hide appearance in the noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.methods.issa.generator import EqualConv2d, EqualLinear, Generator


def patch_mask(n: int, height: int, width: int, patch: int = 4, ratio: float = 0.25,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, 1, height, width) bool, True on ``round(ratio * cells)`` random ``patch`` x ``patch`` cells per image."""
    gh, gw = math.ceil(height / patch), math.ceil(width / patch)
    cells = gh * gw
    k = int(round(ratio * cells))
    order = torch.rand(n, cells, generator=generator).argsort(dim=1)
    grid = torch.zeros(n, cells, dtype=torch.bool)
    grid.scatter_(1, order[:, :k], True)
    grid = grid.view(n, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return grid[..., :height, :width].to(device)


def mask_noise(noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``noise`` with the masked positions replaced by fresh N(0, 1) samples."""
    return torch.where(mask, torch.randn_like(noise), noise)


class MaskedNoiseEncoder(nn.Module):
    """A convolutional encoder for a frozen ``Generator`` (see module docstring).

    Args:
        generator: the generator to invert (read for its sizes and ``w_avg``; not stored).
        noise_height: resolution (height) of the predicted noise maps; default: a quarter of the image.
        channels: encoder width.
    """

    def __init__(self, generator: Generator, noise_height: int | None = None, channels: int = 64):
        super().__init__()
        h, w = generator.size
        self.noise_height = noise_height or max(generator.base[0], h // 4)
        self.noise_layers = generator.layers_at(self.noise_height)
        if not self.noise_layers:
            raise ValueError(f"noise_height {self.noise_height}: the generator has layers at heights "
                             f"{sorted({s[0] for s in generator.noise_shapes()})}")
        self.noise_shapes = generator.noise_shapes()
        self.num_ws, self.w_dim = generator.num_ws, generator.w_dim
        self.register_buffer("w_avg", generator.w_avg.detach().clone())
        self.stem = EqualConv2d(3, channels, 3)
        blocks, height = [], h
        while height > generator.base[0]:
            blocks.append(nn.Sequential(EqualConv2d(channels, channels, 3), nn.AvgPool2d(2)))
            height //= 2
        self.blocks = nn.ModuleList(blocks)
        self.noise_head = EqualConv2d(channels, len(self.noise_layers), 3, activation=False)
        self.input_noise_head = EqualConv2d(channels, 2, 3, activation=False)  # mu, log sigma^2
        base_cells = generator.base[0] * generator.base[1]
        self.w_head = EqualLinear(channels * base_cells, self.num_ws * self.w_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` in [-1, 1] at the generator's size."""
        f = self.stem(x)
        noise_maps = self.noise_head(f) if f.shape[-2] == self.noise_height else None
        for block in self.blocks:
            f = block(f)
            if f.shape[-2] == self.noise_height:
                noise_maps = self.noise_head(f)
        mu, logvar = self.input_noise_head(f).chunk(2, dim=1)
        w_plus = self.w_avg + self.w_head(f.flatten(1)).view(-1, self.num_ws, self.w_dim)
        return {"w_plus": w_plus, "noise_maps": noise_maps, "input_mu": mu, "input_logvar": logvar}

    def generator_noise(self, out: dict[str, torch.Tensor], sample: bool = False,
                        noise_maps: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The generator's noise list: the input noise (sampled or its mean), the predicted maps at
        ``noise_height`` (or ``noise_maps``, e.g. masked), zeros elsewhere."""
        mu, logvar = out["input_mu"], out["input_logvar"]
        n = mu.shape[0]
        maps = out["noise_maps"] if noise_maps is None else noise_maps
        noise = [mu.new_zeros(n, 1, *hw) for hw in self.noise_shapes]
        noise[0] = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        for j, i in enumerate(self.noise_layers):
            noise[i] = maps[:, j:j + 1]
        return noise


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), averaged over elements."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()


def masked_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` (N, 1, H, W; True = masked) is False."""
    keep = (~mask).to(recon.dtype).expand_as(recon)
    return ((recon - target).pow(2) * keep).sum() / keep.sum().clamp_min(1)


def pixel_mask(noise_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A noise-resolution mask carried to the image resolution (nearest)."""
    return F.interpolate(noise_mask.float(), size=size, mode="nearest").bool()


def feature_matching(fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over discriminator blocks of the mean absolute feature difference (real side detached)."""
    return sum(F.l1_loss(f, r.detach()) for f, r in zip(fake_feats, real_feats, strict=True))


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
