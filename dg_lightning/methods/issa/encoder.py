"""ISSA stage 2: the masked noise encoder, inverting the frozen generator.

Follows the official ``training/encoder_model.py`` (``FPNEncoder``), ``training/masking.py`` and
``training/loss.py`` (``MixEncoderDiscriminatorLoss``) of boschresearch/ISSA:

``E(x) = (w+, input noise, noise maps at one resolution)``. The noise maps are predicted for both
styled layers at ``noise_height`` (official: ``noise_predict_from = noise_predict_until = 128``,
the width of a quarter-height map of 256 x 512 images), each with ``generator.layer_channels[i]``
channels, ``min(32768 // width, 512)`` at the official size (256 there); every other layer takes
the generator's fixed one-channel noise (the official ``noise_mode='const'``). So the layout of an
image lives in the predicted noise and its appearance in w+: ``G(w_B, noise_A)`` keeps A's layout
with B's style.

Masking (training, ``mask_layers``): each predicted noise layer gets its *own* random mask (the
official ``use_same_mask: false``): its map is cut into ``patch`` x ``patch`` cells, and
``L - int(L * (1 - ratio))`` of the L cells (MAE's ``random_masking``) are replaced by N(0, 1) in
every channel (``masked_noise_mode: normal``). The pixel loss keeps only the image area that no
layer masked (the logical AND of the layers' keep masks, upsampled by nearest neighbour), and its
mean runs over *all* elements (``F.mse_loss(fake * keep, real * keep)``, :func:`masked_mse`).

Two encoders:

* ``backbone="fpn_resnet50"``: the official architecture: a ResNet-50 (from scratch, timm) with a
  feature pyramid (torchvision's ``FeaturePyramidNetwork``, ``fpn_dim`` channels; official 1024)
  at strides 4, 8, 16, 32 (p2..p5); 3 coarse w's from p4, 4 medium from p3, the rest from p2, each
  by stride-2 3 x 3 convolutions with leaky ReLU down to 1 x 1 and an equalised linear layer
  (``ToStyleCode``); the noise maps from the pyramid level at ``noise_height`` by 1 x 1
  convolutions each followed by leaky ReLU (0.01): five at the output width when it is above 64
  channels (``ToLayerNoise``), else 512-512-256-128-64-out (``ToSingleDimLayerNoise``).
  Differences: torchvision's FPN upsamples by nearest neighbour and smooths p5 too (the official
  one: bilinear, no smoothing of p5).
* ``backbone="compact"`` (the tiny CPU configuration): a plain convolution stack (one 3 x 3
  convolution and 2 x average pooling per level), w+ as an offset from ``w_avg`` through one
  linear layer from the base level, one 3 x 3 convolution per predicted noise layer, followed by
  the last activation of the official heads (``ToLayerNoise``, ``ToSingleDimLayerNoise``:
  ``nn.LeakyReLU()``, slope 0.01), so that the noise maps are, as the
  official ones, almost non-negative (``noise_out="leaky_relu"``; ``"linear"``: signed maps, the
  earlier compact encoder, what its checkpoints load as). A
  ResNet-50 FPN at 64 x 128 on a 2-core CPU would take most of the budget; this is the named
  difference of the tiny configuration.

Input noise (both encoders): the base layer's noise map (1 x 4 x 8 for 2:1 images), predicted
deterministically and regularised by the official KL (:func:`input_noise_kl`). The official
generator feeds a 512-d "input noise" vector into its first block; that generator file
(``networks_stylegan2.py``) is not in the official repository, so how it enters is not known: here
it is the base layer's noise, the one StyleGAN2 input it can stand for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.methods.issa.generator import EqualConv2d, EqualLinear, Generator


def patch_mask(n: int, height: int, width: int, patch: int = 4, ratio: float = 0.25,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, 1, height, width) bool, True on ``L - int(L * (1 - ratio))`` random ``patch`` x ``patch``
    cells of the L cells of each image (the official MAE-style count)."""
    if height % patch or width % patch:
        raise ValueError(f"mask patch {patch} must divide the noise map {height} x {width}")
    gh, gw = height // patch, width // patch
    cells = gh * gw
    k = cells - int(cells * (1 - ratio))
    order = torch.rand(n, cells, generator=generator).argsort(dim=1)
    grid = torch.zeros(n, cells, dtype=torch.bool)
    grid.scatter_(1, order[:, :k], True)
    grid = grid.view(n, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return grid.to(device)


def mask_noise(noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``noise`` (N, C, H, W) with the positions of ``mask`` (N, 1, H, W) replaced by fresh N(0, 1)
    samples in every channel."""
    return torch.where(mask, torch.randn_like(noise), noise)


def mask_layers(maps: list[torch.Tensor], image_size: tuple[int, int], patch: int, ratio: float,
                generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Each noise map masked with its own random mask. Returns (masked maps, pixel keep mask
    (N, 1, H, W) float: 1 where no layer was masked, the per-layer masks)."""
    masked, masks = [], []
    keep = None
    for m in maps:
        mask = patch_mask(m.shape[0], *m.shape[-2:], patch, ratio, generator=generator, device=m.device)
        masked.append(mask_noise(m, mask))
        masks.append(mask)
        layer_keep = ~pixel_mask(mask, image_size)
        keep = layer_keep if keep is None else keep & layer_keep
    return masked, keep.float(), masks


def pixel_mask(noise_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A noise-resolution mask carried to the image resolution (nearest)."""
    return F.interpolate(noise_mask.float(), size=size, mode="nearest").bool()


def masked_mse(recon: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``mean((recon * keep - target * keep)^2)`` over *all* elements (the official normalisation:
    masked pixels count as zeros in the mean); ``keep`` (N, 1, H, W), 1 = kept."""
    return F.mse_loss(recon * keep, target * keep)


def input_noise_kl(noise: torch.Tensor) -> torch.Tensor:
    """The official input-noise KL: per image, the mean ``m`` and the (unbiased) variance ``v`` of its
    input noise define ``q = N(m, v)`` (``v`` is passed as the scale, as the official code does), and
    ``KL(q || N(0, 1)) = -log v + (v^2 + m^2) / 2 - 1/2``, averaged over images."""
    flat = noise.flatten(1)
    m, v = flat.mean(1), flat.var(1)
    return (-torch.log(v) + (v.pow(2) + m.pow(2)) / 2 - 0.5).mean()


def noise_l1(maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean absolute value over every element of every predicted noise map (the official layer-noise loss)."""
    total = sum(m.abs().sum() for m in maps)
    return total / sum(m.numel() for m in maps)


class _StyleCode(nn.Module):
    """Stride-2 3 x 3 convolutions with leaky ReLU down to 1 x 1, then an equalised linear layer."""

    def __init__(self, in_dim: int, out_dim: int, n_convs: int):
        super().__init__()
        layers = []
        for i in range(n_convs):
            layers += [nn.Conv2d(in_dim if i == 0 else out_dim, out_dim, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs, self.linear = nn.Sequential(*layers), EqualLinear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


def _noise_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """The official noise heads: 1 x 1 convolutions, each followed by leaky ReLU (0.01)."""
    widths = [out_dim] * 5 if out_dim > 64 else [512, 512, 256, 128, 64, out_dim]
    layers, prev = [], in_dim
    for w in widths:
        layers += [nn.Conv2d(prev, w, 1), nn.LeakyReLU()]
        prev = w
    return nn.Sequential(*layers)


class MaskedNoiseEncoder(nn.Module):
    """An encoder for a frozen ``Generator`` (see module docstring).

    Args:
        generator: the generator to invert (read for its sizes, channels and ``w_avg``; not stored).
        noise_height: height of the predicted noise maps; default: a quarter of the image (official).
        channels: width of the compact encoder.
        backbone: ``"compact"`` or ``"fpn_resnet50"`` (official).
        fpn_dim: feature-pyramid channels of ``fpn_resnet50`` (official 1024).
        noise_out: the compact encoder's noise-head output: ``"leaky_relu"`` (0.01, as the official
            heads end) or ``"linear"`` (the earlier compact encoder). The FPN heads are the official ones.
    """

    def __init__(self, generator: Generator, noise_height: int | None = None, channels: int = 64,
                 backbone: str = "compact", fpn_dim: int = 1024, noise_out: str = "leaky_relu"):
        super().__init__()
        h, w = generator.size
        self.noise_height = noise_height or max(generator.base[0], h // 4)
        self.noise_layers = generator.layers_at(self.noise_height)
        if not self.noise_layers or self.noise_layers == [0]:
            raise ValueError(f"noise_height {self.noise_height}: choose one of the generator's heights above the "
                             f"base, {sorted({s[0] for s in generator.noise_shapes()[1:]})}")
        if backbone not in ("compact", "fpn_resnet50"):
            raise ValueError(f"backbone must be 'compact' or 'fpn_resnet50', got {backbone!r}")
        if noise_out not in ("leaky_relu", "linear"):
            raise ValueError(f"noise_out must be 'leaky_relu' or 'linear', got {noise_out!r}")
        self.backbone, self.noise_out = backbone, noise_out
        self._sizes = {"channels": channels, "fpn_dim": fpn_dim}
        self.noise_shapes = generator.noise_shapes()
        #: channels of each predicted noise map: the generator's feature width at that layer
        self.noise_channels = [generator.layer_channels[i] for i in self.noise_layers]
        self.num_ws, self.w_dim, self.base = generator.num_ws, generator.w_dim, generator.base
        self.register_buffer("w_avg", generator.w_avg.detach().clone())
        for i in range(len(self.noise_shapes)):  # the generator's fixed maps, for the layers not predicted
            self.register_buffer(f"noise_const{i}", generator.const_noise(i).clone(), persistent=False)
        if backbone == "compact":
            self._build_compact(generator, channels)
        else:
            self._build_fpn(generator, fpn_dim)

    # -- compact ---------------------------------------------------------------------------------
    def _build_compact(self, generator: Generator, channels: int) -> None:
        h = generator.size[0]
        self.stem = EqualConv2d(3, channels, 3)
        blocks, height = [], h
        while height > generator.base[0]:
            blocks.append(nn.Sequential(EqualConv2d(channels, channels, 3), nn.AvgPool2d(2)))
            height //= 2
        self.blocks = nn.ModuleList(blocks)
        self.noise_heads = nn.ModuleList([EqualConv2d(channels, c, 3, activation=False) for c in self.noise_channels])
        self.input_noise_head = EqualConv2d(channels, 1, 3, activation=False)
        self.w_head = EqualLinear(channels * self.base[0] * self.base[1], self.num_ws * self.w_dim)

    def _forward_compact(self, x: torch.Tensor):
        f = self.stem(x)
        at_noise = f if f.shape[-2] == self.noise_height else None
        for block in self.blocks:
            f = block(f)
            if f.shape[-2] == self.noise_height:
                at_noise = f
        w_plus = self.w_avg + self.w_head(f.flatten(1)).view(-1, self.num_ws, self.w_dim)
        maps = [head(at_noise) for head in self.noise_heads]
        if self.noise_out == "leaky_relu":
            maps = [F.leaky_relu(m, 0.01) for m in maps]
        return w_plus, self.input_noise_head(f), maps

    # -- official FPN-ResNet-50 ------------------------------------------------------------------
    def _build_fpn(self, generator: Generator, fpn_dim: int) -> None:
        import timm
        from torchvision.ops import FeaturePyramidNetwork

        h, w = generator.size
        if h < 64:
            raise ValueError(f"the fpn_resnet50 encoder needs images at least 64 px high (stride 32), got {h}")
        self.resnet = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        self.fpn = FeaturePyramidNetwork(self.resnet.feature_info.channels(), fpn_dim)
        heights = {2: h // 4, 3: h // 8, 4: h // 16}
        if self.noise_height not in heights.values():
            raise ValueError(f"noise_height {self.noise_height}: fpn_resnet50 predicts noise at a pyramid level, "
                             f"heights {sorted(heights.values())}")
        self.noise_level = next(k for k, v in heights.items() if v == self.noise_height)
        # official split of w+: 3 coarse (p4), 4 medium (p3), the rest fine (p2)
        self.style_levels = [4] * 3 + [3] * 4 + [2] * (self.num_ws - 7)
        self.styles = nn.ModuleList([_StyleCode(fpn_dim, self.w_dim, int(math.log2(w // 2 ** lvl)))
                                     for lvl in self.style_levels])
        self.to_input_noise = nn.Sequential(  # p4 down to the base, one channel
            *[m for _ in range(int(math.log2(h // 16 // self.base[0])))
              for m in (nn.Conv2d(fpn_dim, fpn_dim, 3, stride=2, padding=1), nn.LeakyReLU())],
            nn.Conv2d(fpn_dim, 1, 3, padding=1))
        self.noise_heads = nn.ModuleList([_noise_head(fpn_dim, c) for c in self.noise_channels])

    def _forward_fpn(self, x: torch.Tensor):
        feats = self.fpn(dict(zip("2345", self.resnet(x), strict=True)))
        w_plus = torch.stack([style(feats[str(lvl)]) for style, lvl in zip(self.styles, self.style_levels)], dim=1)
        noise_in = feats[str(self.noise_level)]
        return w_plus, self.to_input_noise(feats["4"]), [head(noise_in) for head in self.noise_heads]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``x`` in [-1, 1] at the generator's size -> ``w_plus`` (N, num_ws, w_dim), ``input_noise``
        (N, 1, *base), ``noise_maps`` (one (N, C_i, h, w) map per predicted layer)."""
        w_plus, input_noise, maps = (self._forward_compact if self.backbone == "compact" else self._forward_fpn)(x)
        return {"w_plus": w_plus, "input_noise": input_noise, "noise_maps": maps}

    def generator_noise(self, out: dict, noise_maps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The generator's noise list: the input noise, the predicted maps at ``noise_height`` (or
        ``noise_maps``, e.g. masked), the generator's fixed one-channel maps elsewhere."""
        maps = out["noise_maps"] if noise_maps is None else noise_maps
        n = out["input_noise"].shape[0]
        noise = [getattr(self, f"noise_const{i}").to(out["input_noise"].dtype).expand(n, -1, -1, -1)
                 for i in range(len(self.noise_shapes))]
        noise[0] = out["input_noise"]
        for m, i in zip(maps, self.noise_layers, strict=True):
            noise[i] = m
        return noise

    def config(self) -> dict:
        """The constructor's arguments besides the generator (saved in stage-2 checkpoints)."""
        return {"noise_height": self.noise_height, "backbone": self.backbone, "noise_out": self.noise_out,
                **self._sizes}
