"""Dark Zürich (Sakaridis et al. 2019): night driving; 50 annotated val night images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.data.segmentation.labels import CITYSCAPES_ID_TO_TRAIN, lookup_table


class DarkZurich(SegmentationSet):
    """``rgb_anon/<split>/<condition>/GOPRxxxx/<stem>_rgb_anon.png`` with
    ``gt/<split>/<condition>/GOPRxxxx/<stem>_gt_labelTrainIds.png`` (or ``_gt_labelIds.png``).
    Labels exist for ``val`` ``night`` (50 images), the DG benchmark's target."""

    default_name = "dark_zurich"
    layout = ("  rgb_anon/val/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png\n"
              "  gt/val/night/GOPR0356/GOPR0356_frame_000321_gt_labelTrainIds.png")
    download = ("https://www.trace.ethz.ch/publications/2019/GCMA_UIoU/ : `Dark_Zurich_val_anon.zip` "
                "unzipped into ROOT (registration-free)")

    def __init__(self, root: str, split: str = "val", condition: Literal["night", "twilight", "day"] = "night",
                 label_type: Literal["labelTrainIds", "labelIds"] = "labelTrainIds", name: str | None = None,
                 max_samples: int | None = None):
        super().__init__(root, split, name, max_samples)
        self.condition, self.label_type = condition, label_type
        self.table = lookup_table(CITYSCAPES_ID_TO_TRAIN) if label_type == "labelIds" else None

    def find_pairs(self) -> list[tuple[Path, Path]]:
        gt = self.root / "gt" / self.split / self.condition
        return self.pairs_by_suffix(self.root / "rgb_anon" / self.split / self.condition, "_rgb_anon.png",
                                    lambda seq, stem: gt / seq / f"{stem}_gt_{self.label_type}.png")
