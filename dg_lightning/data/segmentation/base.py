"""Segmentation DG: train on one source dataset, test on unseen target datasets.

A dataset split in its official on-disk layout is a :class:`SegmentationSet` (one small module per
dataset: ``cityscapes.py``, ``gta5.py``, ...): it finds its (image, label) pairs, checks the
layout (a missing path names the expected layout and where to get the data) and returns labels in
the 19 Cityscapes train ids, 255 = ignore. :class:`SegmentationDG` is the data module:

* ``source`` trains (random scale, crop, flip, colour jitter, blur: albumentations, applied to the
  image and its label together, seeded per sample so a resumed run sees the same batches);
* ``val`` (the source's own validation split) or, without one, a seeded ``holdout_fraction`` of the
  source's training pairs is the in-domain validation set (``val/<source>/miou``: what
  training-domain model selection maximises);
* every target in ``targets`` gets its own test loader and its own metric
  (``test/<target>/miou``), scored over the classes that target labels (``eval_classes``).

Batches are ``(image [0, 1] float (B, 3, H, W), label long (B, H, W), domain, sample_index)``,
the same 4-tuples as the classification data modules. Evaluation images keep their size (or are
scaled by ``eval_scale``); labels always keep theirs: predictions are scored at full label
resolution.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dg_lightning.core.data import (
    DomainBalancedSampler,
    ShardSampler,
    holdout_split,
    rank_world,
    run_seed,
    seeded,
    stable_seed,
)
from dg_lightning.core.errors import ConfigError, DataError, DataNotFoundError
from dg_lightning.data.segmentation.labels import CITYSCAPES_CLASSES, IGNORE, remap


def expand_root(root: str) -> Path:
    """``~``, ``$VAR`` and ``${VAR:-default}`` expanded: YAML configs can say
    ``root: ${DG_DATA:-../shared/data}/camvid``."""
    root = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), str(root))
    return Path(os.path.expandvars(root)).expanduser()


class SegmentationSet:
    """One split of a segmentation dataset in its official layout.

    Args:
        root: the dataset's root folder, as unpacked from the official archives (``~``, ``$VAR`` and
            ``${VAR:-default}`` are expanded).
        split: the official split to read.
        name: the name its metrics are logged under (default: the dataset's, e.g. ``cityscapes``).
        max_samples: read at most this many pairs, evenly spaced over the sorted list (quick runs).
    """

    #: default metric name of the dataset
    default_name: str = ""
    #: the expected layout, quoted when files are missing
    layout: str = ""
    #: where and how to get the data, quoted when files are missing
    download: str = ""
    #: train ids this dataset labels (``None``: all 19); its mIoU averages over these
    eval_classes: tuple[int, ...] | None = None
    #: label id -> train id lookup table (``labels.lookup_table``); ``None``: labels are train ids
    table: np.ndarray | None = None
    #: the dataset resizes a label whose size differs from its image's (GTA5); otherwise that is an error
    resizes_labels: bool = False

    def __init__(self, root: str, split: str = "val", name: str | None = None, max_samples: int | None = None):
        self.root, self.split = expand_root(root), split
        self.name = name or self.default_name
        self.max_samples = max_samples
        self._pairs: list[tuple[Path, Path]] | None = None

    # -- what a dataset module provides ------------------------------------------------------------
    def find_pairs(self) -> list[tuple[Path, Path]]:
        """(image path, label path) of every sample of ``split``."""
        raise NotImplementedError

    def read_label(self, path: Path, image_size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 train ids; ``image_size`` is the image's (width, height)."""
        with Image.open(path) as img:
            if img.size != tuple(image_size):
                raise DataError(f"label {path} is {img.size[0]}x{img.size[1]}, its image {image_size[0]}x{image_size[1]}",
                                fix="a label must have its image's size: re-export it or remove the pair; "
                                    "dg-lightning check-data --config <your config> lists every such pair")
            label = np.asarray(img)
        if label.ndim != 2:
            raise DataError(f"{path} is not a single-channel label image (shape {label.shape})")
        return remap(label, self.table) if self.table is not None else label.astype(np.uint8)

    # -- shared ----------------------------------------------------------------------------------
    def missing(self, what: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"{type(self).__name__} ({self.split}): {what}.\nExpected layout under {self.root}:\n{self.layout}\n"
            f"How to get it: {self.download}"
        )

    def pairs_by_suffix(self, images: Path, suffix: str, label_of) -> list[tuple[Path, Path]]:
        """(image, label) for every ``<folder>/<stem><suffix>`` under ``images`` (one level of folders:
        cities, sequences); ``label_of(folder_name, stem)`` is the label's path."""
        if not images.is_dir():
            raise self.missing(f"{images} does not exist")
        return [(img, self.label_for(img, label_of(img.parent.name, img.name[: -len(suffix)])))
                for img in sorted(images.glob(f"*/*{suffix}"))]

    def label_for(self, image: Path, label: Path) -> Path:
        """``label``, or a clear error naming the image that has no label."""
        if not label.is_file():
            raise self.missing(f"the label of {image.name} is missing (expected {label})")
        return label

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        if self._pairs is None:
            if not self.root.is_dir():
                raise self.missing(f"the root folder {self.root} does not exist")
            pairs = sorted(self.find_pairs())
            if not pairs:
                raise self.missing(f"no {self.split} images found")
            if self.max_samples and len(pairs) > self.max_samples:
                keep = np.linspace(0, len(pairs) - 1, self.max_samples).round().astype(int)
                pairs = [pairs[i] for i in keep]
            self._pairs = pairs
        return self._pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8 RGB, label (H, W) uint8 train ids)."""
        image_path, label_path = self.pairs[i]
        image = Image.open(image_path).convert("RGB")
        return np.array(image), np.array(self.read_label(label_path, image.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, name={self.name!r})"


def train_augmentation(crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                       color_jitter: float = 0.3, blur_prob: float = 0.5) -> A.Compose:
    """The DG segmentation training augmentation (RobustNet/SHADE): random scale, crop (padded with
    ignore where the scaled image is smaller), flip, colour jitter, Gaussian blur. Labels follow
    every geometric step with nearest-neighbour resampling; photometric steps leave them alone."""
    lo, hi = scale_range
    ops = [
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                 hue=0.0, p=0.8))
    if blur_prob > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=blur_prob))
    # strict: an argument albumentations does not know (e.g. a 1.x name) is an error, not ignored
    return A.Compose(ops, strict=True)


class PairedDataset(Dataset):
    """``(image, label, domain, index)`` samples of a :class:`SegmentationSet`.

    ``dataset[(i, seed)]`` draws the paired augmentation (and the views) from ``seed``;
    ``eval_scale`` resizes the image only (the label keeps its resolution). ``views``, when given,
    takes the augmented (H, W, 3) uint8 image and returns what the sample carries as its image (a
    method's photometric views, e.g. GCISG's two style views; the label is the same for all)."""

    def __init__(self, data: SegmentationSet | Sequence, domain: int, indices: Sequence[int] | None = None,
                 transform: A.Compose | None = None, eval_scale: float = 1.0, views: Callable | None = None):
        self.data, self.domain, self.transform, self.eval_scale = data, domain, transform, eval_scale
        self.views = views
        self.indices = list(range(len(data))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.data[self.indices[i]]
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        elif self.eval_scale != 1.0:
            h, w = image.shape[:2]
            size = (max(1, round(w * self.eval_scale)), max(1, round(h * self.eval_scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        y = torch.from_numpy(np.ascontiguousarray(label)).long()
        if self.views is not None:
            if seed is None:
                return self.views(image), y, self.domain, i
            with seeded(seed):
                return self.views(image), y, self.domain, i
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        return x, y, self.domain, i


class SegmentationDG(L.LightningDataModule):
    """Source -> targets segmentation benchmark (see module docstring).

    Args:
        source: the training dataset (e.g. ``GTA5(root, split="train")``).
        targets: the unseen test datasets, each scored on its own; names must differ.
        val: the source's validation split; ``None``: a seeded ``holdout_fraction`` of ``source``.
        holdout_fraction: part of ``source`` kept out for validation when ``val`` is ``None``.
        split_seed: seed of that hold-out (default: the run's seed).
        crop_size: training crop side; scale_range: random scale factors; flip / color_jitter /
            blur_prob: the rest of the training augmentation (:func:`train_augmentation`).
        eval_scale: resize evaluation images by this factor (labels are never resized).
        batch_size: training batch; eval_batch_size: evaluation batch (1 when image sizes vary).
        steps_per_epoch: optimisation steps per epoch (segmentation schedules count iterations).
        num_workers: data loader workers per process.

    ``image_views`` (``None``; set by a method through ``bind_data``): per-sample views of each
    training image made after the paired augmentation (see :class:`PairedDataset`).
    """

    task = "segmentation"

    def __init__(
        self,
        source: SegmentationSet,
        targets: list[SegmentationSet],
        val: SegmentationSet | None = None,
        holdout_fraction: float = 0.1,
        split_seed: int | None = None,
        crop_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        color_jitter: float = 0.3,
        blur_prob: float = 0.5,
        eval_scale: float = 1.0,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        steps_per_epoch: int = 1000,
        num_workers: int = 0,
    ):
        super().__init__()
        names = [t.name for t in targets]
        if not targets:
            raise ConfigError("SegmentationDG needs at least one target dataset to test on")
        if len(set(names)) != len(names):
            raise ConfigError(f"target names must differ, got {names}: give each a `name`")
        if val is None and not 0 < holdout_fraction < 1:
            raise ConfigError("without a `val` dataset, holdout_fraction must lie in (0, 1) (the source's "
                             "validation part, used for model selection)")
        self.source, self.targets, self.val = source, list(targets), val
        self.holdout_fraction, self.split_seed = holdout_fraction, split_seed
        self.crop_size, self.image_size = crop_size, crop_size
        self.train_transform = train_augmentation(crop_size, tuple(scale_range), flip, color_jitter, blur_prob)
        self.eval_scale = eval_scale
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch, self.num_workers = steps_per_epoch, num_workers
        self.classes = list(CITYSCAPES_CLASSES)
        self.image_views: Callable | None = None
        self._split: tuple[np.ndarray, np.ndarray] | None = None

    # -- names -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_domains(self) -> list[str]:
        return [self.source.name]

    @property
    def val_domains(self) -> list[str]:
        return [self.source.name]

    @property
    def test_domains(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def domain_names(self) -> list[str]:
        return [self.source.name, *self.test_domains]

    def eval_classes(self, domain: str, stage: str = "test") -> list[int] | None:
        """The train ids that ``domain``'s labels can contain (its mIoU averages over these)."""
        if stage == "val":
            data = self.val or self.source
        else:
            data = self.targets[self.test_domains.index(domain)]
        return list(data.eval_classes) if data.eval_classes is not None else None

    # -- splits ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._split is not None:
            return
        n = len(self.source)  # reads the layout: a wrong root fails here, naming what is missing
        for t in [*self.targets, *([self.val] if self.val is not None else [])]:
            len(t)
        if self.val is None:
            self._split = holdout_split(n, self.holdout_fraction, stable_seed(run_seed(self.split_seed), self.source.name))
        else:
            self._split = (np.arange(n), np.arange(0))

    def _loader(self, dataset: Dataset, batch_size: int, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataset(self) -> PairedDataset:
        self.setup()
        return PairedDataset(self.source, 0, self._split[0], self.train_transform, views=self.image_views)

    def train_dataloader(self) -> DataLoader:
        train = self.train_dataset()
        rank, world = rank_world(self)
        sampler = DomainBalancedSampler([len(train)], self.batch_size, self.steps_per_epoch, seed=run_seed(self.split_seed),
                                        rank=rank, world_size=world)
        return self._loader(train, self.batch_size, sampler)

    def _eval(self, dataset: PairedDataset) -> DataLoader:
        rank, world = rank_world(self)
        return self._loader(dataset, self.eval_batch_size, ShardSampler(len(dataset), rank, world))

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        if self.val is not None:
            return [self._eval(PairedDataset(self.val, 0, eval_scale=self.eval_scale))]
        return [self._eval(PairedDataset(self.source, 0, self._split[1], eval_scale=self.eval_scale))]

    def test_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._eval(PairedDataset(t, k + 1, eval_scale=self.eval_scale)) for k, t in enumerate(self.targets)]

    def describe(self) -> str:
        self.setup()
        val = f"{self.val.name} {self.val.split} ({len(self.val)})" if self.val is not None else \
            f"{len(self._split[1])} held out of the source"
        rows = [f"{type(self).__name__}: {self.num_classes} classes; source {self.source.name} "
                f"{self.source.split} ({len(self._split[0])} train), val: {val}"]
        for t in self.targets:
            scored = "all 19 classes" if t.eval_classes is None else f"{len(t.eval_classes)} classes"
            rows.append(f"  target {t.name}: {t.split}, {len(t)} images, scored over {scored}")
        return "\n".join(rows)
