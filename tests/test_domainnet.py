"""DomainNet on a fake tree in the official layout: list parsing, the cached index, both protocols."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dg_lightning.data.domainnet import DOMAINS, DomainNet, parse_list

CLASSES = ["aircraft_carrier", "zebra", "The_Eiffel_Tower"]  # label order is the lists', not alphabetical


def write_domainnet(root: Path, train: int = 4, test: int = 2) -> Path:
    """<root>/<domain>/<class>/<domain>_<k>_<n>.jpg and <domain>_{train,test}.txt, as officially."""
    for d in DOMAINS:
        lines = {"train": [], "test": []}
        for label, c in enumerate(CLASSES):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for n in range(train + test):
                rel = f"{d}/{c}/{d}_{label + 1:03d}_{n:06d}.jpg"
                Image.fromarray(np.full((8, 8, 3), 40 * label, np.uint8)).save(root / rel)
                lines["train" if n < train else "test"].append(f"{rel} {label}")
        for part, rows in lines.items():
            (root / f"{d}_{part}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tree(tmp_path):
    return write_domainnet(tmp_path / "domainnet")


def test_parse_list_reads_paths_labels_and_class_names(tmp_path):
    p = tmp_path / "real_train.txt"
    p.write_text("real/zebra/real_345_000001.jpg 344\nreal/axe/real_002_000003.jpg 1\n\n")
    items, labels, names = parse_list(p, "real")
    assert items == ["real/zebra/real_345_000001.jpg", "real/axe/real_002_000003.jpg"]
    assert labels == [344, 1] and names == {344: "zebra", 1: "axe"}


@pytest.mark.parametrize("line,problem", [
    ("real/zebra/x.jpg", "expected"),                       # no label
    ("sketch/zebra/x.jpg 3", "is not 'real/<class>/<image>'"),  # another domain's image
    ("real/zebra/x.jpg 3\nreal/axe/y.jpg 3", "label 3 is class 'zebra'"),  # one label, two classes
])
def test_parse_list_names_the_bad_line(tmp_path, line, problem):
    p = tmp_path / "real_train.txt"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=problem):
        parse_list(p, "real")


def test_leave_one_domain_out_domainbed_protocol(tree):
    dm = DomainNet(root=str(tree), test_domains=["sketch"], batch_size=2, image_size=16, split_seed=0)
    assert dm.domains == list(DOMAINS) and dm.classes == CLASSES and dm.num_classes == 3
    assert dm.train_domains == ["clipart", "infograph", "painting", "quickdraw", "real"]
    dm.setup()
    n = 3 * 6  # every image of a domain: both lists
    for d in dm.train_domains:
        assert len(dm.split_indices(d, "in")) + len(dm.split_indices(d, "out")) == n
        assert len(dm.split_indices(d, "out")) == round(0.2 * n)
    assert len(dm.split_indices("sketch", "test")) == n
    x, y, domain, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 16, 16) and domain.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # labels come from the lists and agree with the images (class k was written with value 40 k)
    ds = dm.dataset("sketch", "test")
    for i in range(len(ds)):
        img, label, *_ = ds[i]
        assert abs(float(img.mean()) * 255 - 40 * int(label)) < 1.5


def test_official_protocol_tests_on_the_test_list(tree):
    dm = DomainNet(root=str(tree), test_domains=["real"], protocol="official", batch_size=2, image_size=16,
                   domains=["clipart", "real"])
    dm.setup()
    assert dm.train_domains == ["clipart"]
    assert len(dm.split_indices("clipart", "in")) + len(dm.split_indices("clipart", "out")) == 3 * 4
    test = dm.dataset("real", "test")
    assert len(test) == 3 * 2 and all(Path(p).stem.endswith(("000004", "000005")) for p in test.items)


def test_index_is_parsed_once_then_read_from_the_cache(tree, monkeypatch):
    first = DomainNet(root=str(tree), test_domains=["sketch"])
    assert not first.index_cached
    # the second module reads the cache: no list parsing and no directory walk
    import dg_lightning.data.domainnet as mod

    monkeypatch.setattr(mod, "parse_list", lambda *a: pytest.fail("lists parsed again"))
    monkeypatch.setattr(Path, "iterdir", lambda self: pytest.fail(f"directory walk of {self}"))
    monkeypatch.setattr(Path, "rglob", lambda self, *a: pytest.fail(f"directory walk of {self}"))
    second = DomainNet(root=str(tree), test_domains=["sketch"])
    second.setup()
    assert second.index_cached and second.classes == CLASSES
    monkeypatch.undo()
    # a changed list invalidates the cache
    lst = tree / "real_test.txt"
    lst.write_text(lst.read_text().splitlines()[0] + "\n")
    third = DomainNet(root=str(tree), test_domains=["real"])
    third.setup()
    assert not third.index_cached and len(third.split_indices("real", "test")) == 3 * 4 + 1


def test_missing_list_names_the_layout_and_where_to_get_it(tree):
    (tree / "quickdraw_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"quickdraw_test.txt(.|\n)*expected layout(.|\n)*M3SDA"):
        DomainNet(root=str(tree), test_domains=["sketch"])
    with pytest.raises(ValueError, match="DOMAINNET_ROOT"):
        DomainNet(test_domains=["sketch"])
