"""GroupDRO: distributionally robust optimisation over the source domains (Sagawa et al., ICLR 2020,
Algorithm 1), DomainBed's ``GroupDRO``.

A weight per domain, ``q`` (uniform at the start), is raised exponentially in that domain's current
risk, and the loss is the ``q``-weighted sum of the risks, so the worst domains dominate:

    R_k = CE(f(x_k), y_k);   q_k <- q_k * exp(eta * R_k) / sum_j q_j * exp(eta * R_j);   L = sum_k q_k R_k

Follows ``GroupDRO.update`` (``domainbed/algorithms.py``): one forward pass per domain, ``q`` updated
with the detached risks before the loss, kept across steps (a buffer, saved in checkpoints),
``groupdro_eta`` = 0.01 (search 10^U(-3, -1)). Under DDP the ``q`` update uses the risks averaged over
ranks so that every rank keeps the same weights (DomainBed is single-process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_lightning.core.method import DGMethod
from dg_lightning.methods.common import domain_minibatches


def groupdro_weights(q: torch.Tensor, risks: torch.Tensor, eta: float) -> torch.Tensor:
    """The exponentiated-gradient step on the simplex: ``q * exp(eta * risks)``, renormalised."""
    q = q * torch.exp(eta * risks)
    return q / q.sum()


class GroupDRO(DGMethod):
    """Risks of the source domains weighted by online worst-case domain weights ``q``."""

    tasks = ("classification",)

    def __init__(self, groupdro_eta: float = 1e-2, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.register_buffer("q", torch.ones(0))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        q = checkpoint["state_dict"].get("q")
        if q is not None:
            self.q = torch.empty_like(q, device=self.q.device)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        risks = torch.stack([F.cross_entropy(self(xk), yk) for xk, yk in domain_minibatches(x, y, domain)])
        if len(self.q) != len(risks):
            self.q = torch.ones(len(risks), device=risks.device)
        observed = risks.detach()
        if self._trainer is not None and self.trainer.world_size > 1:
            observed = self.all_gather(observed).mean(0)
        self.q = groupdro_weights(self.q, observed, self.hparams.groupdro_eta)
        loss = torch.dot(risks, self.q.to(risks.dtype))
        return {"loss": loss, "ce": risks.mean(), "worst_q": self.q.max()}
