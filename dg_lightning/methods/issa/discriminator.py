"""ISSA stage 2's discriminator and its losses, as the official encoder training builds them.

Official ``training/discriminator_model.py`` (``MultiscaleDiscriminator``, ``NLayerDiscriminator``,
pix2pixHD's PatchGAN) and ``training/loss.py`` (``GANLoss``, ``MixEncoderDiscriminatorLoss``) of
boschresearch/ISSA: a discriminator separate from the stage-1 one, trained from scratch against
the encoder's reconstructions.

* ``num_scales`` (3) PatchGANs, each on the image average-pooled once more than the previous
  (3 x 3, stride 2, padding 1, padding not counted); each PatchGAN: a 4 x 4 stride-2 convolution
  with leaky ReLU (0.2), ``n_layers - 1`` more stride-2 and one stride-1 4 x 4 convolution, each
  spectrally normalised, without bias, followed by instance norm (no affine) and leaky ReLU, then a
  4 x 4 convolution to one logit per patch. Widths ``ndf``, doubling per layer up to 512. Every
  layer's output is returned (features for feature matching; the last is the logit map).
* Hinge losses averaged over scales; the encoder's adversarial loss ``-mean D(x^)`` per scale,
  averaged; feature matching: ``sum over scales and layers but the last of (1 / num_scales) *
  L1(D_feat(x^), D_feat(x))``.
* Lazy R1 (``r1_penalty``): the gradient of the sum over scales of each logit map's mean, squared,
  summed per image, averaged (``d_r1_loss``); weighted by ``gamma / 2`` and the interval.
* The real images the discriminator sees are blurred by ``blur`` with a sigma fading linearly to
  0 over the first images (``blur_sigma_at``): kernel ``2^(-(x / sigma)^2)`` on [-3 sigma, 3 sigma],
  separable, zero padding (the official ``blur_image`` through ``upfirdn2d.filter2d``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class PatchGAN(nn.Module):
    """One scale of :class:`MultiScalePatchGAN` (pix2pixHD's ``NLayerDiscriminator``)."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()

        def normed(cin, cout, stride):
            return nn.Sequential(spectral_norm(nn.Conv2d(cin, cout, 4, stride, 2, bias=False)),
                                 nn.InstanceNorm2d(cout, affine=False), nn.LeakyReLU(0.2))

        layers = [nn.Sequential(nn.Conv2d(in_ch, ndf, 4, 2, 2), nn.LeakyReLU(0.2))]
        nf = ndf
        for _ in range(1, n_layers):
            layers.append(normed(nf, min(nf * 2, 512), 2))
            nf = min(nf * 2, 512)
        layers.append(normed(nf, min(nf * 2, 512), 1))
        nf = min(nf * 2, 512)
        layers.append(nn.Conv2d(nf, 1, 4, 1, 2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiScalePatchGAN(nn.Module):
    """``forward(x)`` -> one list per scale (full, 1/2, 1/4) of every layer's output, logits last."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3, num_scales: int = 3):
        super().__init__()
        self.scales = nn.ModuleList([PatchGAN(in_ch, ndf, n_layers) for _ in range(num_scales)])

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for k, d in enumerate(self.scales):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


def hinge_d_real(preds: list[list[torch.Tensor]]) -> torch.Tensor:
    """``mean(relu(1 - D(x)))`` per scale, averaged over scales."""
    return sum(F.relu(1 - p[-1]).mean() for p in preds) / len(preds)


def hinge_d_fake(preds: list[list[torch.Tensor]]) -> torch.Tensor:
    """``mean(relu(1 + D(x^)))`` per scale, averaged over scales."""
    return sum(F.relu(1 + p[-1]).mean() for p in preds) / len(preds)


def hinge_g(preds: list[list[torch.Tensor]]) -> torch.Tensor:
    """The encoder's adversarial loss: ``-mean D(x^)`` per scale, averaged over scales."""
    return sum(-p[-1].mean() for p in preds) / len(preds)


def feature_matching(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """Sum over scales and over every layer but the logits of ``L1(fake, real) / num_scales`` (real detached)."""
    return sum(F.l1_loss(f, r.detach()) / len(fake)
               for fs, rs in zip(fake, real, strict=True) for f, r in zip(fs[:-1], rs[:-1], strict=True))


def r1_penalty(preds: list[list[torch.Tensor]], real: torch.Tensor) -> torch.Tensor:
    """``E_x ||grad_x sum_scales mean D_s(x)||^2`` (``real`` must require grad)."""
    score = sum(p[-1].mean() for p in preds)
    (grad,) = torch.autograd.grad(score, real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def blur_sigma_at(images_seen: float, sigma: float, fade_images: float) -> float:
    """The real-image blur: ``sigma`` fading linearly to 0 after ``fade_images`` images."""
    if fade_images <= 0:
        return 0.0
    return max(1.0 - images_seen / fade_images, 0.0) * sigma


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable blur with the kernel ``2^(-(t / sigma)^2)``, t in [-floor(3 sigma), floor(3 sigma)],
    normalised, zero padding; ``x`` unchanged when that range is empty."""
    size = math.floor(sigma * 3)
    if size <= 0:
        return x
    t = torch.arange(-size, size + 1, device=x.device, dtype=x.dtype)
    k = torch.exp2(-(t / sigma).square())
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, size), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(size, 0), groups=c)
