"""GCISG: Guided Causal Invariant Syn-to-real Generalization (Kim et al., ECCV 2022).

Two style randomisations ``x1, x2`` of each image share content, not style. The student learns
to be invariant to style, relative to a queue of teacher embeddings, while a frozen ImageNet guide
keeps its semantics. Per stage ``l`` (default: stages 3 and 4):

    u^l      = normalize(g^l(GAP(F^l)))                               projection of a stage feature
    L_CI(a,b) = - sum_j softmax_j(<u_xi(b), Q_j>/tau_k) log softmax_j(<u_theta(a), Q_j>/tau_q)
    L_G(x)   = || N(p_theta(x)) - N(p_0(x)) ||_F,  p = sum_hw a_hw F_hw,  a_hw ∝ <F_hw, GAP(F)>
    L        = sum_l L_CI(x1,x2) + CE(f_theta(x2), y) + sum_l L_G(x2) + sum_l L_CI(x2,x1)

As in the official code: the teacher is an EMA of the student's backbone only
(xi <- 0.996 xi + 0.004 theta); its projection heads are frozen copies of the student's initial
heads; the guide is the pretrained backbone, frozen with BatchNorm in eval mode; the classifier is
Linear(C,512)-ReLU-Linear(512,K); the queue (65,536 per stage) starts as unit-norm Gaussian
vectors and receives the teacher embeddings after each L_CI, gathered across DDP ranks.

Segmentation (``task: segmentation``): the same losses on the DeepLabV3+ encoder's stages, CE per
pixel (ignore 255) on the logits of ``x2``; the guide and the teacher are copies of the encoder.
The style randomisation then draws photometric RandAugment operations only (no shear, translate
or rotate), so that both views stay aligned with the label map.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

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


class PhotometricRandAugment(v2.RandAugment):
    """RandAugment without its geometric operations: pixels keep their place (segmentation)."""

    _AUGMENTATION_SPACE = {k: v for k, v in v2.RandAugment._AUGMENTATION_SPACE.items()
                           if k not in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")}


class StyleViews(nn.Module):
    """Independent RandAugment(n, m) of every image of a [0, 1] batch (the official style
    randomisation); ``photometric=True`` leaves out the geometric operations."""

    def __init__(self, num_ops: int = 1, magnitude: int = 6, photometric: bool = False):
        super().__init__()
        augment = PhotometricRandAugment if photometric else v2.RandAugment
        self.augment = augment(num_ops=num_ops, magnitude=magnitude)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        out = torch.stack([self.augment(img) for img in u8])
        return out.to(device=x.device, dtype=x.dtype) / 255.0


class GCISG(DGMethod):
    """GCISG on any timm backbone that exposes stage features (see module docstring).

    Args:
        stages: feature levels with projection heads (timm ``feature_info`` indices; 3, 4 = layer3/4).
        emb_dim: projection size (128).
        queue_size: queue entries per stage (65,536).
        tau_q / tau_k: student / teacher temperatures (0.12 / 0.04).
        ema_momentum: teacher momentum (0.996).
        ci_weight / guidance_weight: weights of L_CI and L_G (1, 1).
        symmetric: add L_CI(x2, x1) (official: true).
        randaugment_ops / randaugment_magnitude: the style randomisation (1, 6).
        (everything else: :class:`DGMethod`; the guide is the backbone as loaded, so give ``pretrained``)

    The guide is rebuilt from ``backbone``/``pretrained`` and kept out of checkpoints; the EMA
    teacher, its heads and the queues are saved.
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
        ci_weight: float = 1.0,
        guidance_weight: float = 1.0,
        symmetric: bool = True,
        randaugment_ops: int = 1,
        randaugment_magnitude: int = 6,
        head_hidden: int | None = 512,
        **kwargs,
    ):
        super().__init__(head_hidden=head_hidden, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.stages = list(stages)
        channels = self.stage_channels(self.stages)
        self.views = StyleViews(randaugment_ops, randaugment_magnitude, photometric=self.segmentation)
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

    def training_losses(self, x, y, domain):
        x1, x2 = self.views(x), self.views(x)
        z2, s2 = self.forward_stages(x2, self.stages)
        with torch.no_grad():
            _, t2 = self.forward_stages(x2, self.stages, self.teacher)
            _, g2 = self.forward_stages(x2, self.stages, self.guide)
        ce = self.task_loss(self.head_logits(z2), y)
        lg = sum(guidance_loss(s, g) for s, g in zip(s2, g2, strict=True))
        terms = {"ce": ce, "guidance": lg}
        if self.hparams.symmetric:
            _, s1 = self.forward_stages(x1, self.stages)
            with torch.no_grad():
                _, t1 = self.forward_stages(x1, self.stages, self.teacher)
            terms["ci_12"] = self.ci_terms(self.embed(s1, self.proj), self.embed(t2, self.teacher_proj))
            terms["ci_21"] = self.ci_terms(self.embed(s2, self.proj), self.embed(t1, self.teacher_proj))
            ci = terms["ci_12"] + terms["ci_21"]
        else:
            with torch.no_grad():
                _, t1 = self.forward_stages(x1, self.stages, self.teacher)
            terms["ci_21"] = ci = self.ci_terms(self.embed(s2, self.proj), self.embed(t1, self.teacher_proj))
        terms["loss"] = ce + self.hparams.ci_weight * ci + self.hparams.guidance_weight * lg
        return terms

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.teacher, self.backbone, self.hparams.ema_momentum)
