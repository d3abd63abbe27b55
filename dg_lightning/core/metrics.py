"""Metrics shared by the methods: per-domain classification accuracy (torchmetrics) and
confusion-matrix mean IoU for segmentation.

:class:`SegmentationIoU` accumulates a (C, C) confusion matrix (torchmetrics'
``MulticlassConfusionMatrix``: pixels whose label is ``ignore_index`` are skipped; under DDP the
matrices of all ranks are summed before ``compute``), so the mIoU of a dataset is the same however it
is split into batches or processes, unlike an average of per-image or per-batch IoUs.
IoU_c = TP_c / (TP_c + FP_c + FN_c); a class that is neither in the labels nor predicted has no IoU
(NaN) and is left out of the mean, as in mmsegmentation. ``classes`` restricts the mean to the
classes a dataset labels (CamVid's 11 of the 19 Cityscapes classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationIoU(MulticlassConfusionMatrix):
    """mIoU over ``classes`` (default: all) from a confusion matrix; ``iou()`` gives every class.

    ``update(preds, target)``: ``preds`` are class indices (N, H, W) or logits (N, C, H, W) at the
    label's resolution; ``target`` (N, H, W) holds class indices or ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, classes: Sequence[int] | None = None):
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, normalize=None, validate_args=False)
        self.classes = list(range(num_classes)) if classes is None else sorted(set(classes))
        if not self.classes or min(self.classes) < 0 or max(self.classes) >= num_classes:
            raise ValueError(f"classes {classes} must be a non-empty subset of 0..{num_classes - 1}")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point():
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(target.shape)} differ in size: "
                             "predict at the label's resolution")
        super().update(preds, target)

    def iou(self) -> torch.Tensor:
        """IoU of every class (C,), NaN where a class is neither labelled nor predicted."""
        cm = self.confmat.double()  # rows: label, columns: prediction
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan"))).float()

    def compute(self) -> torch.Tensor:
        return self.iou()[self.classes].nanmean()
