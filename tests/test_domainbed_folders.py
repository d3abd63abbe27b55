"""VLCS, OfficeHome and TerraIncognita on their official (DomainBed) layouts, written here; their downloads."""

import functools
import hashlib
import http.server
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from dg_lightning.data import download as dl
from dg_lightning.data.domainbed import VLCS, OfficeHome, TerraIncognita


def md5_seed(*args) -> int:
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


def write_tree(root, domains, classes, per_class=2, skip=()):
    """``root/<domain>/<class>/img_k.jpg`` (tiny JPEGs); ``skip``: (domain, class) folders left out."""
    rng = np.random.RandomState(0)
    for d in domains:
        for c in classes:
            if (d, c) in skip:
                continue
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / d / c / f"img_{k}.jpg")
    return root


BENCHMARKS = [
    (VLCS, ["Caltech101", "LabelMe", "SUN09", "VOC2007"], ["bird", "car", "chair", "dog", "person"]),
    (OfficeHome, ["Art", "Clipart", "Product", "Real World"], list(OfficeHome.CLASSES)),
    (TerraIncognita, ["location_100", "location_38", "location_43", "location_46"],
     ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"]),
]


@pytest.mark.parametrize("cls,domains,classes", BENCHMARKS, ids=[b[0].__name__ for b in BENCHMARKS])
def test_named_folder_benchmark_on_its_layout(tmp_path, cls, domains, classes):
    per_class = 5 if len(classes) < 20 else 1
    root = write_tree(tmp_path / cls.__name__, domains, classes, per_class)
    dm = cls(root=str(root), test_domains=[domains[2]], split_seed=7, batch_size=2, image_size=16)
    assert dm.domains == domains and dm.classes == sorted(classes) and dm.num_classes == len(classes)
    dm.setup()
    n = len(classes) * per_class
    for env_index, d in enumerate(domains):
        # DomainBed's split: indices shuffled by RandomState(seed_hash(trial_seed, env_index)), first 20 % out
        keys = list(range(n))
        np.random.RandomState(md5_seed(7, env_index)).shuffle(keys)
        assert dm.split_indices(d, "out").tolist() == sorted(keys[:int(n * 0.2)])
        assert dm.split_indices(d, "in").tolist() == sorted(keys[int(n * 0.2):])
    # samples in ImageFolder's order: classes sorted, files sorted; labels from the benchmark's class list
    ds = dm.dataset(domains[0], "test")
    assert [p.parent.name for p in ds.items] == [c for c in sorted(classes) for _ in range(per_class)]
    assert ds.labels.tolist() == [k for k in range(len(classes)) for _ in range(per_class)]
    # the held-out domain is tested on its "in" split (DomainBed's env<i>_in_acc)
    assert len(dm.test_dataloader()[0].dataset) == n - int(n * 0.2)
    x, y, domain = next(iter(dm.train_dataloader()))[:3]
    assert x.shape == (2 * 3, 3, 16, 16) and domain.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_benchmark_errors_name_the_problem(tmp_path):
    domains, classes = BENCHMARKS[0][1:]
    root = write_tree(tmp_path / "vlcs", domains[:3], classes[:4], 1)
    with pytest.raises(FileNotFoundError, match=r"VOC2007(.|\n)*Caltech101,LabelMe,SUN09,VOC2007(.|\n)*download vlcs"):
        VLCS(root=str(root))
    write_tree(root, domains[3:], classes[:4], 1)
    with pytest.raises(ValueError, match=r"missing \['person'\]"):  # a class missing everywhere
        VLCS(root=str(root))
    write_tree(root, ["VOC2007"], ["person"], 1)
    (root / "SUN09" / "cat").mkdir()
    with pytest.raises(ValueError, match=r"not of this benchmark \['cat'\]"):
        VLCS(root=str(root))
    (root / "SUN09" / "cat").rmdir()
    VLCS(root=str(root))  # a class folder missing from one domain only is allowed (labels stay the benchmark's)
    with pytest.raises(ValueError, match="unknown test domain"):
        VLCS(root=str(root), test_domains=["PASCAL"])
    with pytest.raises(ValueError, match="needs data.root(.|\n)*lila.science"):
        TerraIncognita()


@pytest.mark.parametrize("name,cls,inner,archive", [
    ("vlcs", VLCS, "VLCS", "VLCS.tar.gz"),
    ("officehome", OfficeHome, "OfficeHomeDataset_10072016", "office_home.zip"),
])
def test_download_unpacks_domainbed_archive(tmp_path, name, cls, inner, archive):
    """The archive as DomainBed's download script finds it (one top folder), served locally."""
    spec = next(b for b in BENCHMARKS if b[0] is cls)
    src = write_tree(tmp_path / "src" / inner, spec[1], spec[2], 1)
    (src / "ImageInfo.csv").write_text("not an environment\n")  # OfficeHome's archive has such files
    served = tmp_path / "serve" / archive
    served.parent.mkdir()
    if archive.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(served, "w") as z:
            for f in sorted(src.rglob("*")):
                z.write(f, f.relative_to(src.parent).as_posix())
    else:
        with tarfile.open(served, "w:gz") as t:
            t.add(src, arcname=inner)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive}"
        root = dl.download(name, tmp_path / name, url=url, md5=hashlib.md5(served.read_bytes()).hexdigest())
    finally:
        server.shutdown()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == spec[1]
    assert cls(root=str(root)).num_classes == len(spec[2])
    assert len(dl.SOURCES[name].md5) == 32 and dl.SOURCES[name].inner == inner
