"""Multi-space style disentanglement (Eastwood et al., ICML 2023, "Self-Supervised Disentanglement
by Leveraging Structure in Data Augmentations").

Instead of discarding style by augmentation invariance, keep one embedding space per augmentation
group. Views of an image (:class:`GroupedAugment`): a query ``q ~ t``, a content key ``k_0`` with
every parameter resampled, and per style group ``g`` a key ``k_g`` that reuses ``q``'s parameters of
group ``g`` and resamples all others; space ``g`` is thereby asked to be invariant to every group
but ``g``. The projector output is split into ``M + 1`` chunks (content, then one per style group;
``fractions``), each L2-normalised, and trained with

    L = (1/(M+1)) sum_i lambda_i * ( -<z_q^(i), z_{k_i}^(i)> / tau )                  alignment
        + mean_n log sum_m exp(<Z_q^n, Z_k^m> / tau),  Z = concat_i z^(i) / sqrt(M+1)  joint uniformity

(``tau = 0.15``; with every ``lambda_i = 1`` this is InfoNCE on the joint vectors), or the VICReg
variant: per-space invariance (weight 25) plus variance (25) and covariance (1) of the joint vector,
on unnormalised chunks. Optional dual ascent makes each ``lambda_i`` a Lagrange multiplier of the
constraint "misalignment of space i <= tolerance": ``lambda_i <- max(0, lambda_i + lr * (a_i - tol))``
with ``a_i = mean(1 - cos)`` (SimCLR) or the space's invariance MSE (VICReg).

Linear probes (:class:`dg_lightning.methods.ssl.SSLMethod`): the content space (primary, ``acc``),
each style space (``acc_style_<group>``) and the backbone features (``acc_full``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss
from lightly.models.modules.heads import SimCLRProjectionHead
from torchvision.transforms import ColorJitter, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from dg_lightning.methods.ssl import SSLMethod

GROUPS = ("color", "texture", "crop", "affine")


class GroupedAugment:
    """The parameter-sharing augmentation pipeline: ``__call__(img) -> [q, k_0, k_g for g in style_groups]``.

    Parameters are drawn per group (``sample``) and applied in a fixed order (crop, affine, colour,
    texture). Groups (official): ``color`` (jitter, grayscale, solarize, equalize), ``texture``
    (Gaussian blur), ``crop`` (random resized crop), ``affine`` (rotation, horizontal flip).
    Randomness comes from torch's generator, which the data pipeline seeds per sample.
    """

    def __init__(self, image_size: int, style_groups: tuple[str, ...] | list[str] = GROUPS,
                 crop_scale: tuple[float, float] = (0.08, 1.0), jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_prob: float = 0.8, gray_prob: float = 0.2, solarize_prob: float = 0.2, equalize_prob: float = 0.2,
                 blur_prob: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), max_rotation: float = 30.0,
                 flip_prob: float = 0.5):
        unknown = set(style_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown augmentation group(s) {sorted(unknown)}: choose from {GROUPS}")
        self.size, self.style_groups = image_size, tuple(style_groups)
        self.crop_scale, self.jitter, self.jitter_prob = tuple(crop_scale), tuple(jitter), jitter_prob
        self.gray_prob, self.solarize_prob, self.equalize_prob = gray_prob, solarize_prob, equalize_prob
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.max_rotation, self.flip_prob = max_rotation, flip_prob

    @staticmethod
    def _u(a: float = 0.0, b: float = 1.0) -> float:
        return float(torch.empty(1).uniform_(a, b))

    def sample(self, img: torch.Tensor) -> dict[str, dict]:
        """Fresh parameters of every group for ``img`` (a CHW tensor)."""
        b, c, s, h = self.jitter
        order, *factors = ColorJitter.get_params((max(0, 1 - b), 1 + b), (max(0, 1 - c), 1 + c),
                                                 (max(0, 1 - s), 1 + s), (-h, h))
        return {
            "crop": {"box": tuple(RandomResizedCrop.get_params(img, list(self.crop_scale), [3 / 4, 4 / 3]))},
            "affine": {"angle": self._u(-self.max_rotation, self.max_rotation), "flip": self._u() < self.flip_prob},
            "color": {"jitter": self._u() < self.jitter_prob, "order": order.tolist(), "factors": [float(f) for f in factors],
                      "gray": self._u() < self.gray_prob, "solarize": self._u() < self.solarize_prob,
                      "equalize": self._u() < self.equalize_prob},
            "texture": {"blur": self._u() < self.blur_prob, "sigma": self._u(*self.blur_sigma)},
        }

    def view_params(self, img: torch.Tensor) -> list[dict[str, dict]]:
        """Parameters of [q, k_0, k_g...]: k_g = fresh parameters with q's for group g."""
        q = self.sample(img)
        keys = [self.sample(img)]
        for g in self.style_groups:
            keys.append({**self.sample(img), g: q[g]})
        return [q, *keys]

    def apply(self, img: torch.Tensor, p: dict[str, dict]) -> torch.Tensor:
        """One view of a uint8 CHW image: float [0, 1], ``image_size`` square."""
        i, j, h, w = p["crop"]["box"]
        out = TF.resized_crop(img, i, j, h, w, [self.size, self.size], antialias=True)
        if p["affine"]["flip"]:
            out = TF.horizontal_flip(out)
        out = TF.rotate(out, p["affine"]["angle"])
        col = p["color"]
        if col["jitter"]:
            adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
            for k in col["order"]:
                out = adjust[k](out, col["factors"][k])
        if col["gray"]:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if col["solarize"]:
            out = TF.solarize(out, threshold=128)
        if col["equalize"]:
            out = TF.equalize(out)
        if p["texture"]["blur"]:
            k = max(3, int(0.1 * self.size) // 2 * 2 + 1)
            sigma = p["texture"]["sigma"]
            out = TF.gaussian_blur(out, [k, k], [sigma, sigma])
        return TF.to_dtype(out, torch.float32, scale=True)

    def __call__(self, img) -> list[torch.Tensor]:
        img = TF.to_image(img)
        if img.dtype != torch.uint8:
            img = TF.to_dtype(img, torch.uint8, scale=True)
        return [self.apply(img, p) for p in self.view_params(img)]


def split_chunks(z: torch.Tensor, sizes: list[int], normalize: bool) -> list[torch.Tensor]:
    chunks = list(z.split(sizes, dim=1))
    return [F.normalize(c, dim=1) for c in chunks] if normalize else chunks


def multispace_simclr_loss(zq: list[torch.Tensor], zk: list[torch.Tensor], lambdas: torch.Tensor,
                           tau: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-space misalignment ``mean(1 - cos)``) for L2-normalised chunks ``zq[i]``, ``zk[i]``
    (query and key ``i``, each (N, d_i)); see the module docstring for the equation."""
    m1 = len(zq)
    cos = torch.stack([(q * k).sum(dim=1).mean() for q, k in zip(zq, zk, strict=True)])
    alignment = (lambdas * (-cos / tau)).sum() / m1
    joint_q, joint_k = torch.cat(zq, dim=1) / math.sqrt(m1), torch.cat(zk, dim=1) / math.sqrt(m1)
    uniformity = torch.logsumexp(joint_q @ joint_k.T / tau, dim=1).mean()
    return alignment + uniformity, (1.0 - cos).detach()


def multispace_vicreg_loss(zq: list[torch.Tensor], zk: list[torch.Tensor], lambdas: torch.Tensor,
                           inv_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-space invariance MSE): per-space invariance, joint variance and covariance
    (lightly's VICReg terms; variance averaged and covariance summed over the two branches, as VICReg)."""
    m1 = len(zq)
    inv = torch.stack([invariance_loss(q, k) for q, k in zip(zq, zk, strict=True)])
    joint_q, joint_k = torch.cat(zq, dim=1), torch.cat(zk, dim=1)
    var = 0.5 * (variance_loss(joint_q) + variance_loss(joint_k))
    cov = covariance_loss(joint_q) + covariance_loss(joint_k)
    loss = inv_weight * (lambdas * inv).sum() / m1 + var_weight * var + cov_weight * cov
    return loss, inv.detach()


def chunk_sizes(dim: int, fractions: list[float]) -> list[int]:
    """Sizes of the chunks of a ``dim``-d embedding for ``fractions`` (normalised; the last takes
    the rounding remainder); every chunk gets at least one dimension."""
    total = sum(fractions)
    sizes = [max(1, int(round(dim * f / total))) for f in fractions[:-1]]
    sizes.append(dim - sum(sizes))
    if sizes[-1] < 1:
        raise ValueError(f"fractions {fractions} leave no dimension for the last space of {dim}")
    return sizes


class MultiSpace(SSLMethod):
    """Multi-space style disentanglement (see module docstring).

    Args:
        style_groups: one style space (and one key view) per group, from ``color``, ``texture``,
            ``crop``, ``affine``.
        fractions: sizes of the content space then each style space, as fractions of ``proj_dim``
            (default: content 1/2, the rest shared equally).
        proj_hidden / proj_dim: projector (lightly's SimCLR head) sizes.
        loss: ``simclr`` (multi-head InfoNCE, ``temperature`` 0.15) or ``vicreg`` (weights 25/25/1).
        lambdas: initial per-space alignment weights (default all 1).
        dual_ascent / dual_lr / dual_tolerance: update the lambdas by dual ascent.
        augment: keyword arguments of :class:`GroupedAugment` (crop scale, probabilities, ...).
        (everything else: :class:`dg_lightning.methods.ssl.SSLMethod`)
    """

    probe_part = "content"

    def __init__(
        self,
        style_groups: list[str] = ["color", "texture", "crop", "affine"],  # noqa: B006 (jsonargparse literal)
        fractions: list[float] | None = None,
        proj_hidden: int = 2048,
        proj_dim: int = 128,
        loss: Literal["simclr", "vicreg"] = "simclr",
        temperature: float = 0.15,
        vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0),
        lambdas: list[float] | None = None,
        dual_ascent: bool = False,
        dual_lr: float = 0.01,
        dual_tolerance: float = 0.1,
        augment: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        m = len(style_groups)
        fractions = list(fractions) if fractions is not None else [0.5] + [0.5 / m] * m
        if len(fractions) != m + 1:
            raise ValueError(f"fractions needs {m + 1} entries (content + {m} style groups), got {len(fractions)}")
        self.spaces = ["content"] + [f"style_{g}" for g in style_groups]
        self.sizes = chunk_sizes(proj_dim, fractions)
        self.projector = SimCLRProjectionHead(self.backbone.num_features, proj_hidden, proj_dim)
        init = torch.tensor(lambdas if lambdas is not None else [1.0] * (m + 1), dtype=torch.float32)
        if len(init) != m + 1:
            raise ValueError(f"lambdas needs {m + 1} entries, got {len(init)}")
        self.register_buffer("lambdas", init)
        self.build_probes()

    def train_views(self, image_size: int):
        return GroupedAugment(image_size, self.hparams.style_groups, **(self.hparams.augment or {}))

    def embed(self, h: torch.Tensor) -> list[torch.Tensor]:
        return split_chunks(self.projector(h), self.sizes, normalize=self.hparams.loss == "simclr")

    def representations(self, x):
        h = self.features(x)
        return {"full": h, **dict(zip(self.spaces, self.embed(h), strict=True))}

    def probe_dims(self):
        return {"full": self.backbone.num_features, **dict(zip(self.spaces, self.sizes, strict=True))}

    def space_loss(self, zq: list[torch.Tensor], zk: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.loss == "simclr":
            return multispace_simclr_loss(zq, zk, self.lambdas, self.hparams.temperature)
        return multispace_vicreg_loss(zq, zk, self.lambdas, *self.hparams.vicreg_weights)

    def training_losses(self, x, y, domain):
        views = list(x)
        if len(views) != len(self.spaces) + 1:
            raise ValueError(f"MultiSpace expects {len(self.spaces) + 1} views (q, k_0, one per style group), "
                             f"got {len(views)}: is the data module's train_transform overridden?")
        z = [self.embed(h) for h in self.encode_views(views)]
        zq = z[0]
        zk = [z[1 + i][i] for i in range(len(self.spaces))]  # key i, space i
        loss, misalignment = self.space_loss(zq, zk)
        self._misalignment = misalignment
        terms = {"loss": loss}
        for name, a, lam in zip(self.spaces, misalignment, self.lambdas, strict=True):
            terms[f"misalign_{name}"] = a
            terms[f"lambda_{name}"] = lam.detach().clone()
        return terms

    @torch.no_grad()
    def dual_step(self, misalignment: torch.Tensor) -> None:
        """lambda_i <- max(0, lambda_i + dual_lr * (a_i - dual_tolerance))."""
        self.lambdas.add_(self.hparams.dual_lr * (misalignment - self.hparams.dual_tolerance)).clamp_(min=0)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # after backward: the step's loss used the lambdas before this update
        if self.hparams.dual_ascent:
            self.dual_step(self._misalignment)
