"""Multi-space style disentanglement (Eastwood et al., ICML 2023, "Self-Supervised Disentanglement
by Leveraging Structure in Data Augmentations").

Official code followed: ``cianeastwood/ssl_disentangled`` (commit 2b317e5): ``algorithms.py``
(``SimCLRMultiHead.loss``, ``VICRegMultiHead.loss``, ``MultiHeadCL.precompute_z_split_inds``),
``augmentations.py`` (``build_dataset_transforms_det``, ``TrainTransformMultiViewParams``,
``TRANSFORM_GROUPS``), ``configs/imagenet/{dataset,simclrmultihead,vicregmultihead}.yaml`` and the
dual step of ``main.py`` (``update_lambdas``, ``inv_constraint_loss``).

Instead of discarding style by augmentation invariance, keep one embedding space per augmentation
group. Views of an image (:class:`GroupedAugment`): a query ``q ~ t``, a content key ``k_0 ~ t'``
with every parameter resampled, and per style group ``g`` a key ``k_g ~ t'`` that reuses ``q``'s
parameters of group ``g`` and resamples all others; space ``g`` is thereby asked to be invariant to
every group but ``g``. The projector output ``z`` (``D``-d) is split into ``M + 1`` chunks (content,
then one per style group; ``fractions``). With ``V = M + 2`` views of each of ``B`` images:

SimCLR multi-head (:func:`multispace_simclr_loss`, official ``SimCLRMultiHead.loss``)::

    z^(i)  = chunk i of z, L2-normalised;   Z = concat_i z^(i) / sqrt(M+1)     (unit joint norm)
    A_i    = mean_b( -<z_q^(i), z_{k_i}^(i)> / tau )                           alignment of space i
    L      = (1/(M+1)) sum_i lambda_i A_i
             + (1/(V B)) sum_{anchors a} log sum_{n in N(a)} exp(<Z_a, Z_n> / tau)

Every view of every image is an anchor; its negatives ``N(a)`` are all ``V`` views of every
*other* image of the global batch (no view of the anchor's own image, so no positive, in the sum).
``add_cont_neg`` adds the same entropy term on the content chunk of ``Z`` (as the official code: of
the joint vector already divided by ``sqrt(M+1)``). ``tau = 0.15``.

VICReg multi-head (:func:`multispace_vicreg_loss`, official ``VICRegMultiHead.loss``), on the
unnormalised ``z``::

    L = (1/(M+1)) sum_i lambda_i MSE(z_q^(i), z_{k_i}^(i))
        + 25 * (1/V) sum_views mean_d relu(1 - sqrt(Var_d + 1e-4))
        +  1 * (1/V) sum_views sum_{d != e} Cov_de^2 / D

(variance and covariance of each view over the global batch, unbiased; ``add_cont_neg`` adds both
terms of the content chunk, its covariance divided by the content size). The invariance weight is
the multiplier itself: the lambdas start at the official ``sim_coeff`` 25.

Misalignment (what dual ascent constrains; official ``inv_constraint_loss`` of each
``inv_constraint_i``, unweighted by lambda and without the 1/(M+1)): SimCLR ``A_i * tau + 1 =
1 - mean cos`` of space ``i``; VICReg the MSE of space ``i``. Dual ascent (official
``update_lambdas``): ``lambda_i <- max(0, lambda_i + lr * (a_i - tolerance))`` after each step.

Under DDP the views are gathered across ranks with gradients (lightly's ``gather``, the official
``FullGatherLayer``), so the mean of the ranks' losses and DDP's averaged gradients equal one
process on the global batch (``tests/test_ddp_equality.py``).

Deliberate differences from the official code:

* VICReg under DDP: the official code regroups the gathered rows with ``view(V, -1, D)``, which
  mixes the views of different ranks when ``world_size > 1``; here each view is regrouped over the
  ranks, so the statistics are per real view (the official single-GPU result) on any world size.
* The misalignment is averaged over DDP ranks before the dual step (officially each rank updates
  its own lambdas from its local value, so they can drift apart).
* The lambda step size is constant (official: a warm-up + cosine schedule of ``base_lr_lambda``);
  the default tolerance is 0.1 (official ``--tolerance`` 0). Dual ascent is off by default in both.
* One backbone/projector pass over all views of the same size (official: one per view, so batch
  norm statistics per view); the projector is lightly's SimCLR head (official: ``Projector`` with a
  bias-free last layer). Images reach the model in [0, 1] and are normalised there.
* Not carried over: ``exclude_fract``, ``m_cont_views``, the efficient data loader (``eff_mv_dl``),
  a separate style projector (``mlp_style``), the constrained crop (``constr_crop``): all off in
  the official defaults.
* Augmentation on uint8 tensors with torchvision's functional ops instead of PIL images; the blur
  is a Gaussian kernel truncated at 3 sigma (PIL's ``GaussianBlur`` approximates it with box
  filters).

Linear probes (:class:`dg_lightning.methods.ssl.SSLMethod`): the content space (primary, ``acc``),
each style space (``acc_style_<group>``) and the backbone features (``acc_full``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.modules.heads import SimCLRProjectionHead
from lightly.utils.dist import gather
from torchvision.transforms import ColorJitter, InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from dg_lightning.methods.ssl import SSLMethod

GROUPS = ("color", "texture", "crop", "affine")

# Official ImageNet augmentation presets (configs/imagenet/dataset.yaml, "medium" strengths).
# Pairs are (query view t, key views t'); ``asymmetric`` is the multi-head configs' ``aug_type``.
PRESETS: dict[str, dict] = {
    "asymmetric": {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_prob": 0.8, "gray_prob": 0.2,
                   "blur_prob": (1.0, 0.1), "solarize_prob": (0.0, 0.2), "equalize_prob": (0.0, 0.0)},
    "symmetric": {"jitter": (0.8, 0.8, 0.8, 0.2), "jitter_prob": 0.8, "gray_prob": 0.2,
                  "blur_prob": (0.5, 0.5), "solarize_prob": (0.0, 0.0), "equalize_prob": (0.0, 0.0)},
}


def _pair(p: float | tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    if isinstance(p, (int, float)):
        return float(p), float(p)
    if len(p) != 2:
        raise ValueError(f"{name} takes one probability or a (query, key) pair, got {p!r}")
    return float(p[0]), float(p[1])


class GroupedAugment:
    """The parameter-sharing augmentation pipeline: ``__call__(img) -> [q, k_0, k_g for g in style_groups]``.

    Official ``TrainTransformMultiViewParams`` on ``build_dataset_transforms_det`` (ImageNet). Order:
    random resized crop (bicubic), horizontal flip, rotation (off by default), colour jitter in a
    random order, grayscale, Gaussian blur, solarize, equalize. Groups (official
    ``TRANSFORM_GROUPS``): ``color`` (jitter, grayscale, solarize, equalize), ``texture`` (blur),
    ``crop``, ``affine`` (rotation, flip). ``q`` draws with the query probabilities, ``k_0`` and the
    style keys with the key probabilities; a style key then takes ``q``'s parameters (apply flags
    included) for its own group.

    ``preset`` (``asymmetric``, the official multi-head default, or ``symmetric``) fills every
    argument left ``None``; a probability may be one number or a (query, key) pair. Rotation:
    ``rotate=True`` turns it on with the official "medium" strength (p 0.5, +-40 degrees).
    Randomness comes from torch's generator, which the data pipeline seeds per sample.
    """

    def __init__(self, image_size: int, style_groups: tuple[str, ...] | list[str] = GROUPS,
                 preset: Literal["asymmetric", "symmetric"] = "asymmetric",
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip_prob: float = 0.5,
                 rotate: bool = False, rotation_prob: float = 0.5, max_rotation: float = 40.0,
                 jitter: tuple[float, float, float, float] | None = None, jitter_prob: float | None = None,
                 gray_prob: float | None = None, blur_prob: float | tuple[float, float] | None = None,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), solarize_prob: float | tuple[float, float] | None = None,
                 equalize_prob: float | tuple[float, float] | None = None):
        unknown = set(style_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown augmentation group(s) {sorted(unknown)}: choose from {GROUPS}")
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}: choose from {sorted(PRESETS)}")
        p = PRESETS[preset]
        self.size, self.style_groups = image_size, tuple(style_groups)
        self.crop_scale, self.flip_prob = tuple(crop_scale), flip_prob
        self.rotate, self.rotation_prob, self.max_rotation = rotate, rotation_prob, max_rotation
        self.jitter = tuple(jitter if jitter is not None else p["jitter"])
        self.jitter_prob = jitter_prob if jitter_prob is not None else p["jitter_prob"]
        self.gray_prob = gray_prob if gray_prob is not None else p["gray_prob"]
        self.blur_prob = _pair(blur_prob if blur_prob is not None else p["blur_prob"], "blur_prob")
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_prob = _pair(solarize_prob if solarize_prob is not None else p["solarize_prob"], "solarize_prob")
        self.equalize_prob = _pair(equalize_prob if equalize_prob is not None else p["equalize_prob"], "equalize_prob")

    @staticmethod
    def _u(a: float = 0.0, b: float = 1.0) -> float:
        return float(torch.empty(1).uniform_(a, b))

    def sample(self, img: torch.Tensor, view: int = 1) -> dict[str, dict]:
        """Fresh parameters of every group for ``img`` (a CHW tensor) with the probabilities of the
        query (``view=0``) or of a key (``view=1``)."""
        b, c, s, h = self.jitter
        order, *factors = ColorJitter.get_params((max(0, 1 - b), 1 + b), (max(0, 1 - c), 1 + c),
                                                 (max(0, 1 - s), 1 + s), (-h, h))
        rotation = self.rotate and self._u() < self.rotation_prob
        angle = self._u(-self.max_rotation, self.max_rotation) if self.rotate else 0.0
        return {
            "crop": {"box": tuple(RandomResizedCrop.get_params(img, list(self.crop_scale), [3 / 4, 4 / 3]))},
            "affine": {"flip": self._u() < self.flip_prob, "rotate": rotation, "angle": angle},
            "color": {"jitter": self._u() < self.jitter_prob, "order": order.tolist(), "factors": [float(f) for f in factors],
                      "gray": self._u() < self.gray_prob, "solarize": self._u() < self.solarize_prob[view],
                      "equalize": self._u() < self.equalize_prob[view]},
            "texture": {"blur": self._u() < self.blur_prob[view], "sigma": self._u(*self.blur_sigma)},
        }

    def view_params(self, img: torch.Tensor) -> list[dict[str, dict]]:
        """Parameters of [q, k_0, k_g...]: k_g = fresh key parameters with q's for group g."""
        q = self.sample(img, view=0)
        keys = [self.sample(img)]
        for g in self.style_groups:
            keys.append({**self.sample(img), g: q[g]})
        return [q, *keys]

    def apply(self, img: torch.Tensor, p: dict[str, dict]) -> torch.Tensor:
        """One view of a uint8 CHW image: float [0, 1], ``image_size`` square."""
        i, j, h, w = p["crop"]["box"]
        out = TF.resized_crop(img, i, j, h, w, [self.size, self.size], interpolation=InterpolationMode.BICUBIC,
                              antialias=True)
        if p["affine"]["flip"]:
            out = TF.horizontal_flip(out)
        if p["affine"]["rotate"]:
            out = TF.rotate(out, p["affine"]["angle"])
        col = p["color"]
        if col["jitter"]:
            adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
            for k in col["order"]:
                out = adjust[k](out, col["factors"][k])
        if col["gray"]:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if p["texture"]["blur"]:
            sigma = p["texture"]["sigma"]
            k = 2 * math.ceil(3 * sigma) + 1
            out = TF.gaussian_blur(out, [k, k], [sigma, sigma])
        if col["solarize"]:
            out = TF.solarize(out, threshold=128)
        if col["equalize"]:
            out = TF.equalize(out)
        return TF.to_dtype(out, torch.float32, scale=True)

    def __call__(self, img) -> list[torch.Tensor]:
        img = TF.to_image(img)
        if img.dtype != torch.uint8:
            img = TF.to_dtype(img, torch.uint8, scale=True)
        return [self.apply(img, p) for p in self.view_params(img)]


def split_chunks(z: torch.Tensor, sizes: list[int], normalize: bool) -> list[torch.Tensor]:
    chunks = list(z.split(sizes, dim=1))
    return [F.normalize(c, dim=1) for c in chunks] if normalize else chunks


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_rows(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` of every DDP rank, in rank order, with gradients flowing back to each rank's own rows
    (lightly's ``gather``); ``[x]`` outside DDP."""
    world, _ = _world()
    return list(gather(x.contiguous())) if world > 1 else [x]


def _check_views(views: list[torch.Tensor], sizes: list[int], lambdas: torch.Tensor) -> None:
    m1 = len(sizes)
    if len(views) != m1 + 1:
        raise ValueError(f"{m1} spaces need {m1 + 1} views (query, then one key per space), got {len(views)}")
    if len(lambdas) != m1:
        raise ValueError(f"{m1} spaces need {m1} lambdas, got {len(lambdas)}")
    for v in views:
        if v.ndim != 2 or v.shape != views[0].shape or v.shape[1] != sum(sizes):
            raise ValueError(f"every view must be (N, {sum(sizes)}) (the chunk sizes {sizes} summed), "
                             f"got {[tuple(u.shape) for u in views]}")


def _negative_entropy(z: torch.Tensor, z_all: torch.Tensor, n: int, tau: float) -> torch.Tensor:
    """mean over the local rows ``a`` of ``log sum_{other images' rows m} exp(<z_a, z_m> / tau)``.

    ``z``: this rank's ``(V n, d)`` rows, view-major (row ``v n + b`` is view ``v`` of image ``b``);
    ``z_all``: every rank's rows in rank order, so image ``b`` of rank ``r`` is ``r n + b``."""
    _, rank = _world()
    image = torch.arange(len(z), device=z.device) % n + rank * n
    image_all = (torch.arange(len(z_all), device=z.device) // len(z)) * n + torch.arange(len(z_all), device=z.device) % n
    logits = (z @ z_all.T / tau).masked_fill(image[:, None] == image_all[None, :], float("-inf"))
    return torch.logsumexp(logits, dim=1).mean()


def multispace_simclr_loss(views: list[torch.Tensor], sizes: list[int], lambdas: torch.Tensor | list[float],
                           tau: float = 0.15, add_cont_neg: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, misalignment) of the official ``SimCLRMultiHead.loss`` (see the module docstring).

    Args:
        views: unnormalised projector outputs, each (N, D): the query, then key ``i`` for space
            ``i`` (the content key first), ``len(sizes) + 1`` in all.
        sizes: the chunk sizes of the spaces (content first), summing to D.
        lambdas: per-space weights of the alignment terms.
        tau: temperature.
        add_cont_neg: also the entropy term of the content chunk (official ``add_cont_neg``).

    Returns:
        the loss of this process's anchors (mean over its ``V N`` anchors; summed over DDP ranks
        and divided by the world size it is the global batch's loss), and the per-space
        misalignment ``1 - mean cos(z_q^(i), z_{k_i}^(i))`` (official ``inv_constraint_loss``;
        detached, unweighted, this process's samples).
    """
    lambdas = torch.as_tensor(lambdas, dtype=views[0].dtype, device=views[0].device)
    _check_views(views, sizes, lambdas)
    m1, n = len(sizes), len(views[0])
    z = [torch.cat(split_chunks(v, sizes, normalize=True), dim=1) for v in views]  # joint norm sqrt(M+1)
    q = z[0].split(sizes, dim=1)
    align = torch.stack([-(q[i] * z[1 + i].split(sizes, dim=1)[i]).sum(dim=1).mean() / tau for i in range(m1)])
    joint = torch.cat(z, dim=0) / math.sqrt(m1)  # (V N, D), view-major
    joint_all = torch.cat(gather_rows(joint), dim=0)
    entropy = _negative_entropy(joint, joint_all, n, tau)
    if add_cont_neg:
        entropy = entropy + _negative_entropy(joint[:, :sizes[0]], joint_all[:, :sizes[0]], n, tau)
    loss = (lambdas * align).sum() / m1 + entropy
    return loss, (align.detach() * tau + 1.0)


def _variance_covariance(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``VICRegMultiHead.get_std_cov_losses``: hinge on the std, off-diagonal covariance
    squares summed and divided by the dimension."""
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    cov = z.T @ z / (len(z) - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return F.relu(1.0 - std).mean(), off.pow(2).sum() / z.shape[1]


def multispace_vicreg_loss(views: list[torch.Tensor], sizes: list[int], lambdas: torch.Tensor | list[float],
                           std_coeff: float = 25.0, cov_coeff: float = 1.0, add_cont_neg: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, misalignment) of the official ``VICRegMultiHead.loss`` (see the module docstring).

    ``views``, ``sizes`` as :func:`multispace_simclr_loss`; ``lambdas`` weight the per-space
    invariance MSEs (officially starting at ``sim_coeff`` = 25). The misalignment is each space's
    MSE (detached, this process's samples); variance and covariance are computed per view on the
    views gathered over DDP ranks.
    """
    lambdas = torch.as_tensor(lambdas, dtype=views[0].dtype, device=views[0].device)
    _check_views(views, sizes, lambdas)
    m1 = len(sizes)
    q = views[0].split(sizes, dim=1)
    inv = torch.stack([F.mse_loss(q[i], views[1 + i].split(sizes, dim=1)[i]) for i in range(m1)])
    std_loss = cov_loss = views[0].new_zeros(())
    for v in views:
        v_all = torch.cat(gather_rows(v), dim=0)
        parts = [v_all, v_all[:, :sizes[0]]] if add_cont_neg else [v_all]
        for part in parts:
            s, c = _variance_covariance(part)
            std_loss, cov_loss = std_loss + s, cov_loss + c
    std_loss, cov_loss = std_loss / len(views), cov_loss / len(views)
    loss = (lambdas * inv).sum() / m1 + std_coeff * std_loss + cov_coeff * cov_loss
    return loss, inv.detach()


def chunk_sizes(dim: int, fractions: list[float]) -> list[int]:
    """Sizes of the chunks of a ``dim``-d embedding for ``fractions`` (official
    ``precompute_z_split_inds``: ``int(dim * fraction)`` each, the rounding remainder to the content
    space; fractions are normalised to sum 1 first); every chunk needs at least one dimension."""
    total = float(sum(fractions))
    if total <= 0 or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be positive, got {fractions}")
    sizes = [int(dim * f / total) for f in fractions]
    sizes[0] += dim - sum(sizes)
    if min(sizes) < 1:
        raise ValueError(f"fractions {fractions} leave a space of {dim} dimensions empty ({sizes}): "
                         "raise proj_dim or the smallest fraction")
    return sizes


class MultiSpace(SSLMethod):
    """Multi-space style disentanglement (see module docstring).

    Args:
        style_groups: one style space (and one key view) per group, from ``color``, ``texture``,
            ``crop``, ``affine``.
        fractions: sizes of the content space then each style space, as fractions of ``proj_dim``
            (default: content 1/2, the rest shared equally).
        proj_hidden / proj_dim: projector (lightly's SimCLR head) sizes.
        loss: ``simclr`` (multi-head InfoNCE, ``temperature`` 0.15) or ``vicreg``.
        vicreg_weights: (invariance, variance, covariance) = official (``sim_coeff``, ``std_coeff``,
            ``cov_coeff``) = (25, 25, 1); the invariance weight is the lambdas' initial value.
        add_cont_neg: also the entropy (SimCLR) or variance/covariance (VICReg) terms of the
            content space alone (official ``--add-cont-neg``; off by default there too).
        lambdas: initial per-space alignment weights (default: 1 for SimCLR, the invariance weight
            for VICReg, as the official ``lambd``).
        dual_ascent / dual_lr / dual_tolerance: update the lambdas by dual ascent.
        augment: keyword arguments of :class:`GroupedAugment` (``preset``, probabilities, ``rotate``...).
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
        add_cont_neg: bool = False,
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
        default = 1.0 if loss == "simclr" else float(vicreg_weights[0])
        init = torch.tensor(lambdas if lambdas is not None else [default] * (m + 1), dtype=torch.float32)
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

    def space_loss(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-space misalignment) of the projector outputs of [q, k_0, k_g...]."""
        if self.hparams.loss == "simclr":
            return multispace_simclr_loss(z, self.sizes, self.lambdas, self.hparams.temperature,
                                          add_cont_neg=self.hparams.add_cont_neg)
        _, var_w, cov_w = self.hparams.vicreg_weights
        return multispace_vicreg_loss(z, self.sizes, self.lambdas, var_w, cov_w, add_cont_neg=self.hparams.add_cont_neg)

    def training_losses(self, x, y, domain):
        views = list(x)
        if len(views) != len(self.spaces) + 1:
            raise ValueError(f"MultiSpace expects {len(self.spaces) + 1} views (q, k_0, one per style group), "
                             f"got {len(views)}: is the data module's train_transform overridden?")
        loss, misalignment = self.space_loss([self.projector(h) for h in self.encode_views(views)])
        if _world()[0] > 1:  # the global batch's value, so that every rank takes the same dual step
            misalignment = misalignment.clone()
            dist.all_reduce(misalignment)
            misalignment /= _world()[0]
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
