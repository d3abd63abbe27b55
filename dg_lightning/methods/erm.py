"""ERM: cross-entropy on the pooled source domains (Vapnik; DomainBed's baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dg_lightning.core.method import DGMethod


class ERM(DGMethod):
    """Empirical risk minimisation: ``L = CE(f(x), y)`` over the domain-balanced batch."""

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self(x), y)
        return {"loss": ce, "ce": ce}
