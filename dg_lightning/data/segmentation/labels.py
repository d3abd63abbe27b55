"""Label spaces: the 19 Cityscapes train classes, and each dataset's ids mapped onto them.

Every segmentation data module yields labels in Cityscapes train ids (0-18) with 255 = ignore.
The tables are the official ones: Cityscapes ``labelIds`` -> ``trainId`` from the Cityscapes
scripts (``cityscapesscripts/helpers/labels.py``), which GTA5 shares; Mapillary Vistas v1.2 (66
classes) -> 19 by the table the DG segmentation benchmarks use (road markings and manholes count as
road, curbs as sidewalk, both pole kinds as pole, front-facing signs as traffic sign, every rider
as rider); CamVid's 11 SegNet classes onto the 11 Cityscapes classes they name (see
``../shared/data/camvid/README.md``).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

#: Cityscapes label id -> train id (ids absent here are ignored: void, parking, rail track, guard
#: rail, bridge, tunnel, polegroup, caravan, trailer, license plate)
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

#: Mapillary Vistas v1.2 class index -> Cityscapes train id
MAPILLARY_TO_TRAIN: dict[int, int] = {
    13: 0, 24: 0, 41: 0,           # road, marking--general, manhole
    2: 1, 15: 1,                   # curb, sidewalk
    17: 2, 6: 3, 3: 4,             # building, wall, fence
    45: 5, 47: 5,                  # pole, utility pole
    48: 6, 50: 7,                  # traffic light, traffic sign (front)
    30: 8, 29: 9, 27: 10,          # vegetation, terrain, sky
    19: 11, 20: 12, 21: 12, 22: 12,  # person; bicyclist, motorcyclist, other rider
    55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,  # car, truck, bus, on-rails, motorcycle, bicycle
}

#: CamVid (SegNet release) id -> Cityscapes train id; 11 = unlabelled
CAMVID_TO_TRAIN: dict[int, int] = {0: 10, 1: 2, 2: 5, 3: 0, 4: 1, 5: 8, 6: 7, 7: 4, 8: 13, 9: 11, 10: 12}
#: the Cityscapes classes a CamVid label can name: its scores are averaged over these
CAMVID_CLASSES: tuple[int, ...] = tuple(sorted(set(CAMVID_TO_TRAIN.values())))


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: ``table[id]`` is the train id, 255 for ids the mapping leaves out."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for k, v in mapping.items():
        table[k] = v
    return table


def remap(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map an integer label image through ``lookup_table``; ids above 255 are an error."""
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label ids must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return table[label]


# Cityscapes' colours of the 19 classes, for overlays (from the Cityscapes scripts)
CITYSCAPES_PALETTE: np.ndarray = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 in Cityscapes colours; ignore is black."""
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = label < len(CITYSCAPES_PALETTE)
    out[valid] = CITYSCAPES_PALETTE[label[valid]]
    return out
