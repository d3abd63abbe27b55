"""DomainBed's protocol for its named benchmarks, and VLCS, OfficeHome and TerraIncognita on the folder module.

DomainBed (Gulrajani & Lopez-Paz 2021; ``domainbed/scripts/train.py``, ``domainbed/lib/misc.py``)
splits *every* environment, held-out ones included, the same way: the indices ``0..n-1`` shuffled by
``np.random.RandomState(seed_hash(trial_seed, env_index))``, the first ``int(n * holdout_fraction)``
form the "out" split, the rest the "in" split. Sources train on "in" and are validated on "out";
a held-out environment is *tested on its "in" split* (``env<i>_in_acc`` in ``collect_results.py``),
and its "out" split is what the oracle selection looks at. :class:`DomainBedSplit` gives a data
module exactly that split (same members as DomainBed's for the same trial seed and sample order;
the trial seed is ``data.split_seed``, by default the run's seed), and the named benchmarks below
test on the "in" split by default (``data.test_split: in``; ``full`` tests the whole domain).

The folder benchmarks read DomainBed's on-disk layout (what ``domainbed/scripts/download.py``
produces): one folder per environment, one sub-folder per class, environments in sorted order (their
index in DomainBed's ``ENVIRONMENTS``), classes in sorted order. One deliberate difference:
DomainBed numbers the classes of each environment from that environment's own folders; here the
class list is the benchmark's, so a class folder missing from one environment cannot shift the labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dg_lightning.core.errors import ConfigError, DataError
from dg_lightning.core.seeding import seed_hash
from dg_lightning.data.folder import ImageFolderDomains, _subdirs
from dg_lightning.data.segmentation.base import expand_root


def domainbed_holdout(n: int, fraction: float, trial_seed: int, env_index: int) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's (in, out) split of ``range(n)`` for environment ``env_index`` (sorted index arrays)."""
    keys = np.random.RandomState(seed_hash(int(trial_seed), int(env_index))).permutation(n)
    n_out = int(n * fraction)
    return np.sort(keys[n_out:]), np.sort(keys[:n_out])


class DomainBedSplit:
    """Mixin for a :class:`~dg_lightning.core.data.MultiDomainDataModule`: DomainBed's seeded in/out
    split of every domain (see the module docstring). ``ENVIRONMENTS`` lists the benchmark's domains in
    DomainBed's order; a domain's index there seeds its split."""

    ENVIRONMENTS: tuple[str, ...] = ()

    def _official_split(self, domain: str, n: int) -> dict[str, np.ndarray]:
        i_in, i_out = domainbed_holdout(n, self.holdout_fraction, self._seed(), self.ENVIRONMENTS.index(domain))
        return {"in": i_in, "out": i_out, "test": np.arange(n)}


class DomainBedFolder(DomainBedSplit, ImageFolderDomains):
    """A DomainBed image benchmark in its official folder layout (subclasses name the domains and classes).

    Args:
        root: the benchmark's folder (the one holding the environment folders; ``$VAR`` and
            ``${VAR:-default}`` expanded).
        domains: use only these environments (default: all).
        test_split: ``in`` (DomainBed: the held-out environment's 80 % "in" split) or ``full``.
        (everything else: see :class:`~dg_lightning.core.data.MultiDomainDataModule`)
    """

    CLASSES: tuple[str, ...] = ()

    def __init__(self, root: str | None = None, domains: list[str] | None = None, test_split: str = "in", **kwargs):
        super().__init__(root=root, domains=domains, test_split=test_split, **kwargs)

    @property
    def layout_hint(self) -> str:  # quoted in the base's errors about a missing path
        return self._layout()

    @classmethod
    def _layout(cls) -> str:
        return f"<root>/{{{','.join(cls.ENVIRONMENTS)}}}/<class>/*.jpg ({len(cls.CLASSES)} classes)"

    def _discover(self) -> tuple[list[str], list[str]]:
        if not self.root.is_dir():
            raise self._missing(self.root)
        for d in self.ENVIRONMENTS:
            if not (self.root / d).is_dir():
                raise self._missing(self.root / d)
        found = {c for d in self.ENVIRONMENTS for c in _subdirs(self.root / d)}
        missing, extra = sorted(set(self.CLASSES) - found), sorted(found - set(self.CLASSES))
        if missing or extra:
            raise DataError(f"{type(self).__name__} under {self.root}: class folders "
                             f"{'missing ' + str(missing) if missing else ''}{' and ' if missing and extra else ''}"
                             f"{'not of this benchmark ' + str(extra) if extra else ''}; expected {list(self.CLASSES)} "
                             f"in {self._layout()}")
        domains = list(self._only_domains or self.ENVIRONMENTS)
        unknown = [d for d in domains if d not in self.ENVIRONMENTS]
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} domain(s) {unknown}; valid domains: {list(self.ENVIRONMENTS)}")
        return domains, sorted(self.CLASSES)

    @classmethod
    def _resolve_root(cls, root: str | None) -> Path:
        if root is None:
            raise ConfigError(f"{cls.__name__} needs data.root: a folder laid out as {cls._layout()}. "
                             f"To get the data: {cls.download_hint}")
        return expand_root(root)


class VLCS(DomainBedFolder):
    """VLCS (Fang et al., ICCV 2013): PASCAL VOC 2007, LabelMe, Caltech-101, SUN09; 5 classes, 10,729
    images. DomainBed's archive (``VLCS.tar.gz``), environments C, L, S, V."""

    ENVIRONMENTS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    CLASSES = ("bird", "car", "chair", "dog", "person")
    download_hint = "dg-lightning download vlcs --root DIR  (DomainBed's VLCS.tar.gz, md5-checked)"


class OfficeHome(DomainBedFolder):
    """OfficeHome (Venkateswara et al., CVPR 2017): Art, Clipart, Product, Real World; 65 classes,
    15,588 images. DomainBed's copy (``OfficeHomeDataset_10072016``), environments A, C, P, R."""

    ENVIRONMENTS = ("Art", "Clipart", "Product", "Real World")
    CLASSES = (
        "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar",
        "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
        "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
        "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse",
        "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin",
        "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
        "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
    )
    download_hint = "dg-lightning download officehome --root DIR  (DomainBed's office_home.zip, md5-checked)"


class TerraIncognita(DomainBedFolder):
    """TerraIncognita (Beery et al., ECCV 2018) as DomainBed builds it: camera-trap images of the
    Caltech Camera Traps locations 38, 43, 46 and 100, 10 classes; environments L100, L38, L43, L46
    (the sorted folder names). No download here: its source moved twice (DomainBed's script has
    pointed at two LILA locations and two annotation files), so there is no stable archive to check."""

    ENVIRONMENTS = ("location_100", "location_38", "location_43", "location_46")
    CLASSES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
    download_hint = ("build it with DomainBed's `python -m domainbed.scripts.download` (its "
                     "download_terra_incognita: the Caltech Camera Traps images and annotations from "
                     "https://lila.science/datasets/caltech-camera-traps, sorted into location_<n>/<category>/), "
                     "then data.root=<data_dir>/terra_incognita")
