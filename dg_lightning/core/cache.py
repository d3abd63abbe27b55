"""Decoded-image cache: every image of a domain decoded once into a uint8 array, memory-mapped from disk.

A training epoch then reads bytes instead of decoding JPEGs. Each domain (and side) is one file
``(N, side, side, 3)`` of uint8 pixels (HWC, as PIL and the loader's crop want them), resized exactly as the evaluation transform resizes
(``v2.Resize((side, side))``: PIL bilinear, antialiased), plus every image's original (height,
width), which the batched augmentation needs to draw its crop in the original's geometry.
A cropping preset's training copy is built with ``upscale=False``: a file is only ever shrunk, axis by
axis, to at most ``side`` (:func:`stored_extent`) and kept at the top left of the square, so a file
smaller than the copy (PACS at 96 px under a 110 px copy) reaches the crop at its own pixels instead of
being enlarged and resampled twice.

* **Keyed** by the file list and each file's size and modification time (and the side): a changed,
  added or removed file gives a new key, so a stale cache is never read; the old file is deleted
  when the new one is written.
* **Streaming**: the file is opened with ``np.memmap``; a sample reads its own bytes, the page
  cache keeps what fits in memory and nothing else (DomainNet at 224 px x 1.15 is ~117 GB: it is
  never loaded whole). Workers open their own map (nothing large is pickled).
* **Where**: ``<root>/.dg_lightning/decoded/`` when the data root is writable, else
  ``$DG_CACHE`` (default ``~/.cache/dg-lightning``), or the data module's ``cache_dir``.
* **Concurrency**: a build holds an exclusive lock on ``<file>.lock``, so concurrent runs on the same
  data (a SLURM array) build each file once; it is written to ``.tmp`` and renamed when complete.

Why not ``litdata``: its ``StreamingDataset`` is an iterable dataset with its own chunk-wise
shuffling and its own resume state, whereas the balanced sampler here needs random access by index
(so that the augmentation seed, the domain balance and exact resume stay the sampler's); and the
records are fixed-size arrays, which a memory map serves with no deserialisation at all. litdata
earns its place where the data sits in an object store; a local or network file system, as here,
does not need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dg_lightning.core.errors import ConfigError

#: bump when the stored bytes change meaning (resize method, layout)
CACHE_VERSION = 2


def cache_candidates(root: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """Cache folders in order of preference: ``cache_dir`` if given; else ``<root>/.dg_lightning``, then
    ``$DG_CACHE`` (default ``~/.cache/dg-lightning``)."""
    if cache_dir:
        return [Path(cache_dir).expanduser()]
    out = [Path(root).expanduser() / ".dg_lightning"] if root is not None else []
    return [*out, Path(os.environ.get("DG_CACHE", "~/.cache/dg-lightning")).expanduser()]


def _marked_read_only(folder: Path) -> bool:
    """The nearest existing folder at or above ``folder`` has no write bit at all: a data folder shipped
    read-only. Root could still write there (permission checks do not apply to it); it should not."""
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    return not (p.stat().st_mode & 0o222)


def writable_folder(candidates: Sequence[Path]) -> Path:
    """The first candidate folder that exists or can be made, and is writable (and not marked read-only)."""
    for folder in candidates:
        if _marked_read_only(folder):
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_test_{os.getpid()}"
            probe.touch()
            probe.unlink()
            return folder
        except OSError:
            continue
    raise ConfigError(f"no writable cache folder among {[str(c) for c in candidates]}",
                      fix="set data.cache_dir (or DG_CACHE) to a writable folder")


def stored_extent(original_hw: tuple[int, int], side: int, upscale: bool = True) -> tuple[int, int]:
    """(height, width) that an image of ``original_hw`` fills in a cache of ``side``: the whole square,
    or with ``upscale=False`` each axis shrunk to at most ``side`` and never enlarged."""
    if upscale:
        return side, side
    return min(int(original_hw[0]), side), min(int(original_hw[1]), side)


def resize_uint8(image: Any, side: int, upscale: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` (PIL, or a CHW uint8 tensor) resized to ``side x side`` as the evaluation transform
    does (``upscale=False``: to :func:`stored_extent`, at the top left of a zero ``side x side``
    square); returns (HWC uint8 array, original (height, width))."""
    pil = isinstance(image, Image.Image)
    hw = (image.height, image.width) if pil else tuple(int(s) for s in image.shape[-2:])
    extent = stored_extent(hw, side, upscale)
    if upscale or extent != hw:
        image = v2.functional.resize(image if pil else torch.as_tensor(image), list(extent), antialias=True)
    out = np.asarray(image) if pil else torch.as_tensor(image).permute(1, 2, 0).numpy()
    if extent != (side, side):
        square = np.zeros((side, side, 3), dtype=np.uint8)
        square[: extent[0], : extent[1]] = out
        out = square
    return np.ascontiguousarray(out, dtype=np.uint8), hw


class DecodeOnLoad:
    """The cache's interface without a cache: each access decodes and resizes (``batch_augment``
    without ``cache_images``)."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any], side: int, upscale: bool = True):
        self.items, self.load, self.side, self.upscale = list(items), load, side, upscale

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        return resize_uint8(self.load(self.items[k]), self.side, self.upscale)


class _Decode(DecodeOnLoad):
    def __getitem__(self, k):
        return (k, *super().__getitem__(k))


def _fingerprint(items: Sequence[Any], side: int, upscale: bool = True) -> str:
    """sha1 of the version, the side (and ``upscale``), and each item's path, size and modification time."""
    h = hashlib.sha1(f"v{CACHE_VERSION}/{side}/{len(items)}{'' if upscale else '/shrink-only'}".encode())
    for item in items:
        st = os.stat(item)
        h.update(f"\n{os.fspath(item)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (builds write to .tmp and rename)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DecodedCache:
    """``(N, side, side, 3)`` uint8 pixels and original sizes of one domain; ``cache[k]`` is
    ``(uint8 array (side, side, 3), (height, width))``. On disk (memory-mapped) or in memory (``path`` None)."""

    def __init__(self, n: int, side: int, sizes: np.ndarray, path: Path | None = None,
                 array: np.ndarray | None = None):
        self.n, self.side, self.sizes, self.path = n, side, np.asarray(sizes, dtype=np.int32), path
        self._array = array
        self.built_seconds: float | None = None

    def __len__(self) -> int:
        return self.n

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.n, self.side, self.side, 3))
        return self._array

    def __getitem__(self, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        h, w = self.sizes[k]
        return np.array(self.array()[k]), (int(h), int(w))

    def __getstate__(self):  # workers open their own map: never pickle the pixels of a file cache
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def in_memory(cls, items: Sequence[Any], load: Callable[[Any], Any], side: int,
                  upscale: bool = True) -> DecodedCache:
        """For data that is already in memory (generated): the resized pixels in an array."""
        decoded = [resize_uint8(load(item), side, upscale) for item in items]
        return cls(len(items), side, np.array([hw for _, hw in decoded]).reshape(-1, 2),
                   array=np.stack([p for p, _ in decoded]) if decoded else np.zeros((0, side, side, 3), np.uint8))

    @classmethod
    def open_or_build(cls, folder: Path, name: str, items: Sequence[Any], load: Callable[[Any], Any],
                      side: int, workers: int = 0, log: Callable[[str], None] = print,
                      upscale: bool = True) -> DecodedCache:
        """The cache of ``items`` (file paths) at ``side`` in ``folder``, built first if missing or stale."""
        key = _fingerprint(items, side, upscale)
        stem = f"{name}-{side}px" if upscale else f"{name}-fit{side}px"  # neither glob matches the other
        pixels = folder / f"{stem}-{key[:16]}.u8"
        meta_path, sizes_path = pixels.with_suffix(".json"), pixels.with_suffix(".sizes.npy")
        with _locked(folder / f"{stem}.lock"):
            if not cls._valid(pixels, meta_path, key, len(items), side):
                t0 = time.perf_counter()
                log(f"decoded-image cache: decoding {len(items)} images at {side} px into {pixels}")
                sizes = cls._build(pixels, items, load, side, workers, upscale)
                np.save(sizes_path, sizes)
                tmp = meta_path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": key, "n": len(items), "side": side,
                                           "name": name}))
                tmp.replace(meta_path)
                for old in folder.glob(f"{stem}-*"):  # stale caches of the same data and side
                    if old.name.split(".")[0] != pixels.stem:
                        old.unlink(missing_ok=True)
                built = time.perf_counter() - t0
                log(f"decoded-image cache: {len(items)} images in {built:.1f} s")
            else:
                built = None
        cache = cls(len(items), side, np.load(sizes_path), path=pixels)
        cache.built_seconds = built
        return cache

    @staticmethod
    def _valid(pixels: Path, meta_path: Path, key: str, n: int, side: int) -> bool:
        if not (pixels.is_file() and meta_path.is_file() and pixels.with_suffix(".sizes.npy").is_file()):
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            return False
        return meta.get("key") == key and pixels.stat().st_size == n * 3 * side * side

    @staticmethod
    def _build(pixels: Path, items, load, side: int, workers: int, upscale: bool = True) -> np.ndarray:
        n = len(items)
        tmp = pixels.with_suffix(".u8.tmp")
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), side, side, 3))
        sizes = np.zeros((n, 2), dtype=np.int32)
        loader = DataLoader(_Decode(items, load, side, upscale), batch_size=64, num_workers=workers,
                            collate_fn=list)
        for chunk in loader:
            for k, arr, hw in chunk:
                out[k] = arr
                sizes[k] = hw
        out.flush()
        del out
        if n == 0:
            tmp.write_bytes(b"")
        tmp.replace(pixels)
        return sizes
