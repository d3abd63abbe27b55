"""ISSA stage 2: train the masked noise encoder against the frozen stage-1 generator.

    dg-lightning issa fit --config experiments/issa/cityscapes_tiny_encoder.yaml

Follows the official ``train_encoder.py``, ``load_config.py``, ``configs/mne_training.yml`` and
``training/loss.py`` (``MixEncoderDiscriminatorLoss.multi_accumulate``) of boschresearch/ISSA.
Each batch holds ``n`` real source images and ``n`` generated ones ``G(w, noise)`` with known w
(the official fake set: random z, random noise). Encoder phase, on the 2n images ``x`` and their
masked reconstructions ``x^ = G(E(x))`` (every noise layer masked on its own, ``encoder.mask_layers``):

    L_E = 1.0 * MSE_kept(x^, x) + 10 * LPIPS(x^, x)                     (both halves)
          + 0.1 * hinge_G(D(x^_real)) + 0.2 * FM(D; x^_real, x_real)    (real half)
          + lambda_w * ||E(x_gen).w+ - w||^2                            (generated half)
          + 0.1 * KL(input noise) + 0.1 * mean |noise maps|            (both halves)

lambda_w = 0.1 held for ``latent_hold_images`` images, then linearly to 0 at ``latent_fade_images``
(official ``cooldown``: 200k and 500k images). Then the discriminator (``discriminator.
MultiScalePatchGAN``, from scratch, Adam lr 1e-5, betas (0, 0.99)): hinge loss on the (blurred)
real half against the reconstructions of the real half; every ``r1_every`` batches a separate R1
step (gamma ``r1_gamma``, weighted by the interval; the optimiser's lr and betas scaled by
``interval / (interval + 1)`` as StyleGAN2's lazy regularisation). The real images the
discriminator sees are blurred, sigma ``blur_sigma`` fading to 0 over ``blur_fade_images`` (official
10 px at 512 px width over 200k images). "Images seen" counts both halves (official ``cur_nimg``).

The encoder's exponential moving average (half-life ``ema_images`` images, ramped up as
``min(ema_images, 0.05 * images seen)``; official ``ema_kimg`` 10, ``ema_rampup`` 0.05) is what the
checkpoint gives to stage 3 (``load_inverter``), as the official snapshots hold ``E=encoder_ema``.

Optimiser: ``optimizer: ranger`` is the official choice (lr 1e-4, cosine decay to ``lr_min`` between
batches ``lr_decay_start`` and ``lr_decay_end``, official 100k and 250k): RAdam (torch) inside
Lookahead (timm; k 6, alpha 0.5), betas (0.95, 0.999), eps 1e-5 as the official ``Ranger``, whose
gradient centralisation is left out (no maintained implementation). ``adam`` (betas ``betas``) is
the tiny configuration's choice: at a few hundred steps Lookahead's slow weights lag behind.

Differences kept on purpose, each an option: ``d_refresh_fakes: false`` (tiny) lets the
discriminator see the encoder step's own reconstructions instead of a second, fresh masked
inversion after the encoder update (official; one encoder + generator pass less per batch);
``lpips_trunk: random`` (offline: no ImageNet VGG/AlexNet trunk can be downloaded, so LPIPS is
the ``lpips`` package's calibrated linear layers on a trunk drawn from a fixed seed; say so next
to any LPIPS number); the official network is VGG (``lpips_net: vgg``), ``alex`` is cheaper.
The official ADA augmentation pipe is commented out in ``train_encoder.py``; it is not used here.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from dg_lightning.methods.issa.discriminator import (
    MultiScalePatchGAN,
    blur,
    blur_sigma_at,
    feature_matching,
    hinge_d_fake,
    hinge_d_real,
    hinge_g,
    r1_penalty,
)
from dg_lightning.methods.issa.encoder import (
    MaskedNoiseEncoder,
    input_noise_kl,
    mask_layers,
    masked_mse,
    noise_l1,
)
from dg_lightning.methods.issa.gan import StyleGAN2
from dg_lightning.methods.issa.generator import Generator


def make_lpips(trunk: Literal["random", "pretrained", "none"], net: str = "vgg"):
    if trunk == "none":
        return None
    import lpips

    # the random trunk is drawn from a fixed seed: the same network in every run, so numbers compare
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=trunk == "random", verbose=False)
    return model.eval().requires_grad_(False)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def latent_weight(images_seen: float, w_latent: float, hold: float, fade_end: float) -> float:
    """lambda_w: ``w_latent`` until ``hold`` images, then linearly to 0 at ``fade_end`` (official ``cooldown``)."""
    if images_seen < hold:
        return w_latent
    if images_seen > fade_end:
        return 0.0
    return w_latent * (fade_end - images_seen) / max(fade_end - hold, 1e-8)


def ema_beta(images_seen: float, batch_images: int, ema_images: float, rampup: float | None) -> float:
    """Official encoder-EMA decay per batch: half-life ``min(ema_images, rampup * images seen)`` images."""
    horizon = ema_images if rampup is None else min(ema_images, images_seen * rampup)
    return 0.5 ** (batch_images / max(horizon, 1e-8))


class NoiseEncoderTraining(L.LightningModule):
    """Stage 2. ``generator_ckpt``: a stage-1 (``StyleGAN2``) checkpoint; its ``G_ema`` is frozen here
    and saved with this module's checkpoints, so stage 3 needs only this stage's checkpoint."""

    def __init__(self, generator_ckpt: str, noise_height: int | None = None, channels: int = 64,
                 backbone: Literal["compact", "fpn_resnet50"] = "fpn_resnet50", fpn_dim: int = 1024,
                 noise_out: Literal["leaky_relu", "linear"] = "leaky_relu",
                 optimizer: Literal["ranger", "adam"] = "ranger", lr: float = 1e-4,
                 betas: tuple[float, float] = (0.0, 0.99), lr_min: float = 1e-5,
                 lr_decay_start: int | None = 100_000, lr_decay_end: int | None = 250_000,
                 d_lr: float = 1e-5, d_betas: tuple[float, float] = (0.0, 0.99), d_ndf: int = 64,
                 r1_gamma: float = 0.1, r1_every: int = 16,
                 blur_sigma: float = 10.0, blur_fade_images: float = 200_000,
                 mask_ratio: float = 0.25, mask_patch: int = 4,
                 w_pixel: float = 1.0, w_lpips: float = 10.0, w_adv: float = 0.1, w_fm: float = 0.2,
                 w_latent: float = 0.1, latent_hold_images: float = 200_000, latent_fade_images: float = 500_000,
                 w_kl: float = 0.1, w_noise: float = 0.1,
                 ema_images: float = 10_000, ema_rampup: float | None = 0.05, d_refresh_fakes: bool = True,
                 lpips_trunk: Literal["random", "pretrained", "none"] = "random", lpips_net: str = "vgg"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        gan = StyleGAN2.load_from_checkpoint(generator_ckpt, map_location="cpu")
        self.G = copy.deepcopy(gan.G_ema).requires_grad_(False).eval()
        self.E = MaskedNoiseEncoder(self.G, noise_height, channels, backbone, fpn_dim, noise_out)
        self.E_ema = copy.deepcopy(self.E).requires_grad_(False).eval()
        self.D = MultiScalePatchGAN(ndf=d_ndf)
        self.lpips = make_lpips(lpips_trunk, lpips_net)
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.float64))

    def train(self, mode: bool = True):
        super().train(mode)
        self.G.eval(), self.E_ema.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def to_gan_range(self, x: torch.Tensor) -> torch.Tensor:
        size = self.G.size
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def reconstruct(self, E: MaskedNoiseEncoder, x: torch.Tensor, masked: bool):
        """(reconstruction, encoder output, pixel keep mask (ones when unmasked)) of ``x`` in [-1, 1]."""
        out = E(x)
        maps, keep = out["noise_maps"], x.new_ones(x.shape[0], 1, *x.shape[-2:])
        if masked:
            maps, keep, _ = mask_layers(maps, tuple(x.shape[-2:]), self.hparams.mask_patch, self.hparams.mask_ratio)
        return self.G.synthesis(out["w_plus"], E.generator_noise(out, maps), noise_mode="const"), out, keep

    @torch.no_grad()
    def generated_half(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images ``G(w, random noise)`` and their w+ (one w repeated, as the official fake set)."""
        w_gt = self.G.z_to_w_plus(torch.randn(n, self.G.w_dim, device=self.device))
        return self.G.synthesis(w_gt, self.G.random_noise(n, self.device)), w_gt

    def encoder_losses(self, real: torch.Tensor, gen: torch.Tensor, w_gt: torch.Tensor):
        h, n = self.hparams, real.shape[0]
        x = torch.cat([real, gen])
        recon, out, keep = self.reconstruct(self.E, x, masked=True)
        fake_preds = self.D(recon[:n])
        with torch.no_grad():
            real_preds = self.D(real)
        lam_w = latent_weight(float(self.images_seen), h.w_latent, h.latent_hold_images, h.latent_fade_images)
        terms = {
            "pixel": masked_mse(recon, x, keep),
            "adv": hinge_g(fake_preds),
            "fm": feature_matching(fake_preds, real_preds),
            "latent": F.mse_loss(out["w_plus"][n:], w_gt),
            "kl": input_noise_kl(out["input_noise"]),
            "noise": noise_l1(out["noise_maps"]),
        }
        terms["lpips"] = self.lpips(recon, x).mean() if self.lpips is not None else recon.new_zeros(())
        terms["loss"] = (h.w_pixel * terms["pixel"] + h.w_lpips * terms["lpips"] + h.w_adv * terms["adv"]
                         + h.w_fm * terms["fm"] + lam_w * terms["latent"] + h.w_kl * terms["kl"]
                         + h.w_noise * terms["noise"])
        terms["lambda_w"] = torch.tensor(lam_w)
        return terms, recon[:n]

    def training_step(self, batch, batch_idx):
        h = self.hparams
        real = self.to_gan_range(batch[0])
        n = real.shape[0]
        gen, w_gt = self.generated_half(n)
        opt_e, opt_d = self.optimizers()
        # encoder
        self.D.requires_grad_(False)
        terms, recon = self.encoder_losses(real, gen, w_gt)
        opt_e.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        opt_e.step()
        self.set_encoder_lr(opt_e)
        # discriminator: hinge on reconstructions of the real half vs the blurred real half
        self.D.requires_grad_(True)
        if h.d_refresh_fakes:
            with torch.no_grad():
                recon = self.reconstruct(self.E, real, masked=True)[0]
        sigma = blur_sigma_at(float(self.images_seen), h.blur_sigma, h.blur_fade_images)
        d_fake, d_real = hinge_d_fake(self.D(recon.detach())), hinge_d_real(self.D(blur(real, sigma)))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_fake + d_real)
        opt_d.step()
        logs = {**terms, "d_fake": d_fake, "d_real": d_real, "blur_sigma": torch.tensor(sigma)}
        if h.r1_every > 0 and batch_idx % h.r1_every == 0:  # lazy R1: its own step, weighted by the interval
            real_in = real.detach().requires_grad_(True)
            r1 = r1_penalty(self.D(blur(real_in, sigma)), real_in)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(r1 * (h.r1_gamma / 2) * h.r1_every)
            opt_d.optimizer.step()  # the wrapped optimiser: not counted as a trainer step
            logs["r1"] = r1
        self.D.requires_grad_(False)
        self.update_ema(2 * n)
        self.images_seen += 2 * n
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items()}, on_step=True, on_epoch=True,
                      prog_bar=False, batch_size=n)

    @torch.no_grad()
    def update_ema(self, batch_images: int) -> None:
        beta = ema_beta(float(self.images_seen), batch_images, self.hparams.ema_images, self.hparams.ema_rampup)
        for p_ema, p in zip(self.E_ema.parameters(), self.E.parameters(), strict=True):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.E_ema.buffers(), self.E.buffers(), strict=True):
            b_ema.copy_(b)

    def set_encoder_lr(self, opt) -> None:
        """Official ``update_learning_rate``: cosine from ``lr`` to ``lr_min`` between the decay batches."""
        h = self.hparams
        i = self.global_step // 2  # two counted steps (encoder, discriminator) per batch
        if h.lr_decay_start is None or h.lr_decay_end is None or i < h.lr_decay_start or i >= h.lr_decay_end:
            return
        t = (i - h.lr_decay_start) / (h.lr_decay_end - h.lr_decay_start)
        for group in opt.optimizer.param_groups:
            group["lr"] = h.lr_min + 0.5 * (h.lr - h.lr_min) * (1 + math.cos(t * math.pi))

    @torch.no_grad()
    def reconstruction_quality(self, x: torch.Tensor) -> dict[str, float]:
        """PSNR (dB) and, when a trunk is loaded, LPIPS of the EMA encoder's unmasked reconstructions of
        ``x`` ([0, 1])."""
        x = self.to_gan_range(x)
        recon, _, _ = self.reconstruct(self.E_ema, x, masked=False)
        out = {"psnr": float(psnr(recon, x).mean())}
        if self.lpips is not None:
            out["lpips"] = float(self.lpips(recon, x).mean())
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what stage 3 needs to rebuild G and E from this checkpoint alone (see ``load_inverter``)
        checkpoint["issa"] = {"gan": dict(self.G.config), "encoder": self.E.config()}

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "ranger":
            from timm.optim import Lookahead

            opt_e = Lookahead(torch.optim.RAdam(self.E.parameters(), lr=h.lr, betas=(0.95, 0.999), eps=1e-5),
                              alpha=0.5, k=6)
        elif h.optimizer == "adam":
            opt_e = torch.optim.Adam(self.E.parameters(), lr=h.lr, betas=tuple(h.betas))
        else:
            raise ValueError(f"optimizer must be 'ranger' or 'adam', got {h.optimizer!r}")
        ratio = h.r1_every / (h.r1_every + 1) if h.r1_every > 0 else 1.0  # lazy regularisation
        opt_d = torch.optim.Adam(self.D.parameters(), lr=h.d_lr * ratio, betas=tuple(b ** ratio for b in h.d_betas),
                                 eps=1e-8)
        return opt_e, opt_d


def load_inverter(path: str, map_location="cpu") -> tuple[Generator, MaskedNoiseEncoder]:
    """The frozen generator and the encoder's EMA of a stage-2 checkpoint (no stage-1 file needed)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "issa" not in ckpt:
        raise ValueError(f"{path} is not an ISSA stage-2 (NoiseEncoderTraining) checkpoint")
    g_args, e_args = ckpt["issa"]["gan"], ckpt["issa"]["encoder"]
    if "backbone" not in e_args:
        raise ValueError(f"{path} was written by the earlier single-channel ISSA encoder; retrain stage 2 "
                         "(its noise maps do not fit this generator's multi-channel noise inputs)")
    G = Generator(**{**g_args, "size": tuple(g_args["size"])})
    E = MaskedNoiseEncoder(G, **{"noise_out": "linear", **e_args})  # written before noise_out: signed maps
    state = ckpt["state_dict"]
    G.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("G.")})
    E.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("E_ema.")})
    return G.eval().requires_grad_(False), E.eval().requires_grad_(False)
