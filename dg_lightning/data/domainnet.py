"""DomainNet (Peng et al., ICCV 2019): 6 domains, 345 classes, ~586k images, read from the official lists.

Layout (the official archives unpacked side by side, with the official image lists)::

    <root>/clipart/aircraft_carrier/clipart_001_000001.jpg
    <root>/{clipart,infograph,painting,quickdraw,real,sketch}/<class>/*.jpg
    <root>/<domain>_train.txt     # "clipart/aircraft_carrier/clipart_001_000001.jpg 0" per line
    <root>/<domain>_test.txt

The lists are parsed once into an index cached next to them (``<root>/.dg_lightning/domainnet_index.json``,
or ``$DG_CACHE``/``~/.cache/dg-lightning`` when ``root`` is read-only), keyed on the lists' sizes and
modification times: no directory walk, and no re-parse unless a list changes. Class names are the
folder names of the lists, ordered by their label.

Protocols:

* ``domainbed`` (default, DomainBed's): every image of a domain (train and test lists), a seeded
  80/20 in/out split of each source domain, held-out domains tested whole, leave-one-domain-out;
* ``official``: each source domain's train list split 80/20 into in/out, held-out domains tested
  on their test list (the numbers the DomainNet paper's splits give).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from dg_lightning.core.cache import cache_candidates, writable_folder
from dg_lightning.core.data import MultiDomainDataModule, holdout_split, stable_seed
from dg_lightning.core.errors import ConfigError, DataError
from dg_lightning.data.folder import load_rgb

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
URL = "http://ai.bu.edu/M3SDA/"


def parse_list(path: Path, domain: str) -> tuple[list[str], list[int], dict[int, str]]:
    """(relative image paths, labels, {label: class folder}) of one official list file."""
    items, labels, names = [], [], {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{line_no}: expected '<domain>/<class>/<image> <label>', got {line!r}")
        rel, label = parts[0].replace("\\", "/"), int(parts[1])
        segs = rel.split("/")
        if len(segs) != 3 or segs[0] != domain:
            raise DataError(f"{path}:{line_no}: {rel} is not '{domain}/<class>/<image>'")
        if names.setdefault(label, segs[1]) != segs[1]:
            raise DataError(f"{path}:{line_no}: label {label} is class {names[label]!r} elsewhere, {segs[1]!r} here")
        items.append(rel)
        labels.append(label)
    return items, labels, names


class DomainNet(MultiDomainDataModule):
    """DomainNet from its official lists (see module docstring).

    Args:
        root: the dataset folder (default ``$DOMAINNET_ROOT``).
        domains: use only these domains (default: all six).
        protocol: ``domainbed`` or ``official`` (module docstring).
        cache_dir: where the parsed index (and, with ``cache_images``, the decoded images) go (default:
            ``<root>/.dg_lightning``, else ``$DG_CACHE`` or ``~/.cache/dg-lightning``).
        (everything else: :class:`~dg_lightning.core.data.MultiDomainDataModule`)
    """

    DOMAINS = DOMAINS
    layout_hint = ("<root>/{clipart,infograph,painting,quickdraw,real,sketch}/<class>/<image>.jpg and "
                   "<root>/<domain>_{train,test}.txt (the official lists)")
    download_hint = (f"the six domain zips and the txt lists from {URL} (DomainBed's "
                     "domainbed/scripts/download.py fetches the same files), unpacked into root")

    def __init__(self, root: str | None = None, domains: list[str] | None = None,
                 protocol: Literal["domainbed", "official"] = "domainbed", cache_dir: str | None = None, **kwargs):
        root = root or os.environ.get("DOMAINNET_ROOT")
        if root is None:
            raise ConfigError(f"DomainNet needs data.root (or DOMAINNET_ROOT): a folder laid out as "
                             f"{self.layout_hint}. To get the data: {self.download_hint}")
        self.root = Path(root).expanduser()
        if protocol not in ("domainbed", "official"):
            raise ConfigError(f"protocol {protocol!r}: choose domainbed or official")
        self.protocol, self._only_domains, self.cache_dir = protocol, domains, cache_dir
        self.index = self._load_index()
        super().__init__(cache_dir=cache_dir, **kwargs)

    # -- the cached index ------------------------------------------------------------------------
    def _list_files(self, domain: str) -> dict[str, Path]:
        return {part: self.root / f"{domain}_{part}.txt" for part in ("train", "test")}

    def _check_layout(self) -> None:
        if not self.root.is_dir():
            raise self._missing(self.root)
        for d in self._only_domains or DOMAINS:
            if d not in DOMAINS:
                raise ConfigError(f"unknown DomainNet domain {d!r}; valid domains: {list(DOMAINS)}")
            for path in [*self._list_files(d).values(), self.root / d]:
                if not path.exists():
                    raise self._missing(path)

    def _cache_path(self) -> Path:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        return writable_folder(cache_candidates(self.root, self.cache_dir)) / f"domainnet_index_{key}.json"

    def _fingerprint(self) -> dict[str, list[int]]:
        out = {}
        for d in DOMAINS:
            for part, path in self._list_files(d).items():
                if path.exists():
                    st = path.stat()
                    out[f"{d}_{part}"] = [st.st_size, st.st_mtime_ns]
        return out

    def _load_index(self) -> dict:
        """{"classes": [...], "lists": {"<domain>_<part>": [[rel, label], ...]}}: parsed once, then cached."""
        self._check_layout()
        cache, fingerprint = self._cache_path(), self._fingerprint()
        if cache.is_file():
            index = json.loads(cache.read_text())
            if index.get("fingerprint") == fingerprint:
                self.index_cached = True
                return index
        self.index_cached = False
        lists, names = {}, {}
        for d in DOMAINS:
            for part, path in self._list_files(d).items():
                if not path.exists():
                    continue
                items, labels, n = parse_list(path, d)
                for label, name in n.items():
                    if names.setdefault(label, name) != name:
                        raise DataError(f"{path}: label {label} is {name!r}, but {names[label]!r} in another list")
                lists[f"{d}_{part}"] = [items, labels]
        if sorted(names) != list(range(len(names))):
            raise DataError(f"the lists' labels are not 0..{len(names) - 1}: missing {sorted(set(range(len(names))) - set(names))}")
        index = {"fingerprint": fingerprint, "classes": [names[k] for k in range(len(names))], "lists": lists}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(index))
        tmp.replace(cache)
        return index

    # -- MultiDomainDataModule -------------------------------------------------------------------
    def _discover(self) -> tuple[list[str], list[str]]:
        return list(self._only_domains or DOMAINS), list(self.index["classes"])

    def _samples(self, domain: str) -> tuple[list[Path], list[int]]:
        items, labels = [], []
        for part in ("train", "test"):
            rel, lab = self.index["lists"][f"{domain}_{part}"]
            items += [self.root / r for r in rel]
            labels += lab
        return items, labels

    def _official_split(self, domain: str, n: int) -> dict[str, np.ndarray] | None:
        if self.protocol != "official":
            return None
        n_train = len(self.index["lists"][f"{domain}_train"][0])
        i_in, i_out = holdout_split(n_train, self.holdout_fraction, stable_seed(self._seed(), domain))
        return {"in": i_in, "out": i_out, "test": np.arange(n_train, n)}

    def _load(self, item: Path):
        return load_rgb(item)
