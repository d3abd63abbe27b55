"""GCISG: Guided Causal Invariant Syn-to-real Generalization (Kim et al., ECCV 2022).

Two style randomisations ``x1, x2`` of each image share content, not style. The student learns
to be invariant to style, relative to a queue of teacher embeddings, while a frozen ImageNet guide
keeps its semantics. Per stage ``l`` (default: stages 3 and 4):

    u^l      = normalize(g^l(GAP(F^l)))                               projection of a stage feature
    L_CI(a,b) = - sum_j softmax_j(<u_xi(b), Q_j>/tau_k) log softmax_j(<u_theta(a), Q_j>/tau_q)
    L_G(x)   = || N(p_theta(x)) - N(p_0(x)) ||_F,  p = sum_hw a_hw F_hw,  a_hw ∝ <F_hw, GAP(F)>
    L        = sum_l L_CI(x1,x2) + CE(f_theta(x2), y) + sum_l L_G(x2) + sum_l L_CI(x2,x1)

Followed: the official code, GCISG/GCISG (``model/siamese_net.py``: ``SiameseNet._calc_loss``,
``training_step``, ``_post_training_step``, ``_ema``; ``loss/causal_invariance_loss.py``: ``CILoss``;
``loss/guidance_loss.py``: ``GuidanceLoss``; ``data/transforms/rand_augment.py``: ``augment_list``,
``RandAugment``; ``data/transforms/transforms.py``: ``ClassificationTransforms.rand_augment``,
``TwoCropsTransform``). As there:

* the two views are made per sample by the data loader (``TwoCropsTransform`` over
  ``RandAugment(1, 6)``), here through :meth:`GCISG.train_views`, seeded per sample like every
  augmentation of this project; the training step receives ``[x1, x2]``;
* the RandAugment op table is the official one (:class:`GCISGRandAugment`): AutoContrast and
  Equalize act with probability m/30, translations are absolute (m/30 * 100 px), Posterize keeps
  8 - int(7 m/30) bits, Solarize inverts pixels >= 256 - 256 m/30; one op drawn with replacement;
* the student forward order and the loss of ``_calc_loss(x1, x2, symmetric=True)``: first
  ``L_CI(x1, x2)`` alone (its teacher keys enqueued), then CE, L_G and ``L_CI(x2, x1)`` on ``x2``;
* the teacher is an EMA of the student's backbone parameters only (xi <- 0.996 xi + 0.004 theta),
  updated inside the training step, after the loss and before the optimiser step
  (``_post_training_step``); its BatchNorm runs in training mode with its own statistics; its
  projection heads are frozen copies of the student's initial heads;
* the guide is the pretrained backbone, frozen, BatchNorm in eval mode;
* the classifier is Linear(C,512)-ReLU-Linear(512,K); projection heads Linear(C,C)-ReLU-Linear(C,128);
* each queue (65,536 per stage) starts as unit-norm Gaussian vectors and receives the teacher
  embeddings after each L_CI, gathered across DDP ranks.

Deliberate differences:

* classification views: RandAugment on the loaded image, then ``Resize((s, s))`` (this project's
  evaluation geometry) instead of the official ``Resize(s) + CenterCrop(s)`` (its own evaluation
  geometry): train and test see the same geometry in both; no other augmentation, as in the
  official code (the data module's ``augment`` preset is replaced, as for the self-supervised methods);
* the queue's enqueue wraps around (the official one assumes the queue size is a multiple of the
  gathered batch);
* options that leave the official code (defaults: the official behaviour): ``randaugment:
  torchvision`` (torchvision's stock op table), ``ema_before_step: false`` (EMA after the optimiser
  step, from the updated weights), ``symmetric: false`` (the official single call).

Segmentation (``task: segmentation``; the official repository has no segmentation code): the same
losses on the DeepLabV3+ encoder's stages, CE per pixel (ignore 255) on the logits of ``x2``; the
guide and the teacher are copies of the encoder. The views are made per sample after the data
module's paired image/label augmentation, with the photometric RandAugment ops only (no shear,
translate or rotate), so that both views stay aligned with the label map.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import to_pil_image

from dg_lightning.core.data import build_transform
from dg_lightning.core.method import DGMethod


def relational_ci_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau_q: float, tau_k: float) -> torch.Tensor:
    """L_CI: cross-entropy between the teacher's (``k``) and the student's (``q``) similarity
    distributions over the queue (rows of ``queue``); mean over the batch; ``k`` is not differentiated."""
    p_teacher = F.softmax(k.detach() @ queue.T / tau_k, dim=1)
    log_p_student = F.log_softmax(q @ queue.T / tau_q, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean()


def attention_pool(f: torch.Tensor) -> torch.Tensor:
    """p = sum_hw a_hw F_hw with a_hw = <F_hw, GAP(F)> / sum_h'w' <F_h'w', GAP(F)>; (N,C,H,W) -> (N,C)."""
    gap = f.mean(dim=(2, 3))
    a = torch.einsum("nchw,nc->nhw", f, gap)
    a = a / a.sum(dim=(1, 2), keepdim=True)
    return torch.einsum("nchw,nhw->nc", f, a)


def guidance_loss(f_student: torch.Tensor, f_guide: torch.Tensor) -> torch.Tensor:
    """L_G = || N(p_student) - N(p_guide) ||_F over the batch (N = row-wise L2 normalisation)."""
    diff = F.normalize(attention_pool(f_student), dim=1) - F.normalize(attention_pool(f_guide.detach()), dim=1)
    return torch.linalg.matrix_norm(diff, ord="fro")


class EmbeddingQueue(nn.Module):
    """A FIFO of ``size`` unit-norm ``dim``-d embeddings (rows); enqueue wraps around.

    Under DDP, ``enqueue`` is given the keys of every rank (the caller gathers them), so every rank
    keeps the same queue; in a single process nothing is gathered.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        size = self.embeddings.shape[0]
        keys = keys.detach()[-size:]
        idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.embeddings[idx] = keys.to(self.embeddings.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % size)


def projection_head(channels: int, emb_dim: int) -> nn.Module:
    """g^l: Linear(C, C) - ReLU - Linear(C, emb_dim) on the pooled stage feature."""
    return nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, emb_dim))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """xi <- m xi + (1 - m) theta over parameters (buffers such as BN statistics are the teacher's own)."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1.0 - momentum)


GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class GCISGRandAugment(v2.RandAugment):
    """RandAugment with the official GCISG op table (``data/transforms/rand_augment.py``:
    ``augment_list``, ``RandAugment``), on torchvision's op implementations.

    The 14 ops are torchvision's; at magnitude m (of 30) the official table differs from
    torchvision's stock one in four places: AutoContrast and Equalize act only with probability
    m/30 (torchvision: always), translations are m/30 * 100 pixels whatever the image size
    (torchvision: m/30 * 150/331 of the side, truncated to whole pixels), Posterize keeps
    8 - int(7 m/30) bits (torchvision: 8 - round(4 m/30)), Solarize inverts pixels >= 256 - 256 m/30
    (torchvision: >= 255 - 255 m/30; at the default m = 6 both invert 8-bit values >= 205, and
    Posterize keeps 7 bits in both). On PIL images every op gives, pixel for pixel, the PIL
    operation the official code calls with the official parameters (``tests/test_gcisg.py``).
    """

    _AUGMENTATION_SPACE = {
        **v2.RandAugment._AUGMENTATION_SPACE,
        "TranslateX": (lambda num_bins, height, width: torch.linspace(0.0, 100.0, num_bins), True),
        "TranslateY": (lambda num_bins, height, width: torch.linspace(0.0, 100.0, num_bins), True),
        "Posterize": (lambda num_bins, height, width:
                      (8 - (torch.arange(num_bins) * 7 / (num_bins - 1)).floor()).clamp(min=1).int(), False),
        # threshold 256 - 256 m/30 on the 0-255 scale (torchvision multiplies by 255)
        "Solarize": (lambda num_bins, height, width: (256.0 - torch.linspace(0.0, 256.0, num_bins)) / 255.0, False),
    }

    def __init__(self, num_ops: int = 1, magnitude: int = 6):
        super().__init__(num_ops=num_ops, magnitude=magnitude)

    @property
    def level(self) -> float:
        """m / 30: the official magnitude as a fraction of its range."""
        return self.magnitude / (self.num_magnitude_bins - 1)

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if transform_id in ("AutoContrast", "Equalize") and not float(torch.rand(())) <= self.level:
            return image
        if transform_id == "Solarize" and magnitude * 255.0 > 255.0:
            return image  # threshold above every pixel value (m = 0)
        if transform_id in ("TranslateX", "TranslateY"):  # the official shift, not truncated to whole pixels
            shift = [magnitude, 0.0] if transform_id == "TranslateX" else [0.0, magnitude]
            return v2.functional.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                                        interpolation=interpolation)
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)


class GCISGPhotometricRandAugment(GCISGRandAugment):
    """The official table without its geometric ops (segmentation: pixels keep their place)."""

    _AUGMENTATION_SPACE = {k: v for k, v in GCISGRandAugment._AUGMENTATION_SPACE.items() if k not in GEOMETRIC_OPS}


class PhotometricRandAugment(v2.RandAugment):
    """torchvision's stock RandAugment without its geometric ops (``randaugment: torchvision`` for
    segmentation)."""

    _AUGMENTATION_SPACE = {k: v for k, v in v2.RandAugment._AUGMENTATION_SPACE.items() if k not in GEOMETRIC_OPS}


def style_randaugment(num_ops: int, magnitude: int, table: str = "official", photometric: bool = False) -> v2.Transform:
    """The style randomisation: the official op table or torchvision's, all ops or photometric ones."""
    if table == "official":
        return (GCISGPhotometricRandAugment if photometric else GCISGRandAugment)(num_ops, magnitude)
    if table == "torchvision":
        return (PhotometricRandAugment if photometric else v2.RandAugment)(num_ops=num_ops, magnitude=magnitude)
    raise ValueError(f"unknown randaugment table {table!r}: choose official or torchvision")


class StyleViews:
    """Per-sample training transform: ``views`` independent style randomisations of one image
    (the official ``TwoCropsTransform`` over RandAugment), each finished by ``finish`` (resize, to a
    [0, 1] float tensor).

    Takes a PIL image, a (3, H, W) uint8 tensor or an (H, W, 3) uint8 array (a segmentation crop)
    and hands the randomisation a PIL image, as the official code does. Runs in the data loader
    (workers), seeded per sample by the dataset.
    """

    def __init__(self, augment: Callable, finish: Callable, views: int = 2):
        self.augment, self.finish, self.views = augment, finish, views

    def __call__(self, image) -> list[torch.Tensor]:
        if isinstance(image, torch.Tensor):
            image = to_pil_image(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return [self.finish(self.augment(image)) for _ in range(self.views)]


class GCISG(DGMethod):
    """GCISG on any timm backbone that exposes stage features (see module docstring).

    Args:
        stages: feature levels with projection heads (timm ``feature_info`` indices; 3, 4 = layer3/4).
        emb_dim: projection size (128).
        queue_size: queue entries per stage (65,536).
        tau_q / tau_k: student / teacher temperatures (0.12 / 0.04).
        ema_momentum: teacher momentum (0.996).
        ema_before_step: update the teacher in the training step, after the loss and before the
            optimiser step, from the student's weights that computed the loss (official); ``false``:
            after the optimiser step, from the updated weights.
        ci_weight / guidance_weight: weights of L_CI and L_G (1, 1).
        symmetric: add L_CI(x2, x1) (official: true); ``false`` keeps the official single call
            ``_calc_loss(x1, x2)``: CE, L_G and L_CI(x1, x2) on ``x1``.
        randaugment_ops / randaugment_magnitude: the style randomisation (1, 6).
        randaugment: its op table, ``official`` (:class:`GCISGRandAugment`) or ``torchvision``'s stock one.
        (everything else: :class:`DGMethod`; the guide is the backbone as loaded, so give ``pretrained``)

    Training batches carry the two views, ``[x1, x2]``, made per sample in the data loader by
    :meth:`train_views`. The guide is rebuilt from ``backbone``/``pretrained`` and kept out of
    checkpoints; the EMA teacher, its heads and the queues are saved.
    """

    frozen_prefixes = ("guide.",)

    def __init__(
        self,
        stages: list[int] = [3, 4],  # noqa: B006 (jsonargparse needs a literal default)
        emb_dim: int = 128,
        queue_size: int = 65536,
        tau_q: float = 0.12,
        tau_k: float = 0.04,
        ema_momentum: float = 0.996,
        ema_before_step: bool = True,
        ci_weight: float = 1.0,
        guidance_weight: float = 1.0,
        symmetric: bool = True,
        randaugment_ops: int = 1,
        randaugment_magnitude: int = 6,
        randaugment: Literal["official", "torchvision"] = "official",
        head_hidden: int | None = 512,
        **kwargs,
    ):
        super().__init__(head_hidden=head_hidden, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        style_randaugment(randaugment_ops, randaugment_magnitude, randaugment)  # a bad table fails here
        self.stages = list(stages)
        channels = self.stage_channels(self.stages)
        self.proj = nn.ModuleList([projection_head(c, emb_dim) for c in channels])
        self.queues = nn.ModuleList([EmbeddingQueue(emb_dim, queue_size) for _ in channels])
        # frozen networks: the guide (pretrained backbone) and the EMA teacher with its heads
        self.guide = copy.deepcopy(self.backbone).requires_grad_(False).eval()
        self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_proj = copy.deepcopy(self.proj).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.guide.eval()  # BatchNorm of the guide keeps its ImageNet statistics
        return self

    # -- views -----------------------------------------------------------------------------------
    def train_views(self, image_size: int) -> StyleViews:
        """Per sample, in the data loader: two independent style randomisations of the loaded image
        (classification: then resized to ``image_size``; segmentation: of the crop that the data
        module's paired augmentation made, photometric ops only, the label untouched)."""
        hp = self.hparams
        augment = style_randaugment(hp.randaugment_ops, hp.randaugment_magnitude, hp.randaugment,
                                    photometric=self.segmentation)
        if self.segmentation:
            finish = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        else:
            finish = build_transform(image_size, "none", train=True)  # Resize((s, s)), [0, 1] float
        return StyleViews(augment, finish)

    def style_views(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1, x2) of a training batch: the two views the data loader made (:meth:`train_views`).

        The one place where the step gets its views: another way of making them (e.g. batched on
        the accelerator from a single image batch, with :meth:`train_views` then returning the data
        module's own transform) plugs in here, behind an option; the loader path stays the default."""
        if isinstance(x, (list, tuple)) and len(x) == 2:
            return x[0], x[1]
        raise ValueError(
            "GCISG trains on two style views of each image, made per sample by the data loader from "
            "GCISG.train_views; this batch holds one image per sample. Let the model bind the data module "
            "before its loaders are built (Trainer.fit does so in setup; by hand: model.bind_data(datamodule)), "
            "or pass [x1, x2]."
        )

    # -- losses ----------------------------------------------------------------------------------
    def embed(self, maps: list[torch.Tensor], heads: nn.ModuleList) -> list[torch.Tensor]:
        return [F.normalize(h(m.mean(dim=(2, 3))), dim=1) for m, h in zip(maps, heads, strict=True)]

    def _gather(self, k: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.all_gather(k).flatten(0, 1)
        return k

    def ci_terms(self, u_student: list[torch.Tensor], u_teacher: list[torch.Tensor]) -> torch.Tensor:
        """sum_l L_CI against queue l, then enqueue the teacher embeddings."""
        total = 0.0
        for q, k, queue in zip(u_student, u_teacher, self.queues, strict=True):
            total = total + relational_ci_loss(q, k, queue.embeddings.clone(), self.hparams.tau_q, self.hparams.tau_k)
            queue.enqueue(self._gather(k))
        return total

    def causal_invariance(self, s_a: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        """sum_l L_CI(a, b) from the student's stage maps of ``a`` and the teacher on ``b``."""
        with torch.no_grad():
            _, t_b = self.forward_stages(b, self.stages, self.teacher)
        return self.ci_terms(self.embed(s_a, self.proj), self.embed(t_b, self.teacher_proj))

    def training_losses(self, x, y, domain):
        x1, x2 = self.style_views(x)
        hp = self.hparams
        terms = {}
        if hp.symmetric:  # official _calc_loss(x1, x2, symmetric=True): L_CI(x1, x2) first, alone
            _, s1 = self.forward_stages(x1, self.stages)
            terms["ci_12"] = self.causal_invariance(s1, x2)
            a, b, name = x2, x1, "ci_21"  # then _calc_loss(x2, x1): CE, L_G, L_CI on x2
        else:
            a, b, name = x1, x2, "ci_12"
        z, s = self.forward_stages(a, self.stages)
        with torch.no_grad():
            _, g = self.forward_stages(a, self.stages, self.guide)
        terms["ce"] = self.task_loss(self.head_logits(z), y)
        terms["guidance"] = sum(guidance_loss(s_l, g_l) for s_l, g_l in zip(s, g, strict=True))
        terms[name] = self.causal_invariance(s, b)
        ci = sum(v for k, v in terms.items() if k.startswith("ci_"))
        terms["loss"] = terms["ce"] + hp.ci_weight * ci + hp.guidance_weight * terms["guidance"]
        if hp.ema_before_step:  # official _post_training_step: inside the training step
            ema_update(self.teacher, self.backbone, hp.ema_momentum)
        return terms

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if not self.hparams.ema_before_step:
            ema_update(self.teacher, self.backbone, self.hparams.ema_momentum)
