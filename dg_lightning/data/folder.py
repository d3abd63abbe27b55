"""Any ``root/<domain>/<class>/<image>`` tree as a multi-domain benchmark; PACS as a named instance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dg_lightning.core.data import MultiDomainDataModule
from dg_lightning.core.errors import ConfigError, CorruptImageError, DataError, DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; an unreadable file is named in the error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt or truncated files
        raise CorruptImageError(f"cannot read image {path}: {e}",
                                fix="re-download or delete this file; find every unreadable image with "
                                    "`dg-lightning check-data --config <your config>`") from e


def write_resized_copy(root: str | Path, dest: str | Path, side: int, quality: int = 90) -> int:
    """Copy a ``root/<domain>/<class>/<image>`` tree to ``dest`` with every image resized to ``side`` x ``side``
    (bicubic) and saved under its own name and format (JPEG at ``quality``); returns the number of images.

    For measuring what a file's size costs the loader (``bench.speed --file-side``): a copy resized up from
    small files decodes at the cost of the larger size, with smoother content than an original of that size.
    """
    root, dest = Path(root), Path(dest)
    files = sorted(p for p in root.glob("*/*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataNotFoundError(f"no images under {root} in the layout <root>/<domain>/<class>/<image>",
                                fix="point it at a dataset folder laid out as <root>/<domain>/<class>/<image>.jpg")
    for path in files:
        out = dest / path.relative_to(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        load_rgb(path).resize((side, side), Image.BICUBIC).save(out, quality=quality)
    return len(files)


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDomains(MultiDomainDataModule):
    """``root/<domain>/<class>/*.{jpg,png,...}``: domains and classes found from the folders.

    Args:
        root: the dataset folder.
        domains: use only these domains (default: every sub-folder of ``root``).
        (everything else: see :class:`MultiDomainDataModule`)
    """

    layout_hint = "<root>/<domain>/<class>/<image>.jpg (one folder per domain, one sub-folder per class)"

    def __init__(self, root: str | None = None, domains: list[str] | None = None, **kwargs):
        self.root = self._resolve_root(root)
        self._only_domains = domains
        super().__init__(**kwargs)

    @classmethod
    def _resolve_root(cls, root: str | None) -> Path:
        if root is None:
            raise ConfigError(f"{cls.__name__} needs data.root: a folder laid out as {cls.layout_hint}")
        return Path(root).expanduser()

    def _discover(self) -> tuple[list[str], list[str]]:
        if not self.root.is_dir():
            raise self._missing(self.root)
        domains = _subdirs(self.root)
        if self._only_domains:
            unknown = [d for d in self._only_domains if d not in domains]
            if unknown:
                raise ConfigError(f"unknown domain(s) {unknown} under {self.root}; valid domains: {domains}")
            domains = list(self._only_domains)
        classes = sorted({c for d in domains for c in _subdirs(self.root / d)})
        if not domains or not classes:
            raise self._missing(self.root / "<domain>" / "<class>")
        return domains, classes

    def _samples(self, domain: str) -> tuple[list[Path], list[int]]:
        items, labels = [], []
        for k, c in enumerate(self.classes):
            folder = self.root / domain / c
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            items += files
            labels += [k] * len(files)
        return items, labels

    def _load(self, item: Path) -> Image.Image:
        return load_rgb(item)


class PACS(ImageFolderDomains):
    """PACS (Li et al., ICCV 2017): 4 domains, 7 classes, 9,991 images.

    ``root`` defaults to ``$PACS_ROOT``. Official split files (``<domain>_train_kfold.txt``,
    ``<domain>_crossval_kfold.txt``, ``<domain>_test_kfold.txt``; 1-based labels), when found in
    ``root``, ``root/splits`` or ``root/pacs_label``, replace the seeded 80/20 split.
    """

    DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
    CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    layout_hint = "<root>/{art_painting,cartoon,photo,sketch}/{dog,elephant,giraffe,guitar,horse,house,person}/*.jpg"
    download_hint = "dg-lightning download pacs --root DIR  (then data.root=DIR or PACS_ROOT=DIR)"

    @classmethod
    def _resolve_root(cls, root: str | None) -> Path:
        root = root or os.environ.get("PACS_ROOT")
        if root is None:
            raise ConfigError(
                f"PACS needs data.root (or the PACS_ROOT environment variable): a folder laid out as "
                f"{cls.layout_hint}. To get the data: {cls.download_hint}"
            )
        return Path(root).expanduser()

    def _discover(self) -> tuple[list[str], list[str]]:
        for d in self.DOMAINS:
            for c in self.CLASSES:
                if not (self.root / d / c).is_dir():
                    raise self._missing(self.root / d / c)
        domains = list(self._only_domains or self.DOMAINS)
        unknown = [d for d in domains if d not in self.DOMAINS]
        if unknown:
            raise ConfigError(f"unknown PACS domain(s) {unknown}; valid domains: {list(self.DOMAINS)}")
        return domains, list(self.CLASSES)

    def _split_file(self, domain: str, part: str) -> Path | None:
        for folder in (self.root, self.root / "splits", self.root / "pacs_label"):
            p = folder / f"{domain}_{part}_kfold.txt"
            if p.is_file():
                return p
        return None

    def _official_split(self, domain: str, n: int) -> dict[str, np.ndarray] | None:
        files = {part: self._split_file(domain, part) for part in ("train", "crossval", "test")}
        if not all(files.values()):
            return None
        items, labels = self._data[domain]
        index = {p.relative_to(self.root).as_posix(): i for i, p in enumerate(items)}
        split = {}
        for part, key in (("train", "in"), ("crossval", "out"), ("test", "test")):
            idx = []
            for line_no, line in enumerate(files[part].read_text().splitlines(), 1):
                if not line.strip():
                    continue
                rel, label = line.split()
                # official lists prefix the path ("PACS/photo/dog/x.jpg", "kfold/photo/..."): keep it from the domain on
                parts = rel.replace("\\", "/").split("/")
                if domain not in parts:
                    raise DataError(f"{files[part]}:{line_no}: {rel} is not under domain folder {domain!r}")
                rel = "/".join(parts[len(parts) - 1 - parts[::-1].index(domain):])
                if rel not in index:
                    raise DataNotFoundError(f"{files[part]}:{line_no} lists {rel}, not found under {self.root}")
                if labels[index[rel]] != int(label) - 1:
                    raise DataError(f"{files[part]}:{line_no}: label {label} disagrees with folder of {rel}")
                idx.append(index[rel])
            split[key] = np.asarray(sorted(idx), dtype=int)
        return split
