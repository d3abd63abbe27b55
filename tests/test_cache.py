"""The decoded-image cache (core/cache.py) and the batched training path of the data module."""

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.core.augment import BatchViews, DomainBedBatch
from dg_lightning.core.cache import DecodedCache, writable_folder
from dg_lightning.data import PACS, SyntheticShapes
from dg_lightning.methods import ERM
from tests.conftest import write_fake_pacs


@pytest.fixture
def pacs_root(tmp_path):
    return write_fake_pacs(tmp_path / "pacs", per_class=2, size=20)


def _files(folder):
    return sorted(p.name for p in folder.glob("*") if not p.name.endswith(".lock"))


def test_cache_is_built_once_and_rebuilt_when_a_file_changes(pacs_root, tmp_path):
    items = sorted((pacs_root / "photo").rglob("*.jpg"))
    folder = tmp_path / "cache"
    folder.mkdir()
    first = DecodedCache.open_or_build(folder, "photo", items, lambda p: Image.open(p).convert("RGB"), 9)
    assert first.built_seconds is not None and len(first) == len(items) == 14
    pixels, hw = first[3]
    assert pixels.shape == (9, 9, 3) and pixels.dtype == np.uint8 and hw == (20, 20)
    # the stored pixels are the evaluation resize of the file (PIL bilinear)
    want = np.asarray(Image.open(items[3]).convert("RGB").resize((9, 9), Image.BILINEAR))
    assert np.array_equal(pixels, want)
    files = _files(folder)
    again = DecodedCache.open_or_build(folder, "photo", items, lambda p: 1 / 0, 9)  # never decodes
    assert again.built_seconds is None and np.array_equal(again[3][0], pixels)
    # a changed file (new content and mtime) gives a new key: rebuilt, the stale files removed
    time.sleep(0.01)
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(items[3])
    os.utime(items[3], ns=(time.time_ns(), time.time_ns()))
    rebuilt = DecodedCache.open_or_build(folder, "photo", items, lambda p: Image.open(p).convert("RGB"), 9)
    assert rebuilt.built_seconds is not None and rebuilt[3][1] == (30, 20) and rebuilt[3][0].max() == 0
    assert len(_files(folder)) == len(files) and _files(folder) != files


def test_file_cache_pickles_without_its_pixels(pacs_root, tmp_path):
    items = sorted((pacs_root / "cartoon").rglob("*.jpg"))
    cache = DecodedCache.open_or_build(tmp_path, "c", items, lambda p: Image.open(p).convert("RGB"), 16)
    cache[0]  # opens the map
    assert len(pickle.dumps(cache)) < 2000  # a worker opens its own map
    assert np.array_equal(pickle.loads(pickle.dumps(cache))[5][0], cache[5][0])


def test_read_only_data_root_falls_back_to_dg_cache(pacs_root, tmp_path, monkeypatch):
    monkeypatch.setenv("DG_CACHE", str(tmp_path / "user-cache"))
    os.chmod(pacs_root, 0o555)
    try:
        dm = PACS(root=str(pacs_root), test_domains=["sketch"], batch_size=2, image_size=8, cache_images=True,
                  batch_augment=True, split_seed=0)
        dm.prepare_data()
        assert not (pacs_root / ".dg_lightning").exists()
        assert list((tmp_path / "user-cache" / "decoded").glob("pacs-*-photo-9px-*.u8"))
    finally:
        os.chmod(pacs_root, 0o755)
    assert writable_folder([pacs_root / ".dg_lightning"]) == pacs_root / ".dg_lightning"


def test_cached_evaluation_is_bit_identical_to_the_file_pipeline(pacs_root):
    kw = dict(root=str(pacs_root), test_domains=["sketch"], batch_size=2, image_size=12, split_seed=0)
    plain, cached = PACS(**kw), PACS(**kw, cache_images=True)
    cached.prepare_data()
    assert (pacs_root / ".dg_lightning" / "decoded").is_dir()
    for a, b in zip(plain.val_dataloader() + plain.test_dataloader(),
                    cached.val_dataloader() + cached.test_dataloader(), strict=True):
        for (xa, ya, *_), (xb, yb, *_) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "decoded-per-access"])
def test_batched_training_batches(pacs_root, cache):
    dm = PACS(root=str(pacs_root), test_domains=["sketch"], batch_size=3, image_size=12, split_seed=0,
              batch_augment=True, cache_images=cache)
    loader = dm.train_dataloader()
    raw = next(iter(loader))
    assert raw[0]["image"].dtype == torch.uint8 and raw[0]["image"].shape == (9, 12, 12, 3)
    x, y, d, index = dm.finish_batch(raw)
    assert x.shape == (9, 3, 12, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert d.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    for yi, di, i in zip(y, d, index.tolist(), strict=True):  # labels and domains belong to the samples
        _, label, domain, same = loader.dataset[i]
        assert same == i and label == yi and domain == di
    # the same keys give the same augmented batch, whatever the number of workers
    dm1 = PACS(root=str(pacs_root), test_domains=["sketch"], batch_size=3, image_size=12, split_seed=0,
               batch_augment=True, cache_images=cache, num_workers=1)
    x1 = dm1.finish_batch(next(iter(dm1.train_dataloader())))[0]
    assert torch.equal(x, x1)


def test_per_sample_train_transform_keeps_the_per_sample_path(pacs_root):
    dm = PACS(root=str(pacs_root), test_domains=["sketch"], batch_size=2, image_size=8, split_seed=0,
              batch_augment=True, train_transform=lambda img: torch.zeros(3, 8, 8))
    assert not dm.batched_training
    x = next(iter(dm.train_dataloader()))[0]
    assert isinstance(x, torch.Tensor) and x.abs().sum() == 0


class TwoViews(ERM):
    def batch_views(self, preset):
        return BatchViews([preset, DomainBedBatch(preset.size, preset.source_side, jitter=0.0)])


def test_a_method_can_ask_for_batched_views():
    dm = SyntheticShapes(per_class=4, render_size=16, test_domains=["sketch"], batch_size=2, split_seed=0,
                         batch_augment=True, cache_images=True)
    model = TwoViews(num_classes=dm.num_classes, backbone="resnet10t")
    model.bind_data(dm)
    model.bind_data(dm)  # idempotent: views of the preset, not views of views
    views, y, *_ = dm.finish_batch(next(iter(dm.train_dataloader())))
    assert isinstance(views, list) and len(views) == 2 and views[0].shape == views[1].shape == (6, 3, 16, 16)
    assert not torch.equal(views[0], views[1])
    assert dm._sources and all(isinstance(s, DecodedCache) and s.path is None for s in dm._sources.values())
