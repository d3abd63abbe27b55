"""A compact StyleGAN2 (Karras et al. 2020) with explicit per-layer noise inputs and w+, for ISSA.

No maintained package fits: ISSA needs rectangular images (2:1 driving scenes), w+ input and every
noise map as an argument; ``stylegan2-torch`` is square-only and compiles CUDA ops at import. So
this module writes the architecture out, following the paper (config F):

* mapping network: pixel-norm, ``n_mlp`` equalised-lr linear layers (lr multiplier 0.01), z -> w;
* synthesis: a learned constant at the base resolution (4 x 8 for 2:1 images), then per resolution
  an upsampling and a plain *modulated convolution* (style scales the input channels, weights are
  demodulated), each followed by *noise injection* (a per-layer learned scalar strength times a
  noise map) and bias + leaky ReLU (gain sqrt 2); ToRGB (1 x 1 modulated, not demodulated) at every
  resolution with skip connections summed after upsampling;
* discriminator: residual blocks with equalised lr, minibatch standard deviation, linear head; it
  also returns every block's features (the ISSA encoder's feature-matching loss).

Simplifications, all documented here: upsampling is bilinear interpolation (the paper uses a
transposed convolution with a [1, 3, 3, 1] FIR filter; the official code's blur only anti-aliases),
downsampling in the discriminator is average pooling, and there is no path-length regulariser.

w+ has ``num_ws = 2 * num_resolutions`` vectors, used in rosinality's order: the base layer takes
w[0] and its ToRGB w[1]; resolution k >= 1 takes w[2k - 1] (up conv), w[2k] (conv), w[2k + 1] (ToRGB).
Noise maps: one per styled layer (``noise_shapes``), index 0 = the base layer ("input noise").

Noise as ISSA uses it (official ``training/encoder_model.py``, ``FPNEncoder``): a noise input is
either one channel, broadcast over the layer's features (StyleGAN2; what stage 1 trains with), or
one map per feature channel (``layer_channels[i]`` channels), which the strength scales per
channel alike. The official encoder predicts ``min(32768 // resolution, 512)`` channels at its
resolutions (resolution = image width for 2:1 images), which is exactly the official generator's
feature width there (``channel_base`` 32768, ``channel_max`` 512); ``layer_channels`` applies the
same rule to any configuration, the tiny one included. Layers whose noise is not given use a fixed
one-channel map (``noise_mode="const"``, StyleGAN2's ``noise_const``: what the official inversion
uses for the layers it does not predict) or fresh N(0, 1) (``"random"``). The constant maps are
drawn from their own seeded generator and are not saved: they never touch the global random
state (stage 1 trains exactly as before) and any checkpoint rebuilds them.

Channel widths: ``channel_plan`` halves from ``channel_max`` per doubling of the height,
``min(channel_max, channel_base * 4 / height)``; the official (square-named) rule
``min(32768 / width, 512)`` for 2:1 images is ``channel_base = 4096``, ``channel_max = 512``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
#: seed of the generator's fixed ("const") noise maps
NOISE_CONST_SEED = 1234


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (weights scaled at run time by 1/sqrt(fan_in))."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale, self.lr_mul, self.activation = lr_mul / math.sqrt(in_dim), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activation else out


class EqualConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activation: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale, self.pad, self.activation = 1 / math.sqrt(in_ch * kernel * kernel), kernel // 2, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activation else out


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then ``n_mlp`` equalised linear layers with leaky ReLU (lr x 0.01)."""

    def __init__(self, w_dim: int, n_mlp: int = 8, lr_mul: float = 0.01):
        super().__init__()
        self.net = nn.Sequential(*[EqualLinear(w_dim, w_dim, lr_mul=lr_mul, activation=True) for _ in range(n_mlp)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """Weights scaled per input channel by the style ``s = A(w)``, then (optionally) demodulated:
    ``w'_ijk = s_i w_ijk``, ``w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate, self.upsample, self.pad = demodulate, upsample, kernel // 2
        self.in_ch, self.out_ch = in_ch, out_ch

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # StyleGAN2's non-fused form, equal to the grouped convolution with per-sample weights and much
        # faster on CPUs: scale the input channels by s, convolve with the shared weight, then scale
        # each output channel by its demodulation coefficient rsqrt(sum_ik (s_i w_ijk)^2).
        style = self.affine(w)  # (N, in)
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.pad)
        if self.demodulate:
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).T + 1e-8)  # (N, out)
            out = out * demod[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """``x + strength * noise``, one learned strength per layer; the noise (N, 1 or C, H, W) is given
    (one channel: broadcast over the C features; C channels: one map per feature).
    StyleGAN2 starts every strength at 0; ``init`` > 0 makes the noise count from the first step."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.strength = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if noise.shape[1] not in (1, x.shape[1]) or noise.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for features {tuple(x.shape)}: "
                             f"give 1 or {x.shape[1]} channels at {tuple(x.shape[-2:])}")
        return x + self.strength * noise


class StyledLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, upsample: bool = False, noise_init: float = 0.0):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, upsample=upsample)
        self.noise = NoiseInjection(noise_init)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.noise(self.conv(x, w), noise) + self.bias, 0.2) * SQRT2


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        rgb = self.conv(x, w) + self.bias
        if skip is not None:
            rgb = rgb + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return rgb


def channel_plan(num_res: int, channel_base: int, channel_max: int) -> list[int]:
    """Feature channels per resolution (heights 4, 8, ...): ``min(channel_max, channel_base >> k)``
    at height ``4 * 2^k`` (at least 8), i.e. halving from ``channel_max`` as the resolution doubles."""
    return [min(channel_max, max(8, channel_base >> k)) for k in range(num_res)]


class Generator(nn.Module):
    """StyleGAN2 synthesis for ``size = (H, W)`` images (H, W powers of two, H <= W) in [-1, 1].

    Args:
        size: output (height, width); the base is (4, 4 * W / H).
        w_dim: latent size (z and w); n_mlp: mapping depth.
        channel_base / channel_max: feature widths (``channel_plan``; tiny CPU config: 256 / 128;
            official StyleGAN2 widths for 2:1 images, ``min(32768 / width, 512)``: 4096 / 512).
        noise_init: every noise strength's starting value. StyleGAN2 uses 0, and the strengths grow
            over a long training; ISSA needs the noise maps to carry the layout, so a short
            training (the tiny CPU config) starts them at 0.1.
    """

    def __init__(self, size: tuple[int, int] = (64, 128), w_dim: int = 512, n_mlp: int = 8,
                 channel_base: int = 16384, channel_max: int = 512, noise_init: float = 0.0):
        super().__init__()
        h, w = size
        if h & (h - 1) or w & (w - 1) or h < 4 or w < h:
            raise ValueError(f"size {size}: height and width must be powers of two with 4 <= height <= width")
        self.size, self.w_dim = (h, w), w_dim
        #: the constructor's arguments: enough to rebuild this generator around a saved state dict
        self.config = {"size": [h, w], "w_dim": w_dim, "n_mlp": n_mlp, "channel_base": channel_base,
                       "channel_max": channel_max, "noise_init": noise_init}
        self.base = (4, 4 * w // h)
        self.num_res = int(math.log2(h)) - 1  # 4, 8, ..., h
        ch = channel_plan(self.num_res, channel_base, channel_max)
        self.mapping = MappingNetwork(w_dim, n_mlp)
        self.const = nn.Parameter(torch.randn(1, ch[0], *self.base))
        self.layers = nn.ModuleList([StyledLayer(ch[0], ch[0], w_dim, noise_init=noise_init)])
        self.to_rgbs = nn.ModuleList([ToRGB(ch[0], w_dim)])
        for k in range(1, self.num_res):
            self.layers.append(StyledLayer(ch[k - 1], ch[k], w_dim, upsample=True, noise_init=noise_init))
            self.layers.append(StyledLayer(ch[k], ch[k], w_dim, noise_init=noise_init))
            self.to_rgbs.append(ToRGB(ch[k], w_dim))
        self.num_ws = 2 * self.num_res
        self.register_buffer("w_avg", torch.zeros(w_dim))
        #: feature channels of each styled layer (= the noise channels the official encoder predicts there)
        self.layer_channels = [ch[0]] + [ch[k] for k in range(1, self.num_res) for _ in range(2)]
        fixed = torch.Generator().manual_seed(NOISE_CONST_SEED)  # never the global random state
        for i, hw in enumerate(self.noise_shapes()):
            self.register_buffer(f"noise_const{i}", torch.randn(1, 1, *hw, generator=fixed), persistent=False)

    def noise_shapes(self) -> list[tuple[int, int]]:
        """(H, W) of each styled layer's noise map, in layer order (index 0: the base layer)."""
        shapes = [self.base]
        for k in range(1, self.num_res):
            hw = (self.base[0] << k, self.base[1] << k)
            shapes += [hw, hw]
        return shapes

    def random_noise(self, n: int, device=None) -> list[torch.Tensor]:
        return [torch.randn(n, 1, *hw, device=device) for hw in self.noise_shapes()]

    def const_noise(self, i: int) -> torch.Tensor:
        """The fixed one-channel noise map (1, 1, H, W) of layer ``i`` (``noise_mode="const"``)."""
        return getattr(self, f"noise_const{i}")

    def layers_at(self, height: int) -> list[int]:
        """Indices of the noise maps at resolution ``height``."""
        return [i for i, hw in enumerate(self.noise_shapes()) if hw[0] == height]

    def z_to_w_plus(self, z: torch.Tensor) -> torch.Tensor:
        """(N, w_dim) z -> (N, num_ws, w_dim) w+ with the same w at every layer."""
        return self.mapping(z).unsqueeze(1).expand(-1, self.num_ws, -1)

    def synthesis(self, w_plus: torch.Tensor, noise: list[torch.Tensor | None] | None = None,
                  noise_mode: str = "random") -> torch.Tensor:
        """Images from w+ (N, num_ws, w_dim) and noise maps, each (N, 1 or ``layer_channels[i]``, H, W);
        ``None`` entries: fresh N(0, 1) (``noise_mode="random"``) or the layer's fixed map (``"const"``)."""
        n = w_plus.shape[0]
        if w_plus.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w+ must be (N, {self.num_ws}, {self.w_dim}), got {tuple(w_plus.shape)}")
        if noise_mode not in ("random", "const"):
            raise ValueError(f"noise_mode must be 'random' or 'const', got {noise_mode!r}")
        shapes = self.noise_shapes()
        noise = list(noise) if noise is not None else [None] * len(shapes)
        if len(noise) != len(shapes):
            raise ValueError(f"expected {len(shapes)} noise maps ({shapes}), got {len(noise)}")
        noise = [m if m is not None else torch.randn(n, 1, *hw, device=w_plus.device) if noise_mode == "random"
                 else self.const_noise(i).to(w_plus.dtype).expand(n, -1, -1, -1)
                 for i, (m, hw) in enumerate(zip(noise, shapes))]
        x = self.layers[0](self.const.expand(n, -1, -1, -1), w_plus[:, 0], noise[0])
        rgb = self.to_rgbs[0](x, w_plus[:, 1], None)
        for k in range(1, self.num_res):
            x = self.layers[2 * k - 1](x, w_plus[:, 2 * k - 1], noise[2 * k - 1])
            x = self.layers[2 * k](x, w_plus[:, 2 * k], noise[2 * k])
            rgb = self.to_rgbs[k](x, w_plus[:, 2 * k + 1], rgb)
        return rgb

    def forward(self, z: torch.Tensor, noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        return self.synthesis(self.z_to_w_plus(z), noise)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        return (out + F.avg_pool2d(self.skip(x), 2)) / SQRT2


class Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator; ``forward(x, features=True)`` also returns each block's output."""

    def __init__(self, size: tuple[int, int] = (64, 128), channel_base: int = 16384, channel_max: int = 512,
                 mbstd_group: int = 4):
        super().__init__()
        h, w = size
        num_res = int(math.log2(h)) - 1
        ch = channel_plan(num_res, channel_base, channel_max)[::-1]  # widest at the lowest resolution
        self.from_rgb = EqualConv2d(3, ch[0], 1)
        self.blocks = nn.ModuleList([DiscriminatorBlock(ch[k], ch[k + 1]) for k in range(num_res - 1)])
        self.mbstd_group = mbstd_group
        self.final_conv = EqualConv2d(ch[-1] + 1, ch[-1], 3)
        self.head = nn.Sequential(EqualLinear(ch[-1] * 4 * (4 * w // h), ch[-1], activation=True), EqualLinear(ch[-1], 1))

    def minibatch_std(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.mbstd_group, n)
        while n % g:
            g -= 1
        std = x.view(g, -1, c, h, w).var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([x, std.view(-1, 1, 1, 1).repeat(g, 1, h, w)], dim=1)

    def forward(self, x: torch.Tensor, features: bool = False):
        feats = []
        out = self.from_rgb(x)
        for block in self.blocks:
            out = block(out)
            feats.append(out)
        out = self.final_conv(self.minibatch_std(out))
        logit = self.head(out.flatten(1)).squeeze(1)
        return (logit, feats) if features else logit
