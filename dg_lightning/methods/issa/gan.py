"""ISSA stage 1: a StyleGAN2 generator trained on the source domain's images.

    dg-lightning fit --config experiments/issa/cityscapes_tiny_gan.yaml

Non-saturating logistic GAN loss, lazy R1 on real images every ``r1_every`` steps (weighted by
``r1_every`` so the average penalty is ``r1_gamma / 2 * E||grad D(x)||^2``), style-mixing
regularisation, an exponential moving average of the generator (``G_ema``: what the next stages
load) and the running mean of w (``w_avg``, the encoder's starting point). Adam with
betas (0, 0.99), as StyleGAN2. Images are scaled to [-1, 1].
"""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dg_lightning.core.data import DomainBalancedSampler, ShardSampler, rank_world
from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.methods.issa.generator import Discriminator, Generator


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)), batch means."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(-D(G(z))), batch mean."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over real images (``real`` must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class StyleGAN2(L.LightningModule):
    """Generator + discriminator training (manual optimisation: D step, then G step).

    Args:
        size: image (height, width); w_dim, n_mlp, channel_base, channel_max: see ``Generator``.
        lr / betas: Adam for both networks; r1_gamma / r1_every: lazy R1; ema_beta: G_ema decay.
        style_mixing_prob: probability of mixing two w's at a random layer (regularisation).
        noise_init: the generator's starting noise strengths (``Generator``).
    """

    def __init__(self, size: tuple[int, int] = (64, 128), w_dim: int = 512, n_mlp: int = 8,
                 channel_base: int = 16384, channel_max: int = 512, lr: float = 0.002,
                 betas: tuple[float, float] = (0.0, 0.99), r1_gamma: float = 10.0, r1_every: int = 16,
                 ema_beta: float = 0.999, style_mixing_prob: float = 0.9, w_avg_beta: float = 0.995,
                 noise_init: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        size = tuple(size)
        self.G = Generator(size, w_dim, n_mlp, channel_base, channel_max, noise_init)
        self.D = Discriminator(size, channel_base, channel_max)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False).eval()

    def sample_w_plus(self, n: int) -> torch.Tensor:
        """w+ of random z, with style mixing: past a random layer, the w of a second z."""
        g = self.G
        w = g.mapping(torch.randn(n, g.w_dim, device=self.device))
        w_plus = w.unsqueeze(1).repeat(1, g.num_ws, 1)
        if self.hparams.style_mixing_prob > 0 and torch.rand(()) < self.hparams.style_mixing_prob:
            cut = int(torch.randint(1, g.num_ws, ()))
            w_plus[:, cut:] = g.mapping(torch.randn(n, g.w_dim, device=self.device)).unsqueeze(1)
        if self.training:
            with torch.no_grad():
                g.w_avg.lerp_(w.detach().float().mean(0), 1 - self.hparams.w_avg_beta)  # autocast: w may be bf16
        return w_plus

    def to_gan_range(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images resized to the generator's size, in [-1, 1]."""
        if tuple(x.shape[-2:]) != tuple(self.hparams.size):
            x = F.interpolate(x, size=tuple(self.hparams.size), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def training_step(self, batch, batch_idx):
        real = self.to_gan_range(batch[0])
        n = real.shape[0]
        opt_g, opt_d = self.optimizers()
        # discriminator
        self.D.requires_grad_(True)
        with torch.no_grad():
            fake = self.G.synthesis(self.sample_w_plus(n))
        r1_step = self.hparams.r1_every > 0 and self.global_step // 2 % self.hparams.r1_every == 0
        real_in = real.detach().requires_grad_(r1_step)
        real_logits = self.D(real_in)
        d_loss = d_logistic_loss(real_logits, self.D(fake))
        if r1_step:
            r1 = r1_penalty(real_logits, real_in)
            d_loss = d_loss + self.hparams.r1_gamma / 2 * r1 * self.hparams.r1_every
            self.log("train/r1", r1.detach(), on_step=True)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        # generator
        self.D.requires_grad_(False)
        g_loss = g_nonsaturating_loss(self.D(self.G.synthesis(self.sample_w_plus(n))))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
                p_ema.lerp_(p, 1 - self.hparams.ema_beta)
            self.G_ema.w_avg.copy_(self.G.w_avg)
        self.log_dict({"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach()}, prog_bar=True,
                      on_step=True, on_epoch=True, batch_size=n)

    def configure_optimizers(self):
        lr, betas = self.hparams.lr, tuple(self.hparams.betas)
        return (torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(self.D.parameters(), lr=lr, betas=betas))


class SourceImages(L.LightningDataModule):
    """The source images of a segmentation dataset, for the GAN stages: ``(image [0, 1], 0, 0, i)``,
    resized to ``size`` (height, width), randomly flipped; labels are not read."""

    task = "generation"

    def __init__(self, source: SegmentationSet, size: tuple[int, int] = (64, 128), batch_size: int = 16,
                 steps_per_epoch: int = 500, flip: bool = True, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.source, self.size, self.flip, self.seed = source, tuple(size), flip, seed
        self.batch_size, self.steps_per_epoch, self.num_workers = batch_size, steps_per_epoch, num_workers

    def dataset(self) -> Dataset:
        return _Images(self.source, self.size, self.flip)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset()
        rank, world = rank_world(self)
        sampler = DomainBalancedSampler([len(ds)], self.batch_size, self.steps_per_epoch, self.seed, rank, world)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def eval_dataloader(self, batch_size: int = 16) -> DataLoader:
        ds = _Images(self.source, self.size, flip=False)
        return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds)))


class _Images(Dataset):
    def __init__(self, source, size, flip):
        self.source, self.size, self.flip = source, size, flip

    def __len__(self) -> int:
        return len(self.source.pairs)

    def __getitem__(self, key):
        from PIL import Image

        i, seed = key if isinstance(key, tuple) else (key, None)
        img = Image.open(self.source.pairs[i][0]).convert("RGB").resize(self.size[::-1], Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        if self.flip and seed is not None and seed % 2:
            x = x.flip(-1)
        return x, 0, 0, i
