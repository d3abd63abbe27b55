"""Small WILDS datasets in their official layouts (metadata + images, the RELEASE file the package
checks), each with the columns the ``wilds`` package reads. Every image is filled with its class
label's colour (``10 * y``), so a model or test can tell whether labels follow their images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _img(path: Path, y: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 10 * y, np.uint8)).save(path)


def camelyon17(root: Path) -> dict[str, int]:
    """5 hospitals: 0, 3, 4 train (+ id_val via split=1), 1 = val (OOD), 2 = test, as the package assigns."""
    d = root / "camelyon17_v1.0"
    rows = []
    for center in range(5):
        for k in range(6):
            patient, node, y = f"{center:03d}", k % 2, k % 2
            split = 1 if k == 5 else 0  # the package overrides centers 1 (val) and 2 (test)
            x, yc = 32 * k, 64 * center
            rows.append(dict(patient=patient, node=node, x_coord=x, y_coord=yc, tumor=y, slide=2 * center + node,
                             center=center, split=split))
            _img(d / f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{yc}.png", y)
    pd.DataFrame(rows).to_csv(d / "metadata.csv")
    (d / "RELEASE_v1.0.txt").write_text("v1.0\n")
    return {"train": 3 * 5, "id_val": 3, "val": 6, "test": 6}  # id_val: k = 5 of hospitals 0, 3, 4


def iwildcam(root: Path) -> dict[str, int]:
    d = root / "iwildcam_v2.0"
    rows, splits = [], {"train": 0, "id_val": 0, "id_test": 0, "val": 0, "test": 0}
    plan = [("train", 0), ("train", 1), ("id_val", 0), ("id_test", 1), ("val", 2), ("test", 3)]
    for n, (split, location) in enumerate(plan * 2):
        y = n % 3
        rows.append(dict(split=split, filename=f"img{n:03d}.jpg", y=y, location_remapped=location,
                         sequence_remapped=n, datetime=f"2013-06-0{1 + n % 9} 10:00:0{n % 10}.000"))
        splits[split] += 1
        _img(d / "train" / f"img{n:03d}.jpg", y)
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    pd.DataFrame({"y": [0, 1, 2], "category_id": [0, 1, 2], "name": ["empty", "deer", "fox"]}).to_csv(
        d / "categories.csv", index=False)
    (d / "RELEASE_v2.0.txt").write_text("v2.0\n")
    return splits


FMOW_CATEGORIES = ["airport", "airport_hangar", "airport_terminal"]


def fmow(root: Path) -> dict[str, int]:
    """Before 2013: train / id_val / id_test; 2013-2015: val (OOD); 2016 on: test (OOD)."""
    d = root / "fmow_v1.1"
    rows, splits = [], {"train": 0, "id_val": 0, "id_test": 0, "val": 0, "test": 0}
    plan = [("train", 2010, "USA"), ("train", 2011, "FRA"), ("val", 2011, "USA"), ("test", 2012, "FRA"),
            ("val", 2014, "USA"), ("test", 2016, "FRA"), ("test", 2017, "USA")]
    for n, (split, year, country) in enumerate(plan * 2):
        y = n % 3
        rows.append(dict(split=split, category=FMOW_CATEGORIES[y], country_code=country,
                         timestamp=f"{year}-03-04T05:06:07Z"))
        name = ("id_val" if split == "val" else "id_test" if split == "test" else split) if year < 2013 else \
            ("val" if year < 2016 else "test")
        splits[name] += 1
        _img(d / "images" / f"rgb_img_{n}.png", y)
    pd.DataFrame(rows).to_csv(d / "rgb_metadata.csv", index=False)
    pd.DataFrame({"alpha-3": ["USA", "FRA"], "region": ["Americas", "Europe"]}).to_csv(
        d / "country_code_mapping.csv", index=False)
    (d / "RELEASE_v1.1.txt").write_text("v1.1\n")
    return splits


def rxrx1(root: Path) -> dict[str, int]:
    """Site 2 of a train experiment is id_test, as the package assigns."""
    d = root / "rxrx1_v1.0"
    rows, splits = [], {"train": 0, "val": 0, "test": 0, "id_test": 0}
    plan = [("train", "HEPG2-01"), ("train", "HUVEC-01"), ("val", "HEPG2-08"), ("test", "U2OS-04")]
    n = 0
    for dataset, experiment in plan:
        for well, site in [("B02", 1), ("B03", 1), ("B04", 2)]:
            y = n % 3
            rows.append(dict(site_id=f"{experiment}_1_{well}_{site}", well_id=f"{experiment}_1_{well}",
                             cell_type=experiment.split("-")[0], dataset=dataset, experiment=experiment,
                             plate=1, well=well, site=site, well_type="treatment", sirna="s", sirna_id=y))
            splits["id_test" if dataset == "train" and site == 2 else dataset] += 1
            _img(d / "images" / experiment / "Plate1" / f"{well}_s{site}.png", y)
            n += 1
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    (d / "RELEASE_v1.0.txt").write_text("v1.0\n")
    return splits


TREES = {"camelyon17": camelyon17, "iwildcam": iwildcam, "fmow": fmow, "rxrx1": rxrx1}
