"""Small segmentation datasets written in their official on-disk layouts (for the data tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _img(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def ids_image(ids: list[int], h: int = 8, w: int = 12) -> np.ndarray:
    """A label image whose rows cycle through ``ids``."""
    return np.array([[ids[r % len(ids)]] * w for r in range(h)], dtype=np.uint8)


def write_cityscapes(root: Path, split: str = "val", n: int = 2, h: int = 32, w: int = 64, suffix: str = ".png",
                     ids: list[int] | None = None) -> Path:
    ids = ids or [7, 8, 26, 0, 23]
    for i in range(n):
        city = ["aachen", "bremen"][i % 2]
        stem = f"{city}_{i:06d}_000019"
        _img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit{suffix}", h, w, i)
        _label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids_image(ids, h, w))
    return root


def write_gta5(root: Path, n: int = 4, h: int = 20, w: int = 36, ids: list[int] | None = None) -> Path:
    from scipy.io import savemat

    ids = ids or [7, 26, 3]
    for i in range(1, n + 1):
        _img(root / "images" / f"{i:05d}.png", h, w, i)
        lh, lw = (h, w) if i != 2 else (h // 2, w // 2)  # image 2's label is smaller than its image
        _label(root / "labels" / f"{i:05d}.png", ids_image(ids, lh, lw))
    savemat(root / "split.mat", {"trainIds": np.array([[1], [2], [3]]), "valIds": np.array([[4]]),
                                 "testIds": np.array([[4]])})
    return root


def write_dark_zurich(root: Path, n: int = 2, h: int = 16, w: int = 24) -> Path:
    for i in range(n):
        stem = f"GOPR0356_frame_{i:06d}"
        _img(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png", h, w, i)
        _label(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png", ids_image([0, 10, 255], h, w))
        _label(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelIds.png", ids_image([7, 23, 0], h, w))
    return root


def write_acdc(root: Path, conditions=("fog", "night"), n: int = 2, h: int = 16, w: int = 24) -> Path:
    for c in conditions:
        for i in range(n):
            stem = f"GOPR0475_frame_{i:06d}"
            _img(root / "rgb_anon" / c / "val" / "GOPR0475" / f"{stem}_rgb_anon.png", h, w, i)
            _label(root / "gt" / c / "val" / "GOPR0475" / f"{stem}_gt_labelTrainIds.png", ids_image([2, 8, 255], h, w))
    return root


def write_bdd(root: Path, n: int = 2, h: int = 16, w: int = 24) -> Path:
    for i in range(n):
        name = f"7d2f7975-e0c1c5a{i}"
        _img(root / "images" / "10k" / "val" / f"{name}.jpg", h, w, i)
        _label(root / "labels" / "sem_seg" / "masks" / "val" / f"{name}.png", ids_image([13, 0, 255], h, w))
    return root


def write_mapillary(root: Path, n: int = 2, h: int = 16, w: int = 24, ids: list[int] | None = None) -> Path:
    ids = ids or [13, 24, 41, 2, 45, 47, 65, 63, 55, 21]
    for i in range(n):
        key = f"-{i}xYz_Key"
        _img(root / "validation" / "images" / f"{key}.jpg", h, w, i)
        _label(root / "validation" / "v1.2" / "labels" / f"{key}.png", ids_image(ids, h, w))
    return root


def write_camvid(root: Path, h: int = 24, w: int = 32, ids: list[int] | None = None) -> Path:
    ids = ids or [0, 3, 8, 11]
    lines = []
    for seq, frame in [("0001TP", "008550"), ("0001TP", "008580"), ("Seq05VD", "f00000"), ("Seq05VD", "f00030")]:
        name = f"{seq}_{frame}"
        _img(root / "test" / f"{name}.png", h, w, len(lines))
        _label(root / "testannot" / f"{name}.png", ids_image(ids, h, w))
        lines.append(f"/SegNet/CamVid/test/{name}.png /SegNet/CamVid/testannot/{name}.png")  # as the SegNet tutorial
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    return root
