"""ACDC (Sakaridis et al. 2021): fog, night, rain and snow, each its own target."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dg_lightning.data.segmentation.base import SegmentationSet


class ACDC(SegmentationSet):
    """``rgb_anon/<condition>/<split>/GOPRxxxx/<stem>_rgb_anon.png`` with
    ``gt/<condition>/<split>/GOPRxxxx/<stem>_gt_labelTrainIds.png``; one condition per instance,
    named ``acdc_<condition>`` by default."""

    layout = ("  rgb_anon/{fog,night,rain,snow}/{train,val,test}/GOPRxxxx/<stem>_rgb_anon.png\n"
              "  gt/{fog,night,rain,snow}/{train,val}/GOPRxxxx/<stem>_gt_labelTrainIds.png")
    download = ("register at https://acdc.vision.ee.ethz.ch, download `rgb_anon_trainvaltest.zip` and "
                "`gt_trainval.zip`, unzip both into ROOT")

    def __init__(self, root: str, condition: Literal["fog", "night", "rain", "snow"] = "fog", split: str = "val",
                 name: str | None = None, max_samples: int | None = None):
        super().__init__(root, split, name or f"acdc_{condition}", max_samples)
        self.condition = condition

    def find_pairs(self) -> list[tuple[Path, Path]]:
        gt = self.root / "gt" / self.condition / self.split
        return self.pairs_by_suffix(self.root / "rgb_anon" / self.condition / self.split, "_rgb_anon.png",
                                    lambda seq, stem: gt / seq / f"{stem}_gt_labelTrainIds.png")
