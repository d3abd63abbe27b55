"""DANN: domain-adversarial training (Ganin et al., JMLR 2016), DomainBed's ``DANN``.

A domain discriminator D (an MLP on the pooled features) learns which source domain a feature came
from; the featuriser and classifier learn the task while making D fail:

    L_D = CE(D(phi(x)), d) + grad_penalty * mean_i ||d/d phi(x_i) sum_j CE(D(phi(x_j)), d_j)||^2
    L_G = CE(f(x), y) - lambda * L_D

DomainBed alternates instead of reversing gradients (``AbstractDANN.update``, ``domainbed/algorithms.py``):
an update counter ``t`` (1, 2, ...) makes step ``t`` a discriminator step when
``t mod (1 + d_steps_per_g_step) < d_steps_per_g_step`` (only D's optimiser steps on L_D), otherwise
a generator step (only the featuriser and classifier step on L_G). Two Adams with betas
``(beta1, 0.9)``: D's with ``lr_d``/``weight_decay_d``, the rest with ``lr_g``/``weight_decay_g``.
Defaults and searches are DomainBed's (``dg_lightning.methods.hparams``): lambda 1, one D step per G
step, no gradient penalty, beta1 0.5, D an MLP of depth 3, width 256, dropout 0.

In Lightning: manual optimisation, one optimiser step per batch (so ``global_step`` counts batches);
the ``optimizer`` argument is not used (the two Adams are built from the arguments above) and giving
one is an error. The discriminator's input is the pooled feature before the classifier's dropout
(DomainBed's includes the ResNet dropout; identical at its default 0). The conditional variant
(CDANN) is not provided. Under DDP the discriminator step leaves the classifier without gradients:
use ``strategy: ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import ManualUpdates


class DomainDiscriminator(nn.Module):
    """DomainBed's ``networks.MLP``: Linear-Dropout-ReLU, ``depth - 2`` hidden Linear-Dropout-ReLU, Linear."""

    def __init__(self, n_in: int, n_out: int, width: int = 256, depth: int = 3, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(n_in, width), nn.Dropout(dropout), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Dropout(dropout), nn.ReLU()]
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class DANN(ManualUpdates, DGMethod):
    """Domain-adversarial training with DomainBed's alternating discriminator / generator steps.

    Args:
        num_domains: number of source domains (the discriminator's classes); ``None``: taken from the
            data module when the fit starts.
        dann_lambda: weight of the adversarial term in the generator loss (DomainBed's ``lambda``).
        d_steps_per_g_step: discriminator steps per generator step.
        grad_penalty: weight of the discriminator's input-gradient penalty.
        beta1: Adam's first beta for both optimisers (the second is 0.9).
        lr_g / lr_d, weight_decay_g / weight_decay_d: the two optimisers' settings.
        mlp_width / mlp_depth / mlp_dropout: the discriminator MLP.
    """

    tasks = ("classification",)

    def __init__(self, num_domains: int | None = None, dann_lambda: float = 1.0, d_steps_per_g_step: int = 1,
                 grad_penalty: float = 0.0, beta1: float = 0.5, lr_g: float = 5e-5, lr_d: float = 5e-5,
                 weight_decay_g: float = 0.0, weight_decay_d: float = 0.0, mlp_width: int = 256,
                 mlp_depth: int = 3, mlp_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if self.optimizer_factory is not None:
            raise ValueError("DANN builds its two Adam optimisers from lr_g/lr_d, weight_decay_g/weight_decay_d "
                             "and beta1 (DomainBed's); remove model.optimizer and set those instead")
        self.automatic_optimization = False
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        self.discriminator: DomainDiscriminator | None = None
        if num_domains is not None:
            self._build_discriminator(num_domains)

    def _build_discriminator(self, num_domains: int) -> None:
        if self.discriminator is not None:
            if self.discriminator.net[-1].out_features != num_domains:
                raise ValueError(f"DANN was built for {self.discriminator.net[-1].out_features} source domains, "
                                 f"the data has {num_domains}")
            return
        h = self.hparams
        self.discriminator = DomainDiscriminator(self.backbone.num_features, num_domains, h.mlp_width,
                                                 h.mlp_depth, h.mlp_dropout)

    def bind_data(self, dm) -> None:
        super().bind_data(dm)
        self._build_discriminator(len(dm.train_domains))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        heads = sorted(k for k in checkpoint["state_dict"] if k.startswith("discriminator.") and k.endswith(".weight"))
        if self.discriminator is None and heads:  # loaded outside a fit: the checkpoint knows the domains
            last = max(heads, key=lambda k: int(k.split(".")[2]))
            self._build_discriminator(checkpoint["state_dict"][last].shape[0])

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode(x)
        if not z.requires_grad:  # a frozen featuriser: the penalty still needs d/dz
            z = z.detach().requires_grad_()
        d_logits = self.discriminator(z)
        disc_ce = F.cross_entropy(d_logits, domain)
        input_grad = torch.autograd.grad(F.cross_entropy(d_logits, domain, reduction="sum"), [z], create_graph=True)[0]
        gp = input_grad.pow(2).sum(dim=1).mean()
        disc = disc_ce + self.hparams.grad_penalty * gp
        ce = F.cross_entropy(self.head_logits(z), y)
        gen = ce - self.hparams.dann_lambda * disc
        return {"loss": gen, "ce": ce, "disc": disc, "grad_penalty": gp}

    def is_discriminator_step(self, count: int) -> bool:
        d = self.hparams.d_steps_per_g_step
        return count % (1 + d) < d

    def training_step(self, batch, batch_idx):
        x, y, domain, *_ = batch
        self.update_count += 1
        opt_g, opt_d = self.optimizers()
        terms = self.training_losses(x, y, domain)
        if self.is_discriminator_step(int(self.update_count)):
            opt_d.zero_grad()
            self.manual_backward(terms["disc"])
            opt_d.step()
        else:
            opt_d.zero_grad()
            opt_g.zero_grad()
            self.manual_backward(terms["loss"])
            opt_g.step()
        self.log_terms(terms, len(y))
        self.step_schedulers("step")

    def configure_optimizers(self):
        h = self.hparams
        disc = list(self.discriminator.parameters())
        disc_ids = {id(p) for p in disc}
        gen = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_ids]
        opt_g = torch.optim.Adam(gen, lr=h.lr_g, weight_decay=h.weight_decay_g, betas=(h.beta1, 0.9))
        opt_d = torch.optim.Adam(disc, lr=h.lr_d, weight_decay=h.weight_decay_d, betas=(h.beta1, 0.9))
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], [{"scheduler": self.scheduler_factory(o), "interval": h.scheduler_interval}
                                for o in (opt_g, opt_d)]
