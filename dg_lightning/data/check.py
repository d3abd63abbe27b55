"""Check a benchmark's data before training: ``dg-lightning check-data --config ...``.

    dg-lightning check-data --config experiments/pacs/erm.yaml [--quick] [fit overrides: --data.root DIR ...]

Builds the data module exactly as ``fit`` would (same config, same overrides; no model), lists every
domain and class with its image count (segmentation: every source, validation and target set with
its pair count) and reports, each by path:

* a class with no images in a source domain (an empty class folder would otherwise become a class
  the model never sees there);
* an image (or label) that cannot be decoded: every file is decoded, unless ``--quick``;
* a segmentation label whose size differs from its image's (read from the file headers; datasets
  that resize their labels by design, GTA5, are exempt).

Exit status 0 when nothing is wrong, 2 otherwise. ``fit`` runs the cheap part of this check (the
counts, empty classes, label sizes from headers; no decoding) before training starts
(:func:`require_clean`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dg_lightning.core.errors import DataError, DGError

FIX = "dg-lightning check-data --config <your config> lists every problem (and decodes every image)"


@dataclass
class Problem:
    kind: str  # "empty class", "unreadable image", "label size"
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class Report:
    listing: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    checked_files: int = 0


def _error_text(e: Exception) -> str:
    return e.message if isinstance(e, DGError) else f"{type(e).__name__}: {e}"


# -- classification: MultiDomainDataModule ------------------------------------------------------------
def _class_folder(dm, domain: str, cls: str, items: list, labels: np.ndarray, k: int) -> str:
    first = next((items[i] for i in np.flatnonzero(labels == k)[:1]), None)
    if isinstance(first, Path):
        return str(first.parent)
    root = getattr(dm, "root", None)
    return str(Path(root) / domain / cls) if root is not None else f"{domain}/{cls}"


def check_domains(dm, full: bool, progress: Callable[[str], None] | None = None) -> Report:
    """Counts per (domain, class) from the data module's own listing (``_samples``); an empty class
    of a source domain is a problem; with ``full``, every image is decoded with the module's loader."""
    report = Report()
    classes, domains = list(dm.classes), list(dm.domains)
    counts, samples = {}, {}
    for d in domains:
        items, labels = dm._samples(d)
        labels = np.asarray(labels, dtype=int)
        samples[d] = (items, labels)
        counts[d] = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    role = {d: "held out" if d in dm.test_domains else "source" for d in domains}
    width = max(len(c) for c in [*classes, "class", "total"])
    cols = [max(len(d), len(role[d]) + 2, 6) for d in domains]
    root = getattr(dm, "root", None)
    report.listing.append(f"{type(dm).__name__}" + (f" at {root}" if root is not None else "") +
                          f": {len(domains)} domains, {len(classes)} classes")
    report.listing.append(" " * (width + 2) + "  ".join(d.rjust(w) for d, w in zip(domains, cols)))
    report.listing.append(" " * (width + 2) + "  ".join(f"({role[d]})".rjust(w) for d, w in zip(domains, cols)))
    for k, c in enumerate(classes):
        report.listing.append(f"  {c.ljust(width)}" + "  ".join(str(counts[d][k]).rjust(w) for d, w in zip(domains, cols)))
    report.listing.append(f"  {'total'.ljust(width)}" + "  ".join(str(int(counts[d].sum())).rjust(w)
                                                                for d, w in zip(domains, cols)))
    for d in domains:
        items, labels = samples[d]
        for k, c in enumerate(classes):
            if counts[d][k] == 0 and role[d] == "source":
                report.problems.append(Problem(
                    "empty class", _class_folder(dm, d, c, items, labels, k),
                    f"class {c!r} has no images in source domain {d!r} (the model would never see it there); "
                    "put images in it, or leave the domain out (data.domains / data.test_domains), "
                    "or the class (delete its folder in every domain)"))
    if full:
        total = sum(len(samples[d][0]) for d in domains)
        if progress:
            progress(f"decoding {total} images ...")
        for d in domains:
            for item in samples[d][0]:
                try:
                    dm._load(item)
                except Exception as e:  # any decoder error: the file is named
                    report.problems.append(Problem("unreadable image", str(item), _error_text(e)))
                report.checked_files += 1
    return report


# -- segmentation: SegmentationDG ---------------------------------------------------------------------
def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:  # header only: no decoding
        return img.size


def check_segmentation(dm, full: bool, progress: Callable[[str], None] | None = None) -> Report:
    """Pair counts of every set; label vs image size from the headers (unless the dataset resizes its
    labels); with ``full``, every image and label is decoded."""
    report = Report()
    sets = [("source", dm.source)] + ([("val", dm.val)] if dm.val is not None else []) + \
        [("target", t) for t in dm.targets]
    report.listing.append(f"{type(dm).__name__}: {len(sets)} datasets")
    for role, ds in sets:
        report.listing.append(f"  {role:<6} {ds.name:<16} {type(ds).__name__} {ds.split!r}: "
                              f"{len(ds.pairs)} image/label pairs under {ds.root}")
    if full and progress:
        progress(f"decoding {sum(len(ds.pairs) for _, ds in sets)} image/label pairs ...")
    for _, ds in sets:
        for i, (image, label) in enumerate(ds.pairs):
            try:
                if not getattr(ds, "resizes_labels", False):
                    si, sl = _size(image), _size(label)
                    if si != sl:
                        report.problems.append(Problem(
                            "label size", str(label),
                            f"{sl[0]}x{sl[1]}, but its image {image} is {si[0]}x{si[1]}: a label must have "
                            "its image's size (re-export the label, or remove the pair)"))
                        continue
                if full:
                    ds[i]
                    report.checked_files += 2
            except Exception as e:
                report.problems.append(Problem("unreadable image", f"{image} / {label}", _error_text(e)))
    return report


def check(dm, full: bool = True, progress: Callable[[str], None] | None = None) -> Report:
    from dg_lightning.core.data import MultiDomainDataModule
    from dg_lightning.data.segmentation.base import SegmentationDG

    if isinstance(dm, MultiDomainDataModule):
        return check_domains(dm, full, progress)
    if isinstance(dm, SegmentationDG):
        return check_segmentation(dm, full, progress)
    report = Report()
    report.listing.append(dm.describe() if hasattr(dm, "describe") else type(dm).__name__)
    report.listing.append(f"  ({type(dm).__name__}: no checks beyond its own loader's)")
    return report


def problems_error(problems: list[Problem], shown: int = 6) -> DataError:
    lines = [f"the data has {len(problems)} problem(s):"] + [f"  {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return DataError("\n".join(lines), fix=FIX)


def require_clean(dm) -> None:
    """The cheap check ``fit`` runs before training (no decoding): raises a ``DataError`` naming the
    problems by path."""
    from dg_lightning.core.data import MultiDomainDataModule
    from dg_lightning.data.segmentation.base import SegmentationDG

    if not isinstance(dm, (MultiDomainDataModule, SegmentationDG)):
        return  # WILDS and the like: their own loader checks their files
    report = check(dm, full=False)
    if report.problems:
        raise problems_error(report.problems)


def print_report(report: Report) -> int:
    """Print a report (the listing to stdout, the problems to stderr); 0 when clean, else 2."""
    print("\n".join(report.listing))
    if report.checked_files:
        print(f"decoded {report.checked_files} files")
    if report.problems:
        print("\n".join(f"  {p}" for p in report.problems), file=sys.stderr)
        print(f"error: {len(report.problems)} problem(s), listed above", file=sys.stderr)
        return 2
    print("no problems found")
    return 0
