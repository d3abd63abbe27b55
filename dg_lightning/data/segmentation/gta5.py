"""GTA5 (Richter et al. 2016, "Playing for Data"): synthetic source with Cityscapes label ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dg_lightning.core.errors import ConfigError
from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.data.segmentation.labels import CITYSCAPES_ID_TO_TRAIN, lookup_table, remap

SPLIT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}


class GTA5(SegmentationSet):
    """``images/NNNNN.png`` and ``labels/NNNNN.png`` (Cityscapes label ids). The split comes from
    the official ``split.mat`` (1-based ``trainIds``/``valIds``/``testIds``: 12,403 / 6,382 / 6,181)
    or a text list ``<split>.txt`` of file names; ``split="all"`` reads every image (the usual DG
    source). A few images differ in size from their label: the label is resized to its image with
    nearest neighbour, never the image to the label.
    """

    default_name = "gta5"
    layout = "  images/00001.png ... 24966.png\n  labels/00001.png ... (Cityscapes label ids)\n  split.mat (optional)"
    download = ("https://download.visinf.tu-darmstadt.de/data/from_games/ : the 10 parts "
                "`01_images.zip`..`10_images.zip` and `01_labels.zip`..`10_labels.zip` unzipped into ROOT, "
                "and `read_mapping.zip` for split.mat")
    table = lookup_table(CITYSCAPES_ID_TO_TRAIN)
    resizes_labels = True  # a handful of GTA5 labels differ in size from their image (read_label)

    def __init__(self, root: str, split: str = "all", name: str | None = None, max_samples: int | None = None):
        super().__init__(root, split, name, max_samples)

    def split_ids(self) -> list[str] | None:
        """File stems of ``split`` (``None`` = every image)."""
        if self.split == "all":
            return None
        listing = self.root / f"{self.split}.txt"
        if listing.is_file():
            return [Path(line.split()[0]).stem for line in listing.read_text().splitlines() if line.strip()]
        mat = self.root / "split.mat"
        if mat.is_file():
            from scipy.io import loadmat

            if self.split not in SPLIT_KEYS:
                raise ConfigError(f"GTA5 split {self.split!r}: choose train, val, test or all")
            ids = np.asarray(loadmat(mat)[SPLIT_KEYS[self.split]]).ravel()
            return [f"{int(i):05d}" for i in ids]
        raise self.missing(f"split {self.split!r} needs split.mat or {self.split}.txt (or use split='all')")

    def find_pairs(self) -> list[tuple[Path, Path]]:
        images = self.root / "images"
        if not images.is_dir():
            raise self.missing(f"{images} does not exist")
        wanted = self.split_ids()
        paths = sorted(images.glob("*.png")) if wanted is None else [images / f"{s}.png" for s in wanted]
        pairs = []
        for img in paths:
            if not img.is_file():
                raise self.missing(f"{img} is listed in the split but missing")
            pairs.append((img, self.label_for(img, self.root / "labels" / img.name)))
        return pairs

    def read_label(self, path: Path, image_size: tuple[int, int]) -> np.ndarray:
        label = Image.open(path)
        if label.size != image_size:  # a handful of GTA5 labels differ in size from their image
            label = label.resize(image_size, Image.NEAREST)
        return remap(np.asarray(label), self.table)
