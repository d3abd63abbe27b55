"""Cityscapes (Cordts et al. 2016) in its official layout; also reads the pix2pix JPEG copy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.data.segmentation.labels import CITYSCAPES_ID_TO_TRAIN, lookup_table


class Cityscapes(SegmentationSet):
    """``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (mapped to train ids by the official table)
    or ``_gtFine_labelTrainIds.png`` (``label_type="labelTrainIds"``, as written by the
    Cityscapes scripts' ``createTrainIdLabelImgs``).

    Args:
        label_type: ``labelIds`` (always in the official download) or ``labelTrainIds``.
        image_suffix: ``_leftImg8bit.png`` officially; ``_leftImg8bit.jpg`` for JPEG copies.
    """

    default_name = "cityscapes"
    layout = ("  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
              "  gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")
    download = ("register at https://www.cityscapes-dataset.com, then `pip install cityscapesscripts && "
                "csDownload -d ROOT gtFine_trainvaltest.zip leftImg8bit_trainvaltest.zip` and unzip both in ROOT")

    def __init__(self, root: str, split: str = "val", label_type: Literal["labelIds", "labelTrainIds"] = "labelIds",
                 image_suffix: str = "_leftImg8bit.png", name: str | None = None, max_samples: int | None = None):
        super().__init__(root, split, name, max_samples)
        self.label_type, self.image_suffix = label_type, image_suffix
        self.table = lookup_table(CITYSCAPES_ID_TO_TRAIN) if label_type == "labelIds" else None

    def find_pairs(self) -> list[tuple[Path, Path]]:
        images = self.root / "leftImg8bit" / self.split
        gt = self.root / "gtFine" / self.split
        pairs = self.pairs_by_suffix(images, self.image_suffix,
                                     lambda city, stem: gt / city / f"{stem}_gtFine_{self.label_type}.png")
        if not pairs and any(images.glob("*/*_leftImg8bit.*")):
            found = next(images.glob("*/*_leftImg8bit.*")).name
            raise self.missing(f"no image ends in {self.image_suffix!r} (found e.g. {found}): set image_suffix")
        return pairs
