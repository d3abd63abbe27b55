"""DDM: Domain Disentanglement Module for self-supervised encoders (BMVC 2023).

A plug-in around any SSL base of :mod:`dg_lightning.methods.ssl`: the representation
``h = [h_inv ; h_var]`` (the first ``split`` fraction of the backbone's pooled features is
``h_inv``) is disentangled during pre-training,

    L = L_ssl(h_inv)  +  w_dom * CE(D_var(h_var), d)  +  w_adv * L_adv(h_inv, d)

* ``L_ssl``: the base's own loss on ``h_inv`` (``ssl_on: full`` puts it on the whole ``h``);
* ``CE(D_var(h_var), d)``: a linear domain classifier on the variant part (it *should* know the domain);
* ``L_adv``: ``h_inv`` made non-predictive of the domain, either ``grl`` (a domain classifier
  on ``h_inv`` through a gradient-reversal layer) or ``uniform`` (a domain classifier trained on
  detached ``h_inv``, and the encoder trained to push its posterior to uniform);
* ``d``: the batch's domain labels, or (``domain_labels: pseudo``) pseudo-domains: k-means on
  per-image style statistics (channel mean and std of an early stage, ``pseudo_features: style``)
  or on pooled features (``features``), of the whole training set, refreshed at the start of every
  epoch; the ``pseudo_drop`` least confident images (smallest margin between the nearest and the
  second-nearest centre) get no domain loss that epoch. Computed on rank 0, broadcast to all ranks.

**Provisional** (the paper's exact losses were not available to us; see
``../shared/design/methods.md``): the choice of ``L_adv`` and its weight, the linear domain heads,
the margin-based confidence and drop fraction, and the style statistics used for clustering. Each
is a constructor argument. Evaluation (the paper's): linear probe on frozen ``h_inv`` (primary,
``acc``), also reported for ``h_var`` (``acc_var``) and the full ``h`` (``acc_full``).
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.data import ConcatDomains, ShardSampler, stable_seed
from dg_lightning.methods.ssl import SSL


class GradientReversal(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``-scale`` backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def uniform_posterior_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax posterior to the uniform distribution: ``-mean_k log p_k``,
    averaged over the batch; minimal (= log K) when every domain is equally likely."""
    return -F.log_softmax(logits, dim=1).mean()


def style_statistics(f: torch.Tensor) -> torch.Tensor:
    """Per-image channel means and standard deviations of a feature map (N, C, H, W) -> (N, 2C)."""
    return torch.cat([f.mean(dim=(2, 3)), f.flatten(2).std(dim=2)], dim=1)


def robust_kmeans(x: np.ndarray, k: int, drop: float, seed: int) -> np.ndarray:
    """k-means on standardised ``x``; the ``drop`` fraction with the smallest margin
    ``1 - d_nearest / d_second`` is labelled -1 (ignored)."""
    from sklearn.cluster import KMeans

    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    dist = np.sort(km.transform(z), axis=1)
    margin = 1.0 - dist[:, 0] / np.maximum(dist[:, 1], 1e-12)
    labels = km.labels_.astype(np.int64)
    n_drop = int(drop * len(z))
    if n_drop:
        labels[np.argsort(margin, kind="stable")[:n_drop]] = -1
    return labels


class DDM(SSL):
    """DDM around the SSL base ``ssl`` (see module docstring).

    Args:
        split: fraction of the representation that is domain-invariant (``h_inv``).
        ssl_on: the SSL loss on ``inv`` (the split part) or ``full``.
        domain_weight: ``w_dom``. adversarial: ``grl`` or ``uniform``. adversarial_weight: ``w_adv``.
        domain_labels: ``true`` (the data's source domains) or ``pseudo`` (k-means pseudo-domains).
        num_domains: number of source domains (``None``: taken from the data module at setup).
        pseudo_domains / pseudo_features / pseudo_stage / pseudo_drop: the clustering (number of
            clusters; ``style`` statistics of feature level ``pseudo_stage`` or pooled ``features``;
            fraction of least confident images dropped).
        (everything else: :class:`dg_lightning.methods.ssl.SSL`)
    """

    probe_part = "inv"

    def __init__(
        self,
        split: float = 0.5,
        ssl_on: Literal["inv", "full"] = "inv",
        domain_weight: float = 1.0,
        adversarial: Literal["grl", "uniform"] = "grl",
        adversarial_weight: float = 0.1,
        domain_labels: Literal["true", "pseudo"] = "true",
        num_domains: int | None = None,
        pseudo_domains: int = 3,
        pseudo_features: Literal["style", "features"] = "style",
        pseudo_stage: int = 1,
        pseudo_drop: float = 0.1,
        **kwargs,
    ):
        if not 0.0 < split < 1.0:
            raise ValueError(f"split must be in (0, 1), got {split}")
        super().__init__(**kwargs)
        width = self.backbone.num_features
        if not 0 < self.k_inv < width:
            raise ValueError(f"split {split} of {width} features leaves an empty part")
        self.pseudo_labels: torch.Tensor | None = None
        n = pseudo_domains if domain_labels == "pseudo" else num_domains
        if n is not None:
            self._build_domain_heads(n)

    @property
    def k_inv(self) -> int:
        """Width of ``h_inv``: the first ``round(split * width)`` features."""
        return int(round(self.hparams.split * self.backbone.num_features))

    def ssl_input_dim(self, width: int) -> int:
        return self.k_inv if self.hparams.ssl_on == "inv" else width

    def ssl_input(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, :self.k_inv] if self.hparams.ssl_on == "inv" else h

    def _build_domain_heads(self, n: int) -> None:
        width = self.backbone.num_features
        self.domain_head = nn.Linear(width - self.k_inv, n)
        self.adversary = nn.Linear(self.k_inv, n)

    def bind_data(self, dm) -> None:
        super().bind_data(dm)
        if not hasattr(self, "domain_head"):
            n = len(dm.train_domains)
            self.hparams.num_domains = n
            self._build_domain_heads(n)
            self.domain_head.to(self.device)
            self.adversary.to(self.device)

    # -- representation parts ----------------------------------------------------------------------
    def split_parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h[:, :self.k_inv], h[:, self.k_inv:]

    def representations(self, x):
        h = self.features(x)
        inv, var = self.split_parts(h)
        return {"inv": inv, "var": var, "full": h}

    def probe_dims(self):
        width = self.backbone.num_features
        return {"inv": self.k_inv, "var": width - self.k_inv, "full": width}

    # -- losses ----------------------------------------------------------------------------------
    def domain_terms(self, h: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """Domain CE on h_var and the adversarial term on h_inv for one view (``d`` = -1: ignored)."""
        inv, var = self.split_parts(h)
        terms = {"domain": F.cross_entropy(self.domain_head(var), d, ignore_index=-1)}
        if self.hparams.adversarial == "grl":
            terms["adversarial"] = F.cross_entropy(self.adversary(GradientReversal.apply(inv, 1.0)), d, ignore_index=-1)
        else:
            # the adversary learns the domain from detached h_inv; the encoder is pushed to its uniform posterior
            fit = F.cross_entropy(self.adversary(inv.detach()), d, ignore_index=-1)
            confuse = uniform_posterior_loss(F.linear(inv, self.adversary.weight.detach(),
                                                      self.adversary.bias.detach()))
            terms["adversarial"] = confuse
            terms["adversary_fit"] = fit
        return terms

    def batch_domains(self, domain: torch.Tensor) -> torch.Tensor:
        if self.hparams.domain_labels == "true":
            return domain
        if self.pseudo_labels is None or self.sample_index is None:
            raise RuntimeError("DDM pseudo-domains need the batch's sample indices and a clustering "
                               "(made at the start of each training epoch)")
        return self.pseudo_labels[self.sample_index.to(self.pseudo_labels.device)].to(domain.device)

    def training_losses(self, x, y, domain):
        views = list(x)
        ssl, h = self.ssl_loss(views)
        d = self.batch_domains(domain)
        per_view = [self.domain_terms(v, d) for v in h]
        terms = {k: torch.stack([t[k] for t in per_view]).mean() for k in per_view[0]}
        total = ssl + self.hparams.domain_weight * terms["domain"] + self.hparams.adversarial_weight * terms["adversarial"]
        if "adversary_fit" in terms:
            total = total + terms["adversary_fit"]
        return {"loss": total, "ssl": ssl, **terms}

    # -- pseudo-domains ------------------------------------------------------------------------------
    @torch.no_grad()
    def cluster_features(self) -> np.ndarray:
        """Features of every training ("in") image, in the order of the training set's indices."""
        dm = self.trainer.datamodule
        data = ConcatDomains([dm.dataset(d, "in") for d in dm.train_domains])
        loader = dm._loader(data, dm.eval_batch_size, ShardSampler(len(data)))
        was_training = self.training
        self.eval()
        out = []
        for x, *_ in loader:
            x = x.to(self.device)
            if self.hparams.pseudo_features == "style":
                _, maps = self.forward_stages(x, [self.hparams.pseudo_stage])
                out.append(style_statistics(maps[0]).float().cpu())
            else:
                out.append(self.features(x).float().cpu())
        self.train(was_training)
        return torch.cat(out).numpy()

    def on_train_epoch_start(self) -> None:
        if self.hparams.domain_labels != "pseudo":
            return
        labels = None
        if self.trainer.is_global_zero:
            seed = stable_seed(os.environ.get("PL_GLOBAL_SEED", 0), "ddm", self.current_epoch)
            labels = torch.from_numpy(robust_kmeans(self.cluster_features(), self.hparams.pseudo_domains,
                                                    self.hparams.pseudo_drop, seed))
        labels = self.trainer.strategy.broadcast(labels, src=0)
        self.pseudo_labels = labels.to(self.device)
        kept = labels[labels >= 0]
        self.log("train/pseudo_kept", kept.numel() / max(1, labels.numel()), on_epoch=True, on_step=False)
