import numpy as np
import pytest
from PIL import Image

from dg_lightning.core.errors import DataNotFoundError
from dg_lightning.data import PACS, ImageFolderDomains
from dg_lightning.data.folder import write_resized_copy
from dg_lightning.data.synthetic import SHAPES, STYLES, write_image_folder
from tests.conftest import PACS_CLASSES, PACS_DOMAINS, write_fake_pacs


def test_image_folder_discovers_domains_and_classes(tmp_path):
    write_image_folder(tmp_path / "shapes", per_class=5, size=16)
    dm = ImageFolderDomains(root=str(tmp_path / "shapes"), test_domains=["sketch"], batch_size=2, image_size=16)
    assert dm.domains == sorted(STYLES) and dm.classes == sorted(SHAPES)
    assert dm.train_domains == ["cartoon", "painting", "photo"]
    x, y, d, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 16, 16) and d.tolist() == [0, 0, 1, 1, 2, 2]
    ds = dm.dataset("sketch", "test")
    assert len(ds) == 5 * len(SHAPES)
    # labels follow the class folders
    assert [dm.classes[int(lbl)] for lbl in ds.labels] == [p.parent.name for p in ds.items]


def test_pacs_official_layout_seeded_split(fake_pacs):
    dm = PACS(root=str(fake_pacs), test_domains=["photo"], split_seed=0)
    assert dm.domains == list(PACS_DOMAINS) and dm.classes == list(PACS_CLASSES)
    assert dm.num_classes == 7 and dm.test_domains == ["photo"]
    n = 3 * 7
    assert len(dm.split_indices("sketch", "out")) == round(0.2 * n)
    assert len(dm.dataset("photo", "test")) == n


def test_pacs_uses_official_split_files(tmp_path):
    root = write_fake_pacs(tmp_path / "pacs", split_files=True)
    dm = PACS(root=str(root), test_domains=["sketch"])
    dm.setup()
    items = dm._data["cartoon"][0]
    out = {items[i].name for i in dm.split_indices("cartoon", "out")}
    assert out == {"pic_002.jpg"}  # crossval lists every third image: pic_002 of each class
    assert len(dm.split_indices("cartoon", "out")) == 7 and len(dm.split_indices("cartoon", "in")) == 14


def test_pacs_split_file_with_wrong_label_is_an_error(tmp_path):
    root = write_fake_pacs(tmp_path / "pacs", split_files=True)
    f = root / "photo_crossval_kfold.txt"
    f.write_text(f.read_text().replace(" 1\n", " 2\n", 1))
    dm = PACS(root=str(root), test_domains=["sketch"])
    with pytest.raises(ValueError, match="photo_crossval_kfold.txt:1: label 2 disagrees"):
        dm.setup()


def test_missing_root_names_path_layout_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        PACS(root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "art_painting" in msg and "dg-lightning download pacs" in msg


def test_wrong_root_names_the_missing_class_folder(fake_pacs):
    import shutil

    shutil.rmtree(fake_pacs / "sketch" / "horse")
    with pytest.raises(FileNotFoundError, match=r"sketch/horse"):
        PACS(root=str(fake_pacs))


def test_pacs_without_root_says_how(monkeypatch):
    monkeypatch.delenv("PACS_ROOT", raising=False)
    with pytest.raises(ValueError, match="PACS_ROOT.*dg-lightning download pacs"):
        PACS()


def test_unreadable_image_names_the_file(fake_pacs):
    bad = fake_pacs / "cartoon" / "dog" / "pic_000.jpg"
    bad.write_bytes(b"not a jpeg")
    dm = PACS(root=str(fake_pacs), test_domains=["cartoon"])
    ds = dm.dataset("cartoon", "test")
    with pytest.raises(RuntimeError, match=r"cannot read image .*cartoon/dog/pic_000.jpg"):
        ds[0]


def test_resized_copy_keeps_the_tree_names_formats_and_content(tmp_path, fake_pacs):
    write_image_folder(tmp_path / "shapes", per_class=2, size=32, fmt="png")
    assert write_resized_copy(tmp_path / "shapes", tmp_path / "big", 48) == 2 * len(SHAPES) * len(STYLES)
    originals = sorted(p.relative_to(tmp_path / "shapes") for p in (tmp_path / "shapes").glob("*/*/*"))
    assert sorted(p.relative_to(tmp_path / "big") for p in (tmp_path / "big").glob("*/*/*")) == originals
    for rel in originals[:6]:
        with Image.open(tmp_path / "big" / rel) as big:
            assert big.size == (48, 48) and big.format == "PNG"
            back = np.asarray(big.convert("RGB").resize((32, 32), Image.BICUBIC), dtype=float)
        assert np.abs(back - np.asarray(Image.open(tmp_path / "shapes" / rel), dtype=float)).mean() < 12
    write_resized_copy(fake_pacs, tmp_path / "pacs227", 40)  # a data module reads the copy as the original
    dm = PACS(root=str(tmp_path / "pacs227"), test_domains=["photo"], split_seed=0)
    assert dm.domains == list(PACS_DOMAINS) and len(dm.dataset("photo", "test")) == 3 * 7
    with Image.open(tmp_path / "pacs227" / "photo" / "dog" / "pic_000.jpg") as im:
        assert im.format == "JPEG" and im.size == (40, 40)
    with pytest.raises(DataNotFoundError, match="no images under"):
        write_resized_copy(tmp_path / "pacs227" / "photo", tmp_path / "none", 40)  # one level too deep


@pytest.mark.realdata
def test_real_pacs_subset(real_pacs):
    dm = PACS(root=str(real_pacs), test_domains=["sketch"], image_size=64, batch_size=8, split_seed=0)
    dm.setup()
    sizes = {d: len(dm._data[d][0]) for d in dm.domains}
    assert sizes == {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}
    x, y, d, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (24, 3, 64, 64) and d.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert set(np.unique(y.numpy())) <= set(range(7))
    xv, yv, dv, _ = next(iter(dm.val_dataloader()[2]))
    assert int(dv[0]) == 2 and xv.shape[1:] == (3, 64, 64)
