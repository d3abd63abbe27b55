"""ISSA stage 2: train the masked noise encoder against the frozen stage-1 generator.

    dg-lightning issa fit --config experiments/issa/cityscapes_tiny_encoder.yaml

Loss (official weights, ``methods.md``), on real source images ``x`` and their reconstruction
``x^ = G(E(x))`` with 25 % of the noise patches masked:

    L_E = 1.0 * MSE_unmasked(x^, x) + 10 * LPIPS(x^, x) + 0.1 * hinge_G(D(x^)) + 0.2 * FM(D; x^, x)
          + lambda_w * ||E(G(w, n)).w+ - w||^2        (generated images with known w; 0.1 fading to 0)
          + 0.1 * KL(q(input noise | x) || N(0, 1)) + 0.1 * mean |noise maps|

The discriminator (initialised from stage 1) keeps training with the hinge loss on x vs x^.
LPIPS comes from the ``lpips`` package: its linear calibration layers ship in the wheel, its
AlexNet/VGG trunk needs ImageNet weights that cannot be downloaded here, so ``lpips_trunk:
random`` (the default offline) uses a randomly initialised trunk and ``none`` drops the term; say
which in any reported number. ``pretrained`` loads torchvision's weights (downloads on first use).
"""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from dg_lightning.methods.issa.encoder import (
    MaskedNoiseEncoder,
    feature_matching,
    hinge_d_loss,
    hinge_g_loss,
    kl_standard_normal,
    mask_noise,
    masked_mse,
    patch_mask,
    pixel_mask,
)
from dg_lightning.methods.issa.gan import StyleGAN2
from dg_lightning.methods.issa.generator import Generator


def make_lpips(trunk: Literal["random", "pretrained", "none"], net: str = "alex"):
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


class NoiseEncoderTraining(L.LightningModule):
    """Stage 2. ``generator_ckpt``: a stage-1 (``StyleGAN2``) checkpoint; its ``G_ema`` is frozen here
    and saved with this module's checkpoints, so stage 3 needs only this stage's checkpoint."""

    def __init__(self, generator_ckpt: str, noise_height: int | None = None, channels: int = 64,
                 lr: float = 1e-4, d_lr: float = 1e-4, betas: tuple[float, float] = (0.0, 0.99),
                 mask_ratio: float = 0.25, mask_patch: int = 4,
                 w_pixel: float = 1.0, w_lpips: float = 10.0, w_adv: float = 0.1, w_fm: float = 0.2,
                 w_latent: float = 0.1, latent_fade_steps: int = 2000, w_kl: float = 0.1, w_noise: float = 0.1,
                 lpips_trunk: Literal["random", "pretrained", "none"] = "random", lpips_net: str = "alex"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        gan = StyleGAN2.load_from_checkpoint(generator_ckpt, map_location="cpu")
        self.G = copy.deepcopy(gan.G_ema).requires_grad_(False).eval()
        self.D = copy.deepcopy(gan.D)
        self.E = MaskedNoiseEncoder(self.G, noise_height, channels)
        self.lpips = make_lpips(lpips_trunk, lpips_net)

    def train(self, mode: bool = True):
        super().train(mode)
        self.G.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def to_gan_range(self, x: torch.Tensor) -> torch.Tensor:
        size = self.G.size
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def latent_weight(self) -> float:
        """lambda_w: ``w_latent`` fading linearly to 0 over ``latent_fade_steps`` encoder steps."""
        steps = max(1, self.hparams.latent_fade_steps)
        return self.hparams.w_latent * max(0.0, 1.0 - self.global_step / 2 / steps)

    def reconstruct(self, x: torch.Tensor, masked: bool):
        """(reconstruction, encoder output, pixel mask or None) of ``x`` in [-1, 1]."""
        out = self.E(x)
        maps, pmask = out["noise_maps"], None
        if masked:
            m = patch_mask(x.shape[0], *maps.shape[-2:], self.hparams.mask_patch, self.hparams.mask_ratio,
                           device=x.device)
            maps = mask_noise(maps, m.expand_as(maps))
            pmask = pixel_mask(m, tuple(x.shape[-2:]))
        noise = self.E.generator_noise(out, sample=masked, noise_maps=maps)
        return self.G.synthesis(out["w_plus"], noise), out, pmask

    def encoder_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hparams
        recon, out, pmask = self.reconstruct(x, masked=True)
        fake_logits, fake_feats = self.D(recon, features=True)
        with torch.no_grad():
            _, real_feats = self.D(x, features=True)
        terms = {
            "pixel": masked_mse(recon, x, pmask),
            "adv": hinge_g_loss(fake_logits),
            "fm": feature_matching(fake_feats, real_feats),
            "kl": kl_standard_normal(out["input_mu"], out["input_logvar"]),
            "noise": out["noise_maps"].abs().mean(),
        }
        terms["lpips"] = self.lpips(recon, x).mean() if self.lpips is not None else recon.new_zeros(())
        lam_w = self.latent_weight()
        if lam_w > 0:  # generated images whose w+ is known
            with torch.no_grad():
                w_gt = self.G.z_to_w_plus(torch.randn(x.shape[0], self.G.w_dim, device=x.device))
                x_gen = self.G.synthesis(w_gt, self.G.random_noise(x.shape[0], x.device))
            terms["latent"] = (self.E(x_gen)["w_plus"] - w_gt).pow(2).mean()
        else:
            terms["latent"] = x.new_zeros(())
        terms["loss"] = (h.w_pixel * terms["pixel"] + h.w_lpips * terms["lpips"] + h.w_adv * terms["adv"]
                         + h.w_fm * terms["fm"] + lam_w * terms["latent"] + h.w_kl * terms["kl"]
                         + h.w_noise * terms["noise"])
        return terms, recon

    def training_step(self, batch, batch_idx):
        x = self.to_gan_range(batch[0])
        opt_e, opt_d = self.optimizers()
        self.D.requires_grad_(False)
        terms, recon = self.encoder_losses(x)
        opt_e.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        opt_e.step()
        self.D.requires_grad_(True)
        d_loss = hinge_d_loss(self.D(x), self.D(recon.detach()))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, on_epoch=True,
                      prog_bar=False, batch_size=len(x))
        self.log("train/d_hinge", d_loss.detach(), on_step=True, batch_size=len(x))

    @torch.no_grad()
    def reconstruction_quality(self, x: torch.Tensor) -> dict[str, float]:
        """PSNR (dB) and, when a trunk is loaded, LPIPS of the unmasked reconstructions of ``x`` ([0, 1])."""
        x = self.to_gan_range(x)
        recon, _, _ = self.reconstruct(x, masked=False)
        out = {"psnr": float(psnr(recon, x).mean())}
        if self.lpips is not None:
            out["lpips"] = float(self.lpips(recon, x).mean())
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what stage 3 needs to rebuild G and E from this checkpoint alone (see ``load_inverter``)
        checkpoint["issa"] = {"gan": dict(self.G.config),
                              "encoder": {"noise_height": self.E.noise_height,
                                          "channels": self.hparams.channels}}

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        return (torch.optim.Adam(self.E.parameters(), lr=self.hparams.lr, betas=betas),
                torch.optim.Adam(self.D.parameters(), lr=self.hparams.d_lr, betas=betas))


def load_inverter(path: str, map_location="cpu") -> tuple[Generator, MaskedNoiseEncoder]:
    """The frozen generator and encoder of a stage-2 checkpoint (no stage-1 file needed)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "issa" not in ckpt:
        raise ValueError(f"{path} is not an ISSA stage-2 (NoiseEncoderTraining) checkpoint")
    g_args, e_args = ckpt["issa"]["gan"], ckpt["issa"]["encoder"]
    G = Generator(**{**g_args, "size": tuple(g_args["size"])})
    E = MaskedNoiseEncoder(G, e_args["noise_height"], e_args["channels"])
    state = ckpt["state_dict"]
    G.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("G.")})
    E.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("E.")})
    return G.eval().requires_grad_(False), E.eval().requires_grad_(False)
