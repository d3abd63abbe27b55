"""BDD100K semantic segmentation (Yu et al. 2020): 10k images labelled in Cityscapes train ids."""

from __future__ import annotations

from pathlib import Path

from dg_lightning.data.segmentation.base import SegmentationSet


class BDD100K(SegmentationSet):
    """``images/10k/<split>/<name>.jpg`` with ``labels/sem_seg/masks/<split>/<name>.png`` (train ids,
    255 ignore). The DG benchmark's target is ``val`` (1,000 images)."""

    default_name = "bdd100k"
    layout = "  images/10k/{train,val}/<name>.jpg\n  labels/sem_seg/masks/{train,val}/<name>.png"
    download = ("register at https://bdd-data.berkeley.edu, download `bdd100k_images_10k.zip` and "
                "`bdd100k_sem_seg_labels_trainval.zip`, unzip both into ROOT (their `bdd100k/` folder)")

    def find_pairs(self) -> list[tuple[Path, Path]]:
        images = self.root / "images" / "10k" / self.split
        if not images.is_dir():
            raise self.missing(f"{images} does not exist")
        labels = self.root / "labels" / "sem_seg" / "masks" / self.split
        return [(img, self.label_for(img, labels / f"{img.stem}.png")) for img in sorted(images.glob("*.jpg"))]
