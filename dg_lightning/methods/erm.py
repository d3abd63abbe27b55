"""ERM: cross-entropy on the pooled source domains (Vapnik; DomainBed's baseline), or per pixel."""

from __future__ import annotations

import torch

from dg_lightning.core.method import DGMethod


class ERM(DGMethod):
    """Empirical risk minimisation: ``L = CE(f(x), y)`` over the domain-balanced batch (per pixel,
    255 ignored, for segmentation)."""

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = self.task_loss(self(x), y)
        return {"loss": ce, "ce": ce}
