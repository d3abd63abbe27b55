"""SagNet: style-agnostic networks (Nam et al., CVPR 2021), DomainBed's ``SagNet``.

Two classifiers on the features: the content classifier (the model's head, used for prediction)
learns on features whose style is randomised, the style classifier on features whose content is
randomised; the featuriser is then trained adversarially to make the style classifier uncertain.
Per step (``SagNet.update``, ``domainbed/algorithms.py``), each with a fresh forward pass:

1. content:   L_c = CE(c(SR(phi(x))), y)                      steps the featuriser and c
2. style:     L_s = CE(s(CR(phi(x))), y)                      steps s
3. adversary: L_adv = -w_adv * mean_{i,k} log softmax(s(CR(phi(x_i))))_k   steps the featuriser

Style randomisation SR keeps each feature vector's normalised values and replaces its mean and
variance by a random interpolation (weight ~ U(0, 1) per sample) with another sample's; content
randomisation CR keeps the statistics and takes another sample's normalised values (detached).
As in DomainBed, the statistics are over the pooled feature vector (per channel and spatial
position for 4-D maps); the paper's version splits a ResNet at layer 3 and randomises the maps,
which DomainBed leaves commented out because it is ResNet-specific. Three Adams (the ``optimizer``
factory, default ``Adam(lr=5e-5)``) for featuriser, content and style classifier; ``sag_w_adv`` = 0.1
(search 10^U(-2, 1)).

In Lightning: manual optimisation. Lightning's ``global_step`` counts optimiser steps, four per batch
here (featuriser and content together, style, featuriser again); the schedules here are in epochs,
unaffected. Dropout (``dropout``) is applied to the features before the randomisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import ManualUpdates


def randomize(z: torch.Tensor, what: str, alpha: torch.Tensor, perm: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Style (``what="style"``) or content (``"content"``) randomisation of features ``z`` (N, C) or
    (N, C, H, W): statistics over the last axis (the flattened spatial axis for maps), interpolated with
    sample ``perm[i]``'s by weight ``alpha[i]`` (style), or the normalised values of sample ``perm[i]``
    taken, detached (content)."""
    shape = z.shape
    if z.dim() == 4:
        z = z.view(shape[0], shape[1], -1)
    a = alpha.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    mean, var = z.mean(-1, keepdim=True), z.var(-1, keepdim=True)
    zn = (z - mean) / (var + eps).sqrt()
    if what == "style":
        mean = a * mean + (1 - a) * mean[perm]
        var = a * var + (1 - a) * var[perm]
    elif what == "content":
        zn = zn[perm].detach()
    else:
        raise ValueError(f"randomize what={what!r}: style or content")
    return (zn * (var + eps).sqrt() + mean).view(shape)


class SagNet(ManualUpdates, DGMethod):
    """Content classifier on style-randomised features, style classifier on content-randomised ones,
    featuriser adversarial to the style classifier."""

    tasks = ("classification",)

    def __init__(self, sag_w_adv: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        self.style_classifier = nn.Linear(self.backbone.num_features, self.hparams.num_classes)

    def _draws(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, device=device), torch.randperm(n, device=device)

    def content_loss(self, x, y, alpha=None, perm=None) -> torch.Tensor:
        z = self.dropout(self.encode(x))
        alpha, perm = (alpha, perm) if alpha is not None else self._draws(len(z), z.device)
        return F.cross_entropy(self.classifier(randomize(z, "style", alpha, perm)), y)

    def style_logits(self, x, alpha=None, perm=None) -> torch.Tensor:
        z = self.dropout(self.encode(x))
        alpha, perm = (alpha, perm) if alpha is not None else self._draws(len(z), z.device)
        return self.style_classifier(randomize(z, "content", alpha, perm))

    def adversarial_loss(self, x, alpha=None, perm=None) -> torch.Tensor:
        return -self.hparams.sag_w_adv * F.log_softmax(self.style_logits(x, alpha, perm), dim=1).mean()

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms at the current weights (``training_step`` recomputes each after the previous update)."""
        loss_c = self.content_loss(x, y)
        return {"loss": loss_c, "loss_c": loss_c, "loss_s": F.cross_entropy(self.style_logits(x), y),
                "loss_adv": self.adversarial_loss(x)}

    def training_step(self, batch, batch_idx):
        x, y, *_ = batch
        opt_f, opt_c, opt_s = self.optimizers()
        opt_f.zero_grad()
        opt_c.zero_grad()
        loss_c = self.content_loss(x, y)
        self.manual_backward(loss_c)
        opt_f.step()
        opt_c.step()
        opt_s.zero_grad()
        loss_s = F.cross_entropy(self.style_logits(x), y)
        self.manual_backward(loss_s)
        opt_s.step()
        opt_f.zero_grad()
        loss_adv = self.adversarial_loss(x)
        self.manual_backward(loss_adv)
        opt_f.step()
        self.log_terms({"loss": loss_c, "loss_c": loss_c, "loss_s": loss_s, "loss_adv": loss_adv}, len(y))
        self.step_schedulers("step")

    def configure_optimizers(self):
        heads = {id(p) for p in [*self.classifier.parameters(), *self.style_classifier.parameters()]}
        featurizer = [p for p in self.parameters() if p.requires_grad and id(p) not in heads]
        return self.build_optimizers([featurizer, list(self.classifier.parameters()),
                                      list(self.style_classifier.parameters())])
