"""The multi-domain data module base: domains, seeded in/out splits, domain-balanced batches.

A subclass says what its domains, classes and samples are (``_discover``, ``_load``); this base does
the rest, the same way for every benchmark:

* ``test_domains`` (held out) are chosen by name; every other domain is a source (training) domain;
* each source domain is split with a seeded hold-out (DomainBed ``holdout_fraction=0.2``): the
  80 % "in" part trains, the 20 % "out" part is the training-domain validation set; official split
  files replace this split where a benchmark has them;
* every training batch holds ``batch_size`` samples of *each* source domain (DomainBed: one loader
  per domain, every step sees every domain), as ``(image, label, domain)``; ``domain`` indexes
  ``self.domain_names`` (= sources, then held-out domains);
* ``val_dataloader`` returns one loader per source domain ("out" splits), ``test_dataloader`` one
  loader per held-out domain (the whole domain by default, or its "in" split).

Two data paths (``batch_augment``): per sample, each image decoded and augmented with PIL in the
loader (the fallback); or per batch, the loader only reading uint8 images (from the decoded-image
cache, ``cache_images``) plus each sample's augmentation parameters, and the augmentation running
as tensor ops on the batch's device (``core.augment``; ``on_after_batch_transfer``). Either way a
sample's augmentation is a function of the seed the balanced sampler gives it.

Under DDP each rank draws its own part of every step (still balanced) and evaluates a disjoint,
unpadded shard of each evaluation set, so per-domain metrics equal the single-process ones. The
CLI therefore runs the Trainer with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from dg_lightning.core.augment import AugmentCollate, BatchAugment, build_batch_augment, hwc_to_float
from dg_lightning.core.cache import DecodedCache, DecodeOnLoad, cache_candidates, writable_folder
from dg_lightning.core.errors import ConfigError, DataError, DataNotFoundError
from dg_lightning.core.seeding import stable_seed

Augment = Literal["domainbed", "flip", "none"]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (in, out) split of ``range(n)``: ``round(fraction * n)`` indices go "out"."""
    perm = np.random.RandomState(seed).permutation(n)
    n_out = int(round(fraction * n))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def build_transform(image_size: int, augment: Augment, train: bool) -> Callable:
    """Images in, float tensors in [0, 1] out (the model normalises for its backbone)."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if not train or augment == "none":
        return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *to_tensor])
    if augment == "flip":
        return v2.Compose([v2.Resize((image_size, image_size), antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
    if augment == "domainbed":  # DomainBed's training augmentation
        return v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.3),
            v2.RandomGrayscale(0.1),
            *to_tensor,
        ])
    raise ConfigError(f"unknown augment {augment!r}: choose one of domainbed, flip, none")


def run_seed(seed: int | None = None) -> int:
    """``seed``, or the run's seed (``seed_everything``) when ``None``."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


def rank_world(datamodule) -> tuple[int, int]:
    """(global rank, world size) of the data module's trainer; (0, 1) without one."""
    trainer = getattr(datamodule, "trainer", None)
    return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)


@contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator, NumPy and ``random`` inside the block; restore their states afterwards
    (torchvision transforms draw from torch, some of lightly's from NumPy). Only the CPU generator:
    ``torch.manual_seed`` would also queue a lazy seed for every accelerator backend, recording a
    Python stack trace each time: in a profile, a large part of the per-sample path's cost."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class DomainDataset(Dataset):
    """Samples of one domain: ``(image, label, domain_index, sample_index)``.

    ``image`` is whatever the transform returns: a tensor, or a list of tensors (the views of a
    self-supervised method); ``sample_index`` is the position in this dataset (in a ``ConcatDomains``,
    the position in the concatenation), so a method can keep per-sample state such as pseudo-labels.
    """

    def __init__(self, items: Sequence[Any], labels: Sequence[int], domain: int,
                 load: Callable[[Any], Any], transform: Callable | None):
        self.items, self.labels = list(items), torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.domain, self.load, self.transform = domain, load, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]):
        """``dataset[i]``, or ``dataset[(i, seed)]``: the random transform then draws from ``seed``."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        img = self.load(self.items[i])
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with seeded(seed):
                    img = self.transform(img)
        return img, self.labels[i], self.domain, i


class CachedDomainDataset(Dataset):
    """Samples of one domain read from decoded images (``core.cache``): ``(image, label, domain_index,
    sample_index)`` like :class:`DomainDataset`.

    Without ``augment`` (evaluation) ``image`` is the float image the evaluation transform gives;
    with one (training) it is ``augment.prepare(stored image, original size, seed)``, a dict of uint8
    pixels and parameters, finished on the batch's device by the data module (``finish_batch``).
    """

    def __init__(self, source, positions: Sequence[int], labels: Sequence[int], domain: int,
                 augment: BatchAugment | None = None):
        self.source, self.positions = source, np.asarray(positions, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.domain, self.augment = domain, augment

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        pixels, original_hw = self.source[int(self.positions[i])]
        if self.augment is None:
            return hwc_to_float(torch.from_numpy(pixels)), self.labels[i], self.domain, i
        if seed is None:  # not from the balanced sampler: a fresh draw
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return self.augment.prepare(pixels, original_hw, seed), self.labels[i], self.domain, i


class ConcatDomains(Dataset):
    """Several ``DomainDataset`` end to end; ``offsets[k]`` is where domain ``k`` starts."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[k])
        img, label, domain, _ = self.parts[k][j if seed is None else (j, seed)]
        return img, label, domain, i


class DomainBalancedSampler(Sampler[tuple[int, int]]):
    """``(index, augmentation seed)`` keys into a ``ConcatDomains`` so that each consecutive run of
    ``batch_size * n_domains`` keys holds ``batch_size`` of every domain, in domain order.

    Each domain is drawn without replacement, reshuffled whenever it runs out (DomainBed's infinite
    per-domain loaders). Indices *and* each sample's augmentation seed depend only on (seed, epoch,
    position), so a run resumed at an epoch boundary sees exactly the same augmented batches, with
    any number of workers; under DDP, rank ``r`` takes the ``r``-th slice of each step.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, steps: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if min(sizes) == 0:
            raise DataError(f"a source domain has no training samples (sizes {list(sizes)})")
        self.sizes, self.batch_size, self.steps = list(sizes), batch_size, steps
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size * len(self.sizes)

    def __iter__(self):
        rng = np.random.RandomState(stable_seed(self.seed, self.epoch))
        need = self.steps * self.batch_size * self.world_size
        streams = []
        for n in self.sizes:
            reps = -(-need // n)
            streams.append(np.concatenate([rng.permutation(n) for _ in range(reps)])[:need])
        seeds = rng.randint(0, 2**31 - 1, size=(len(self.sizes), need))
        bs = self.batch_size
        for step in range(self.steps):
            start = (step * self.world_size + self.rank) * bs
            for k, stream in enumerate(streams):
                idx = (stream[start:start + bs] + self.offsets[k]).tolist()
                yield from zip(idx, seeds[k, start:start + bs].tolist())


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, ...``: disjoint, unpadded, complete together."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))


class MultiDomainDataModule(L.LightningDataModule):
    """Base of every classification benchmark (see module docstring).

    Args:
        test_domains: held-out domain name(s); every other domain trains.
        batch_size: samples *per source domain* in each training batch (DomainBed's convention).
        eval_batch_size: batch size of validation/test loaders (default: ``batch_size * 2``).
        holdout_fraction: fraction of each source domain kept out for validation.
        split_seed: seed of the in/out split; ``None`` uses the run's seed (``seed_everything``).
        image_size: square side the images are resized/cropped to (default: the benchmark's own,
            ``default_image_size``).
        augment: training augmentation preset (``domainbed``, ``flip``, ``none``).
        train_transform / eval_transform: your own callables instead of the presets.
        steps_per_epoch: optimisation steps per epoch; default: one pass over the smallest source "in"
            split (its size / (batch_size x DDP ranks)).
        test_split: evaluate held-out domains on the whole domain (``full``) or its 80 % ``in`` split.
        num_workers: data loader workers per process.
        batch_augment: run the ``augment`` preset on whole batches on the model's device
            (``core.augment``), each sample's parameters drawn from its seed in the loader; the loader
            then only reads (or decodes and resizes) images. Off: per-sample PIL augmentation in the
            loader. A per-sample ``train_transform`` (yours, or a method's views) keeps the per-sample path.
        cache_images: decode every image once into a memory-mapped uint8 cache (``core.cache``) and read
            it instead of the files: the training copy at ``cache_scale`` x ``image_size`` (for
            ``batch_augment``), the evaluation copy at ``image_size`` (identical to what the evaluation
            transform makes from the file).
        cache_scale: side of the cached training copy relative to ``image_size`` (crops of 70-100 %
            of the area are resampled from it).
        cache_dir: folder of the cache (default ``<root>/.dg_lightning``, else ``$DG_CACHE`` or
            ``~/.cache/dg-lightning``).
    """

    #: what the benchmark is scored on (the CLI builds the model's head for it)
    task = "classification"
    #: image side used when ``image_size`` is not given
    default_image_size: int = 224
    #: how to get the data, quoted in errors about a missing root
    download_hint: str = ""
    #: the on-disk layout, quoted in errors about a missing root
    layout_hint: str = ""
    #: ``cache_images`` writes files (items are image files); ``False``: items are in memory already,
    #: the "cache" is an in-memory array of resized images
    cache_on_disk: bool = True

    def __init__(
        self,
        test_domains: str | list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        holdout_fraction: float = 0.2,
        split_seed: int | None = None,
        image_size: int | None = None,
        augment: Augment = "domainbed",
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        steps_per_epoch: int | None = None,
        test_split: Literal["full", "in"] = "full",
        num_workers: int = 0,
        batch_augment: bool = False,
        cache_images: bool = False,
        cache_scale: float = 1.15,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.holdout_fraction, self.split_seed = holdout_fraction, split_seed
        self.image_size = image_size or self.default_image_size
        self.augment, self.test_split = augment, test_split
        self.num_workers, self._steps_per_epoch = num_workers, steps_per_epoch
        self.train_transform = train_transform or build_transform(self.image_size, augment, train=True)
        self.eval_transform = eval_transform or build_transform(self.image_size, augment, train=False)
        self._preset_transforms = (None if train_transform else self.train_transform,
                                   None if eval_transform else self.eval_transform)
        if cache_scale < 1:
            raise ValueError(f"cache_scale {cache_scale} < 1: the cached copy must be at least image_size")
        self.cache_images, self.cache_scale, self.cache_dir = cache_images, cache_scale, cache_dir
        #: the preset as a batched augmentation (``batch_augment``), and what the training batches get
        #: (the preset, or a method's ``batch_views``)
        self.batch_preset = build_batch_augment(self.image_size, augment, cache_scale) if batch_augment else None
        self.batch_transform: BatchAugment | None = self.batch_preset
        self._sources: dict[tuple[str, int], Any] = {}
        self.domains, self.classes = self._discover()
        held = [test_domains] if isinstance(test_domains, str) else list(test_domains or [])
        unknown = [d for d in held if d not in self.domains]
        if unknown:
            raise ConfigError(
                f"unknown test domain(s) {unknown} for {type(self).__name__}; valid domains: {self.domains}",
                fix=f"data.test_domains: one or more of {self.domains}",
            )
        self.test_domains = [d for d in self.domains if d in held]
        self.train_domains = [d for d in self.domains if d not in held]
        if not self.train_domains:
            raise ConfigError(f"every domain is held out ({held}): leave at least one source domain")
        self._splits: dict[str, dict[str, np.ndarray]] | None = None

    def _missing(self, what) -> DataNotFoundError:
        """The error for a missing path under the data root: names it, the layout and the download."""
        msg = (f"{type(self).__name__}: expected {what} but it does not exist.\n"
               f"  expected layout: {self.layout_hint}\n  data root given: {getattr(self, 'root', None)}")
        if self.download_hint:
            msg += f"\n  to get the data: {self.download_hint}"
        return DataNotFoundError(msg)

    # -- what a subclass provides -------------------------------------------------------------
    def _discover(self) -> tuple[list[str], list[str]]:
        """(domain names, class names) of the whole benchmark."""
        raise NotImplementedError

    def _samples(self, domain: str) -> tuple[list[Any], list[int]]:
        """(items, labels) of one domain; ``_load(item)`` turns an item into an image."""
        raise NotImplementedError

    def _load(self, item: Any) -> Any:
        return item

    def _official_split(self, domain: str, n: int) -> dict[str, np.ndarray] | None:
        """Index arrays ``{"in", "out", "test"}`` from official split files, or ``None``."""
        return None

    # -- derived --------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def domain_names(self) -> list[str]:
        """Names for the domain index in batches: source domains first, then held-out ones."""
        return self.train_domains + self.test_domains

    @property
    def val_domains(self) -> list[str]:
        return list(self.train_domains)

    def _seed(self) -> int:
        return run_seed(self.split_seed)

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(self)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        self._data: dict[str, tuple[list[Any], list[int]]] = {}
        self._splits = {}
        for d in self.domains:
            if d not in self.train_domains and d not in self.test_domains:
                continue
            items, labels = self._samples(d)
            if not items:
                raise DataError(f"domain {d!r} of {type(self).__name__} has no samples",
                                fix="check-data lists what was found: dg-lightning check-data --config ...")
            self._data[d] = (items, labels)
            split = self._official_split(d, len(items))
            if split is None:
                i_in, i_out = holdout_split(len(items), self.holdout_fraction, stable_seed(self._seed(), d))
                split = {"in": i_in, "out": i_out, "test": np.arange(len(items))}
            self._splits[d] = split

    def split_indices(self, domain: str, part: Literal["in", "out", "test"]) -> np.ndarray:
        self.setup()
        return self._splits[domain][part]

    # -- decoded images and batched augmentation ------------------------------------------------------
    @property
    def batched_training(self) -> bool:
        """Training batches are augmented on the device (``batch_augment``, and no per-sample
        ``train_transform`` replaced the preset)."""
        return self.batch_transform is not None and self.train_transform is self._preset_transforms[0]

    @property
    def cached_evaluation(self) -> bool:
        return self.cache_images and self.eval_transform is self._preset_transforms[1]

    def _cache_name(self, domain: str) -> str:
        root = getattr(self, "root", None)
        where = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:8] if root is not None else "data"
        return f"{type(self).__name__.lower()}-{where}-{domain}"

    def image_source(self, domain: str, side: int, upscale: bool = True):
        """Every image of ``domain`` at ``side`` px: ``source[k] -> (uint8 (side, side, 3), original (h, w))``;
        from the decoded-image cache (``cache_images``, built on first use), else decoded on access.
        ``upscale=False``: files are only shrunk (``core.cache.stored_extent``), a cropping preset's copy."""
        key = (domain, side, upscale)
        if key not in self._sources:
            self.setup()
            items = self._data[domain][0]
            if not self.cache_images:
                self._sources[key] = DecodeOnLoad(items, self._load, side, upscale)
            elif not self.cache_on_disk:
                self._sources[key] = DecodedCache.in_memory(items, self._load, side, upscale)
            else:
                folder = writable_folder(cache_candidates(getattr(self, "root", None), self.cache_dir)) / "decoded"
                folder.mkdir(exist_ok=True)
                self._sources[key] = DecodedCache.open_or_build(folder, self._cache_name(domain), items, self._load,
                                                                side, workers=self.num_workers, upscale=upscale)
        return self._sources[key]

    def training_source(self, domain: str):
        """The stored images the batched training augmentation reads (its side and storage)."""
        return self.image_source(domain, self.batch_transform.source_side, self.batch_transform.upscale)

    def prepare_data(self) -> None:
        """Build the decoded-image caches a fit needs (Lightning calls this on one process per node
        before any ``setup``, so DDP ranks find them built)."""
        if not self.cache_images:
            return
        self.setup()
        if self.batched_training:
            for d in self.train_domains:
                self.training_source(d)
        if self.cached_evaluation:
            for d in self.train_domains + self.test_domains:
                self.image_source(d, self.image_size)

    def finish_batch(self, batch):
        """A batched-augmentation training batch (a dict of uint8 images and parameters) -> the augmented
        float batch, on the batch's device; any other batch unchanged. Lightning calls it after moving the
        batch to the device; code that iterates a training loader itself calls it too."""
        if not isinstance(batch[0], dict):
            return batch
        return [self.batch_transform(batch[0]), *batch[1:]]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.finish_batch(batch)

    def dataset(self, domain: str, part: Literal["in", "out", "test"], train: bool = False) -> Dataset:
        """The ``part`` split of ``domain`` with training or evaluation transforms."""
        self.setup()
        items, labels = self._data[domain]
        idx = self.split_indices(domain, part)
        label_list = [labels[i] for i in idx]
        if train and self.batched_training:
            source = self.training_source(domain)
            return CachedDomainDataset(source, idx, label_list, self.domain_names.index(domain), self.batch_transform)
        if not train and self.cached_evaluation:
            source = self.image_source(domain, self.image_size)
            return CachedDomainDataset(source, idx, label_list, self.domain_names.index(domain))
        return DomainDataset(
            [items[i] for i in idx], label_list, self.domain_names.index(domain),
            self._load, self.train_transform if train else self.eval_transform,
        )

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch:
            return self._steps_per_epoch
        # one pass over the smallest source domain per epoch, whatever the number of DDP ranks
        smallest = min(len(self.split_indices(d, "in")) for d in self.train_domains)
        return max(1, smallest // (self.batch_size * self._rank_world()[1]))

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler, collate_fn=None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False,
            collate_fn=collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        train = ConcatDomains([self.dataset(d, "in", train=True) for d in self.train_domains])
        rank, world = self._rank_world()
        sampler = DomainBalancedSampler(
            train.sizes, self.batch_size, self.steps_per_epoch, seed=self._seed(), rank=rank, world_size=world
        )
        collate = AugmentCollate(self.batch_transform) if self.batched_training else None
        return self._loader(train, self.batch_size * len(self.train_domains), sampler, collate)

    def _eval_loaders(self, domains: list[str], part: str) -> list[DataLoader]:
        rank, world = self._rank_world()
        loaders = []
        for d in domains:
            ds = self.dataset(d, part)
            loaders.append(self._loader(ds, self.eval_batch_size, ShardSampler(len(ds), rank, world)))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_domains, "out")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_domains, "test" if self.test_split == "full" else "in")

    def describe(self) -> str:
        self.setup()
        rows = [f"{type(self).__name__}: {self.num_classes} classes, held out {self.test_domains or 'none'}"]
        for d in self.train_domains:
            rows.append(f"  source {d}: in {len(self.split_indices(d, 'in'))}, out {len(self.split_indices(d, 'out'))}")
        for d in self.test_domains:
            rows.append(f"  target {d}: test {len(self.split_indices(d, 'test'))}")
        return "\n".join(rows)
