"""The decoded-image cache (core/cache.py) and the batched training path of the data module."""

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.core.augment import BatchViews, DomainBedBatch
from dg_lightning.core.cache import DecodedCache, resize_uint8, writable_folder
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
        assert list((tmp_path / "user-cache" / "decoded").glob("pacs-*-photo-fit9px-*.u8"))
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


def test_a_cropping_copy_only_shrinks_each_axis_and_keeps_the_rest_zero():
    rng = np.random.RandomState(0)
    wide = Image.fromarray(rng.randint(0, 255, (20, 30, 3), dtype=np.uint8))  # 20 high, 30 wide
    stored, hw = resize_uint8(wide, 24, upscale=False)
    assert stored.shape == (24, 24, 3) and hw == (20, 30)
    assert np.array_equal(stored[:20], np.asarray(wide.resize((24, 20), Image.BILINEAR)))  # width shrunk only
    assert not stored[20:].any()
    small = Image.fromarray(rng.randint(0, 255, (20, 20, 3), dtype=np.uint8))
    stored, _ = resize_uint8(small, 24, upscale=False)
    assert np.array_equal(stored[:20, :20], np.asarray(small)) and not stored[20:].any() and not stored[:, 20:].any()
    # the evaluation copy (upscale, the default) is still the square resize
    assert np.array_equal(resize_uint8(small, 24)[0], np.asarray(small.resize((24, 24), Image.BILINEAR)))


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "decoded-per-access"])
def test_a_file_smaller_than_the_stored_copy_is_cut_at_its_own_pixels(pacs_root, cache):
    """20 px files under a 24 px training copy (cache_scale 2 x 12): the crop is PIL's resize of the drawn box
    of the file itself, as the per-sample path cuts it, not of a copy enlarged to 24 px first."""
    dm = PACS(root=str(pacs_root), test_domains=["sketch"], batch_size=2, image_size=12, split_seed=0,
              batch_augment=True, cache_images=cache, cache_scale=2.0)
    aug = dm.batch_transform
    assert aug.source_side == 24 and not aug.upscale
    source = dm.training_source("photo")
    files = dm._data["photo"][0]
    for k, seed in [(0, 3), (5, 11), (9, 2)]:
        pixels, hw = source[k]
        assert hw == (20, 20)
        p = aug.draw(seed, hw)
        x0, y0, x1, y1 = p["box"]
        want = Image.open(files[k]).convert("RGB").resize((12, 12), Image.BILINEAR,
                                                          box=(x0 * 20, y0 * 20, x1 * 20, y1 * 20))
        if p["flip"]:
            want = want.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.array_equal(aug.prepare(pixels, hw, seed)["image"].numpy(), np.asarray(want)), (k, seed)
    if cache:
        dm.prepare_data()
        names = [f.name for f in (pacs_root / ".dg_lightning" / "decoded").glob("*.u8")]
        assert any("-photo-fit24px-" in n for n in names) and any("-photo-12px-" in n for n in names)


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
