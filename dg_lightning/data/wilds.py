"""WILDS (Koh et al., ICML 2021) through the ``wilds`` package: its datasets, splits and evaluators.

    data:
      class_path: dg_lightning.data.WILDS
      init_args: {dataset: camelyon17, root: ~/data/wilds}

The ``wilds`` package reads the official on-disk layout (``<root>/<name>_v<version>/metadata.csv``
and the images) and owns the official splits and metrics; this module only batches it for Lightning:

* training: the ``train`` split, shuffled per epoch (WILDS' standard ERM sampling), batches
  ``(image, label, domain, index)`` where ``domain`` is the sample's value of a metadata field
  (``domain_field``; default camelyon17 ``hospital``, iwildcam ``location``, fmow ``region``,
  rxrx1 ``experiment``), indexing ``train_domains``;
* validation: the OOD ``val`` split (WILDS' model selection) on the official selection metric
  (``selection_metric``, the wilds examples' ``val_metric``: camelyon17 ``acc_avg``, iwildcam
  ``F1-macro_all``, fmow ``acc_avg``, rxrx1 ``acc_avg``);
* test: every other official split (``id_val``, ``val``, ``id_test``, ``test``, those the dataset
  has), each scored by ``dataset.eval`` (the leaderboard's numbers), logged as
  ``<stage>/<split>/official/<metric>`` and written to ``results.json`` under ``official``.

``wilds==2.0.0`` works with this project's torch 2.14 / numpy 2 / pandas 3 pins. Its evaluators import
``torch_scatter`` (a compiled extension with no wheel for current torch); when it is missing, a
pure-torch ``scatter`` (``Tensor.scatter_reduce``) stands in for the one function they use.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dg_lightning.core.data import (
    Augment,
    DomainBalancedSampler,
    ShardSampler,
    build_transform,
    rank_world,
    run_seed,
    seeded,
)
from dg_lightning.core.errors import ConfigError, DataNotFoundError

DOMAIN_FIELD = {"camelyon17": "hospital", "iwildcam": "location", "fmow": "region", "rxrx1": "experiment"}
# model selection as the wilds repository's examples/configs/datasets.py (val_metric); fmow selects on
# acc_avg there, and its leaderboard metric is acc_worst_region (in results.json beside it)
SELECTION_METRIC = {"camelyon17": "acc_avg", "iwildcam": "F1-macro_all", "fmow": "acc_avg", "rxrx1": "acc_avg"}
IMAGE_SIZE = {"camelyon17": 96, "iwildcam": 224, "fmow": 224, "rxrx1": 256}
LAYOUT = {
    "camelyon17": "<root>/camelyon17_v1.0/{metadata.csv, RELEASE_v1.0.txt, patches/patient_<p>_node_<n>/*.png}",
    "iwildcam": "<root>/iwildcam_v2.0/{metadata.csv, categories.csv, RELEASE_v2.0.txt, train/*.jpg}",
    "fmow": "<root>/fmow_v1.1/{rgb_metadata.csv, country_code_mapping.csv, RELEASE_v1.1.txt, images/rgb_img_<i>.png}",
    "rxrx1": "<root>/rxrx1_v1.0/{metadata.csv, RELEASE_v1.0.txt, images/<experiment>/Plate<p>/<well>_s<site>.png}",
}


def scatter(src: torch.Tensor, index: torch.Tensor, dim: int = -1, out=None, dim_size: int | None = None,
            reduce: str = "sum") -> torch.Tensor:
    """``torch_scatter.scatter`` for the reductions WILDS uses (sum, mean, max, min), empty groups 0."""
    if out is not None:
        raise NotImplementedError("scatter(out=...) is not supported by the fallback")
    dim = dim % src.dim()
    size = list(src.shape)
    size[dim] = int(index.max()) + 1 if dim_size is None else dim_size
    if index.dim() < src.dim():  # broadcast a 1-D index along ``dim``
        shape = [1] * src.dim()
        shape[dim] = -1
        index = index.view(shape).expand_as(src)
    op = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin"}[reduce]
    return src.new_zeros(size).scatter_reduce(dim, index, src, reduce=op, include_self=False)


def import_wilds():
    """``wilds``, with the ``torch_scatter`` fallback installed when the extension is absent."""
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        sys.modules["torch_scatter"] = types.SimpleNamespace(scatter=scatter, __name__="torch_scatter")
    try:
        import wilds
    except ImportError as e:
        raise ConfigError("WILDS needs the wilds package: pip install -c constraints.txt 'dg-lightning[wilds]'") from e
    return wilds


class _Split(Dataset):
    """Samples ``indices`` of a WILDS dataset: ``(image, label, domain, position)``; a key
    ``(position, seed)`` draws the random transform from ``seed``."""

    def __init__(self, ds, indices: np.ndarray, domains: np.ndarray, transform):
        self.ds, self.indices, self.domains, self.transform = ds, indices, domains, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        j = int(self.indices[i])
        img = self.ds.get_input(j)
        if seed is None:
            img = self.transform(img)
        else:
            with seeded(seed):
                img = self.transform(img)
        return img, self.ds.y_array[j].long(), int(self.domains[i]), i


class WILDS(L.LightningDataModule):
    """A WILDS image-classification dataset on its official splits (see module docstring).

    Args:
        dataset: ``camelyon17``, ``iwildcam``, ``fmow``, ``rxrx1`` (any WILDS image-classification name).
        root: the folder holding ``<dataset>_v<version>/``.
        domain_field: metadata field used as the domain label (default per dataset).
        download: let the wilds package download the dataset into ``root`` (large: 10-50 GB).
        val_split: the model-selection split (default ``val``: OOD validation, as WILDS).
        test_splits: the splits scored after fit (default: every split but ``train``).
        batch_size / eval_batch_size / image_size / augment / steps_per_epoch / num_workers: as
            :class:`~dg_lightning.core.data.MultiDomainDataModule` (``batch_size`` is the whole batch).
        max_per_split: keep at most this many samples of each split (quick runs; seeded).
    """

    task = "classification"

    def __init__(self, dataset: str = "camelyon17", root: str = "data/wilds", domain_field: str | None = None,
                 download: bool = False, val_split: str = "val", test_splits: list[str] | None = None,
                 batch_size: int = 32, eval_batch_size: int | None = None, image_size: int | None = None,
                 augment: Augment = "flip", steps_per_epoch: int | None = None, num_workers: int = 0,
                 max_per_split: int | None = None, split_seed: int | None = None):
        super().__init__()
        self.name, self.root = dataset, Path(root).expanduser()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.image_size = image_size or IMAGE_SIZE.get(dataset, 224)
        self.train_transform = build_transform(self.image_size, augment, train=True)
        self.eval_transform = build_transform(self.image_size, augment, train=False)
        self._steps_per_epoch, self.num_workers, self.split_seed = steps_per_epoch, num_workers, split_seed
        self.ds = self._open(download)
        splits = [s for s, _ in sorted(self.ds.split_dict.items(), key=lambda kv: kv[1])]
        self.split_idx = {s: np.flatnonzero(self.ds.split_array == self.ds.split_dict[s]) for s in splits}
        if max_per_split:
            rng = np.random.RandomState(run_seed(split_seed))
            self.split_idx = {s: np.sort(rng.permutation(i)[:max_per_split]) if len(i) > max_per_split else i
                              for s, i in self.split_idx.items()}
        self.domain_field = domain_field or DOMAIN_FIELD.get(dataset)
        if self.domain_field not in self.ds.metadata_fields:
            raise ConfigError(f"domain_field {self.domain_field!r} is not a metadata field of {dataset}: "
                             f"choose one of {self.ds.metadata_fields}")
        column = self.ds.metadata_array[:, self.ds.metadata_fields.index(self.domain_field)].numpy()
        train_values = np.unique(column[self.split_idx["train"]])
        names = (self.ds.metadata_map or {}).get(self.domain_field)
        self.train_domains = [str(names[v]) if names is not None else f"{self.domain_field}{v}" for v in train_values]
        self._domain_of = {int(v): k for k, v in enumerate(train_values)}
        self._column = column
        if val_split not in self.split_idx:
            raise ConfigError(f"val_split {val_split!r}: {dataset} has splits {splits}")
        self.val_domains = [val_split]
        self.test_domains = list(test_splits or [s for s in splits if s != "train"])
        unknown = [s for s in self.test_domains if s not in self.split_idx]
        if unknown:
            raise ConfigError(f"unknown split(s) {unknown}: {dataset} has splits {splits}")
        y_names = (self.ds.metadata_map or {}).get("y")
        self.classes = [str(c) for c in y_names] if y_names is not None else [str(k) for k in range(self.ds.n_classes)]
        official = SELECTION_METRIC.get(dataset)
        self.selection_metric = f"val/{val_split}/official/{official}" if official else None

    def _open(self, download: bool):
        wilds = import_wilds()
        layout = LAYOUT.get(self.name, f"<root>/{self.name}_v<version>/ (the wilds package's layout)")
        try:
            return wilds.get_dataset(dataset=self.name, root_dir=str(self.root), download=download)
        except FileNotFoundError as e:
            raise DataNotFoundError(
                f"WILDS {self.name}: no dataset under {self.root} ({e}).\n  expected layout: {layout}\n"
                f"  to get the data: set data.download=true (the wilds package downloads it), or "
                f"python -c \"import wilds; wilds.get_dataset('{self.name}', root_dir='{self.root}', download=True)\""
            ) from None

    # -- what the methods read -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def domain_names(self) -> list[str]:
        return list(self.train_domains)

    @property
    def steps_per_epoch(self) -> int:
        # one pass over the train split per epoch, whatever the number of DDP ranks
        return self._steps_per_epoch or max(1, len(self.split_idx["train"]) // (self.batch_size * rank_world(self)[1]))

    def split(self, name: str, train: bool = False) -> _Split:
        idx = self.split_idx[name]
        domains = np.asarray([self._domain_of.get(int(v), -1) for v in self._column[idx]])
        return _Split(self.ds, idx, domains, self.train_transform if train else self.eval_transform)

    def evaluate(self, split: str, positions: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
        """``dataset.eval`` on predictions for ``positions`` of ``split`` (every position exactly once)."""
        idx = self.split_idx[split][positions.cpu().numpy()]
        results, _ = self.ds.eval(y_pred.cpu(), self.ds.y_array[idx], self.ds.metadata_array[idx])
        return {k: float(v) for k, v in results.items()}

    # -- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self.split("train", train=True)
        rank, world = rank_world(self)
        sampler = DomainBalancedSampler([len(ds)], self.batch_size, self.steps_per_epoch, run_seed(self.split_seed),
                                        rank, world)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def _eval(self, splits: list[str]) -> list[DataLoader]:
        rank, world = rank_world(self)
        return [DataLoader(ds, batch_size=self.eval_batch_size, sampler=ShardSampler(len(ds), rank, world),
                           num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
                for ds in (self.split(s) for s in splits)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval(self.val_domains)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval(self.test_domains)

    def callbacks(self) -> list[L.Callback]:
        """What the CLI adds to a run on this benchmark: the official evaluation."""
        return [OfficialEvaluation()]

    def describe(self) -> str:
        rows = [f"WILDS {self.name}: {self.num_classes} classes, domains = {self.domain_field} "
                f"({len(self.train_domains)} in train)"]
        rows += [f"  {s}: {len(i)}" for s, i in self.split_idx.items()]
        return "\n".join(rows)


class OfficialEvaluation(L.Callback):
    """Collects every evaluation prediction (gathered over DDP ranks) and logs the data module's
    official metrics per split: ``<stage>/<split>/official/<metric>``."""

    def __init__(self):
        self.preds: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _start(self, *_):
        self.preds = {}

    on_validation_epoch_start = on_test_epoch_start = _start

    def _batch(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is None:
            raise RuntimeError(f"{type(pl_module).__name__}'s evaluation step returns no predictions")
        self.preds.setdefault(dataloader_idx, []).append((batch[3].detach(), outputs.detach()))

    on_validation_batch_end = on_test_batch_end = _batch

    def _end(self, trainer, pl_module, stage: str, splits: list[str]):
        dm = trainer.datamodule
        if trainer.sanity_checking:
            return
        for k, split in enumerate(splits):
            got = self.preds.get(k, [])
            empty = torch.zeros(0, dtype=torch.long, device=pl_module.device)
            pos = torch.cat([p for p, _ in got]) if got else empty
            pred = torch.cat([y for _, y in got]) if got else empty
            if trainer.world_size > 1:  # every rank's shard, padded to the longest with position -1
                m = int(pl_module.all_gather(torch.tensor(len(pos), device=pl_module.device)).max())
                pad = m - len(pos)
                pos = torch.cat([pos, pos.new_full((pad,), -1)])
                pred = torch.cat([pred, pred.new_zeros((pad, *pred.shape[1:]))])
                pos, pred = pl_module.all_gather(pos).flatten(0, 1), pl_module.all_gather(pred).flatten(0, 1)
                keep = pos >= 0
                pos, pred = pos[keep], pred[keep]
            # any order: evaluate() looks the labels and metadata up by position
            for name, value in dm.evaluate(split, pos, pred).items():
                pl_module.log(f"{stage}/{split}/official/{name}", value, rank_zero_only=False, sync_dist=False)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "val", list(trainer.datamodule.val_domains))

    def on_test_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "test", list(trainer.datamodule.test_domains))
