import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from dg_lightning.data import download as dl
from dg_lightning.data.download import ChecksumError, download
from tests.conftest import write_fake_pacs


@pytest.fixture
def pacs_server(tmp_path):
    """A local HTTP server serving a small PACS.zip laid out like DomainBed's (kfold/<domain>/...)."""
    tree = write_fake_pacs(tmp_path / "src" / "kfold", per_class=1, size=8)
    archive = tmp_path / "serve" / "PACS.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(tree.rglob("*.jpg")):
            z.write(f, f.relative_to(tree.parent).as_posix())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/PACS.zip"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()


def test_download_verifies_and_lays_out_pacs(tmp_path, pacs_server):
    url, md5 = pacs_server
    root = download("pacs", tmp_path / "pacs", url=url, md5=md5)
    assert sorted(p.name for p in root.iterdir()) == ["art_painting", "cartoon", "photo", "sketch"]
    assert len(list(root.rglob("*.jpg"))) == 28
    assert not (root / ".download").exists()


def test_download_with_wrong_checksum_fails_and_deletes(tmp_path, pacs_server):
    url, _ = pacs_server
    with pytest.raises(ChecksumError, match="md5 of .*PACS.zip is [0-9a-f]{32}, expected 0{32}"):
        download("pacs", tmp_path / "pacs", url=url, md5="0" * 32)
    assert not (tmp_path / "pacs" / ".download" / "PACS.zip").exists()
    assert not (tmp_path / "pacs" / "photo").exists()


def test_download_cli_reports_checksum_error(tmp_path, pacs_server, capsys):
    from dg_lightning.cli_utils import guarded

    url, _ = pacs_server
    rc = guarded(lambda: dl.main(["pacs", "--root", str(tmp_path / "p"), "--url", url, "--md5", "1" * 32]))
    err = capsys.readouterr().err
    assert rc == 2 and "error: md5 of" in err and "expected 1111" in err and "Traceback" not in err


def test_published_source_has_a_checksum():
    assert dl.SOURCES["pacs"].md5 and len(dl.SOURCES["pacs"].md5) == 32


def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as t:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
            else:
                info.size = 2
                t.addfile(info, io.BytesIO(b"ok"))
    return path


@pytest.mark.parametrize("with_filter", [True, False], ids=["data-filter", "python-without-filters"])
def test_extract_unpacks_a_tar_and_refuses_paths_outside(tmp_path, monkeypatch, with_filter):
    import tarfile

    if not with_filter:  # Python 3.11.0-3.11.3 have no extraction filters: the members are checked here
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = _tar(tmp_path / "good.tar.gz", [("VLCS/Caltech101/bird/1.jpg", "file")])
    dl.extract(good, tmp_path / "out")
    assert (tmp_path / "out/VLCS/Caltech101/bird/1.jpg").read_bytes() == b"ok"
    for bad in (("../escape.txt", "file"), ("VLCS/link", "symlink")):
        with pytest.raises((tarfile.TarError, dl.DataError)):
            dl.extract(_tar(tmp_path / "bad.tar.gz", [bad]), tmp_path / "out2")
        assert not (tmp_path / "escape.txt").exists()
