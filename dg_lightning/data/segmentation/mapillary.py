"""Mapillary Vistas v1.2 (Neuhold et al. 2017): 66 classes mapped onto the 19 Cityscapes ones."""

from __future__ import annotations

from pathlib import Path

from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.data.segmentation.labels import MAPILLARY_TO_TRAIN, lookup_table


class MapillaryVistas(SegmentationSet):
    """``<split>/images/<key>.jpg`` with ``<split>/v1.2/labels/<key>.png`` (class indices 0-65,
    :data:`~dg_lightning.data.segmentation.labels.MAPILLARY_TO_TRAIN`). ``split``: ``validation``
    (2,000 images, the DG target) or ``training``."""

    default_name = "mapillary"
    layout = "  validation/images/<key>.jpg\n  validation/v1.2/labels/<key>.png"
    download = ("request the research edition at https://www.mapillary.com/dataset/vistas and unzip "
                "`mapillary-vistas-dataset_public_v2.0.zip` (it holds the v1.2 labels) into ROOT")
    table = lookup_table(MAPILLARY_TO_TRAIN)

    def __init__(self, root: str, split: str = "validation", version: str = "v1.2", name: str | None = None,
                 max_samples: int | None = None):
        super().__init__(root, split, name, max_samples)
        self.version = version

    def find_pairs(self) -> list[tuple[Path, Path]]:
        images = self.root / self.split / "images"
        if not images.is_dir():
            raise self.missing(f"{images} does not exist")
        labels = self.root / self.split / self.version / "labels"
        return [(img, self.label_for(img, labels / f"{img.stem}.png")) for img in sorted(images.glob("*.jpg"))]
