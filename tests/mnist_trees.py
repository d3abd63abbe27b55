"""Small MNIST folders in torchvision's layout (``<root>/MNIST/raw/*-ubyte``, the IDX format), written by tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: magic (0, 0, dtype 0x08 = uint8, number of dimensions), big-endian sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, images: np.ndarray, digits: np.ndarray, n_train: int) -> Path:
    """``images`` (N, 28, 28) uint8 and ``digits`` (N,): the first ``n_train`` as the training set."""
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", digits[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", digits[n_train:])
    return root


def id_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-free images that carry their own index: pixels (0, 0) and (0, 1) hold ``1 + i // 250`` and
    ``1 + i % 250`` (never 0), a 200-valued block fills the middle; digits are random."""
    assert n <= 250 * 254
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 200
    i = np.arange(n)
    images[:, 0, 0], images[:, 0, 1] = 1 + i // 250, 1 + i % 250
    return images, np.random.RandomState(seed).randint(0, 10, n).astype(np.uint8)


def image_id(image: np.ndarray) -> int:
    """The index :func:`id_images` wrote into ``image`` (uint8, 28 x 28)."""
    return (int(image[0, 0]) - 1) * 250 + int(image[0, 1]) - 1


def bar_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A horizontal bar through the centre (2 rows thick) whose length encodes the digit: ``6 + 2 * digit``."""
    digits = np.random.RandomState(seed).randint(0, 10, n).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for k, d in enumerate(digits):
        half = 3 + int(d)
        images[k, 13:15, 14 - half:14 + half] = 255
    return images, digits


def orientation(image: np.ndarray) -> tuple[float, float]:
    """(angle of the image's principal axis in degrees, counter-clockwise from horizontal; variance along it)
    from the intensity-weighted second moments."""
    w = image.astype(float)
    rows, cols = np.indices(w.shape)
    x, y = cols.astype(float), -rows.astype(float)  # y up, as angles are measured
    m = w.sum()
    mx, my = (w * x).sum() / m, (w * y).sum() / m
    cxx = (w * (x - mx) ** 2).sum() / m
    cyy = (w * (y - my) ** 2).sum() / m
    cxy = (w * (x - mx) * (y - my)).sum() / m
    angle = 0.5 * np.degrees(np.arctan2(2 * cxy, cxx - cyy))
    major = 0.5 * (cxx + cyy) + np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy ** 2)
    return float(angle), float(major)
