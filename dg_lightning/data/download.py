"""``dg-lightning download NAME --root DIR``: fetch a dataset archive, verify it, unpack it, check it.

    dg-lightning download pacs --root ~/data/pacs
    dg-lightning download pacs --root ~/data/pacs --url https://my.mirror/PACS.zip   # same checksum
    dg-lightning download --list

The archive is streamed to ``<root>/.download/<file>.part`` with a progress bar, its checksum is
compared with the published one (a mismatch deletes the file and says so), it is unpacked, moved
into the benchmark's official layout, and the layout is checked by the benchmark's own data module.
"""

from __future__ import annotations

import argparse
import hashlib
import http.cookiejar
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from dg_lightning.core.errors import ConfigError, DataError, DGError


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    #: folder inside the archive that holds the official layout
    inner: str = ""
    #: ``module:Class`` of the data module whose constructor validates the layout
    datamodule: str | None = None
    note: str = ""
    #: ``module:function(root)`` that downloads and checks the data itself (instead of ``url``)
    fetch_with: str | None = None


SOURCES: dict[str, Source] = {
    # DomainBed's PACS archive (kfold/<domain>/<class>/*.jpg, 9,991 images); md5 as published with it.
    "pacs": Source(
        url="https://drive.google.com/uc?export=download&confirm=t&id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
        filename="PACS.zip", md5="fd5db817f7cdafeef3bfd525aaf9b42e", inner="kfold",
        datamodule="dg_lightning.data.folder:PACS",
        note="DomainBed's copy of PACS (Li et al. 2017), 174 MB",
    ),
    # DomainBed's VLCS and OfficeHome archives (domainbed/scripts/download.py). The md5 values are the
    # ones published beside the PACS md5 above in LarsKue/context-aware-domain-generalization
    # (datasets/legacy/domain_bed); they were not recomputed here (no network on this machine).
    "vlcs": Source(
        url="https://drive.google.com/uc?export=download&confirm=t&id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8",
        filename="VLCS.tar.gz", md5="8870171eba660927d9668f4e515928e4", inner="VLCS",
        datamodule="dg_lightning.data.domainbed:VLCS",
        note="DomainBed's copy of VLCS (Fang et al. 2013), Caltech101/LabelMe/SUN09/VOC2007, 5 classes",
    ),
    "officehome": Source(
        url="https://drive.google.com/uc?export=download&confirm=t&id=1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC",
        filename="office_home.zip", md5="b1c14819770c4448fd5b6d931031c91c", inner="OfficeHomeDataset_10072016",
        datamodule="dg_lightning.data.domainbed:OfficeHome",
        note="DomainBed's copy of OfficeHome (Venkateswara et al. 2017), 65 classes",
    ),
    # MNIST for ColoredMNIST / RotatedMNIST: torchvision's own download (its mirrors, md5 per archive)
    "mnist": Source(
        url="torchvision.datasets.MNIST", filename="", fetch_with="dg_lightning.data.mnist:download_mnist",
        datamodule="dg_lightning.data.mnist:ColoredMNIST",
        note="MNIST through torchvision (for ColoredMNIST and RotatedMNIST), 55 MB",
    ),
}


class ChecksumError(DataError, RuntimeError):
    """A downloaded file whose digest is not the expected one (a data error: exit status 2)."""


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the given digest(s)."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise ChecksumError(f"{algorithm} of {path} is {got}, expected {expected}: the download is "
                                    "corrupt or the source changed. The file was deleted; run the command again.")


def fetch(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` (via ``dest.part``), with a progress bar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    request = urllib.request.Request(url, headers={"User-Agent": "dg-lightning"})
    with opener.open(request, timeout=timeout) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), transient=False) as progress:
            task = progress.add_task(f"download {dest.name}", total=total)
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                progress.update(task, advance=len(chunk))
    part.replace(dest)
    return dest


def _safe_members(tar: tarfile.TarFile, into: Path) -> list[tarfile.TarInfo]:
    """The members of ``tar`` if each is a plain file or folder that lands inside ``into`` (what the
    ``data`` filter enforces, for a Python without it); else a :class:`DataError` naming the member."""
    root = Path(into).resolve()
    members = tar.getmembers()
    for m in members:
        target = (root / m.name).resolve()
        if not (m.isfile() or m.isdir()) or (target != root and root not in target.parents):
            raise DataError(f"{m.name!r} in the archive is a link, a device or a path outside {root}: "
                            "not unpacked", fix="check where the archive came from, or unpack it by hand")
    return members


def extract(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and the 3.8-3.10 security releases)
                t.extractall(into, filter="data")
            else:
                t.extractall(into, members=_safe_members(t, into))
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive")


def download(name: str, root: str | Path, url: str | None = None, md5: str | None = None,
             sha256: str | None = None, keep_archive: bool = False) -> Path:
    """Download dataset ``name`` into ``root`` in its official layout; returns ``root``."""
    if name not in SOURCES:
        raise ConfigError(f"no download for {name!r}; available: {sorted(SOURCES)}")
    src = SOURCES[name]
    root = Path(root).expanduser()
    if src.fetch_with:
        if url or md5 or sha256:
            raise ConfigError(f"{name} is downloaded by {src.fetch_with} with its own sources and checksums: "
                              "--url/--md5/--sha256 do not apply")
        module, func = src.fetch_with.split(":")
        getattr(__import__(module, fromlist=[func]), func)(root)
        _check_layout(src, root)
        return root
    staging = root / ".download"
    archive = staging / src.filename
    md5 = md5 if (md5 or sha256) else src.md5
    sha256 = sha256 if (md5 or sha256) else src.sha256
    if not archive.exists():
        fetch(url or src.url, archive)
    try:
        verify(archive, md5=md5, sha256=sha256)
    except ChecksumError:
        archive.unlink(missing_ok=True)
        raise
    unpacked = staging / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    extract(archive, unpacked)
    inner = unpacked / src.inner if src.inner and (unpacked / src.inner).is_dir() else unpacked
    for child in inner.iterdir():
        target = root / child.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(child), target)
    shutil.rmtree(unpacked, ignore_errors=True)
    if not keep_archive:
        shutil.rmtree(staging, ignore_errors=True)
    _check_layout(src, root)
    return root


def _check_layout(src: Source, root: Path) -> None:
    """The data module's own layout check (its constructor raises on a missing path)."""
    if src.datamodule:
        module, cls = src.datamodule.split(":")
        getattr(__import__(module, fromlist=[cls]), cls)(root=str(root))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dg-lightning download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=sorted(SOURCES))
    p.add_argument("--root", help="where the dataset goes (its official layout)")
    p.add_argument("--url", help="a mirror of the same archive (the checksum still applies)")
    p.add_argument("--md5", help="expected md5 (with --url, for a different archive)")
    p.add_argument("--sha256", help="expected sha256 (with --url, for a different archive)")
    p.add_argument("--keep-archive", action="store_true")
    p.add_argument("--list", action="store_true", help="list the datasets this command can download")
    args = p.parse_args(argv)
    if args.list or not args.name:
        for n, s in SOURCES.items():
            print(f"{n:10s} {s.note}  ({s.url})")
        return 0
    if not args.root:
        p.error("--root DIR is required")
    try:  # a checksum or layout error is a DGError: the CLI prints it, exit status 2
        root = download(args.name, args.root, args.url, args.md5, args.sha256, args.keep_archive)
    except OSError as e:  # the network, the disk
        if isinstance(e, DGError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name} ready in {root}")
    return 0
