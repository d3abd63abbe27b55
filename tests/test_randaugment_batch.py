"""core/randaugment.py: every batched op against Pillow itself, image by image, on batches whose samples
carry different parameters (bit for bit: no tolerance)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dg_lightning.core import randaugment as R


def _random_images(rs, n, sizes=((17, 23), (24, 24), (5, 9), (31, 12))):
    """Images of varied size and range (narrow ranges make AutoContrast and Equalize non-trivial)."""
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        lo, hi = sorted(rs.randint(0, 256, 2))
        out.append(rs.randint(lo, hi + 1, (h, w, 3)).astype(np.uint8))
    return out


def _by_size(images):
    """Group images of equal size into batches: {(h, w): [indices]}."""
    groups = {}
    for i, a in enumerate(images):
        groups.setdefault(a.shape[:2], []).append(i)
    return groups


def _batch(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _check(images, batched, per_image):
    """``batched(x, idx)`` on each batch of same-size images (``idx``: their indices) equals
    ``per_image(PIL image, i)`` for each of them."""
    for idx in _by_size(images).values():
        out = batched(_batch([images[i] for i in idx]), torch.tensor(idx)).permute(0, 2, 3, 1).numpy()
        for j, i in enumerate(idx):
            assert np.array_equal(out[j], np.asarray(per_image(Image.fromarray(images[i]), i))), i


ENHANCE = [(ImageEnhance.Color, R.enhance_color), (ImageEnhance.Contrast, R.enhance_contrast),
           (ImageEnhance.Brightness, R.enhance_brightness), (ImageEnhance.Sharpness, R.enhance_sharpness)]


@pytest.mark.parametrize("pil,batched", ENHANCE, ids=["color", "contrast", "brightness", "sharpness"])
def test_enhance_ops_equal_pillow(pil, batched):
    rs = np.random.RandomState(0)
    images = _random_images(rs, 48)
    # interpolation (0..1) and extrapolation (< 0, > 1); RandAugment's 1 +- 0.9 m / 30 among them
    factors = torch.tensor(np.concatenate([[0.82, 1.18, 0.1, 1.9, 0.0, 1.0], rs.uniform(-0.5, 2.5, 42)]))
    _check(images, lambda x, i: batched(x, factors[i]), lambda im, i: pil(im).enhance(float(factors[i])))


def test_smooth_equals_pillow_filter():
    images = _random_images(np.random.RandomState(1), 16)
    _check(images, lambda x, _: R.smooth(x), lambda im, _: im.filter(ImageFilter.SMOOTH))


def test_autocontrast_and_equalize_equal_pillow():
    rs = np.random.RandomState(2)
    images = _random_images(rs, 40)
    flat = images[0].copy()
    flat[..., 1] = 77  # a constant channel: left as it is
    images[0] = flat
    # 121..226: Pillow's int(212 s - 121 s) is 220 where 255 * (1 / 105) rounding would give 221
    images[1] = np.full((17, 23, 3), 121, np.uint8)
    images[1][0, :3] = [[212, 219, 226]] * 3
    # Equalize: 511 pixels at one level, one at another: lut = 256 at the top level, stored as 255
    two = np.full((16, 32, 3), 10, np.uint8)
    two[0, 0] = 200
    images.append(two)
    _check(images, lambda x, _: R.autocontrast(x), lambda im, _: ImageOps.autocontrast(im))
    _check(images, lambda x, _: R.equalize(x), lambda im, _: ImageOps.equalize(im))


def test_posterize_and_solarize_equal_pillow():
    rs = np.random.RandomState(3)
    images = _random_images(rs, 32)
    bits = torch.tensor(rs.randint(1, 9, 32), dtype=torch.float64)
    _check(images, lambda x, i: R.posterize(x, bits[i]), lambda im, i: ImageOps.posterize(im, int(bits[i])))
    thresholds = torch.tensor(np.concatenate([[204.8, 205.0, 256.0, 0.0], rs.uniform(0, 256, 28)]))
    _check(images, lambda x, i: R.solarize(x, thresholds[i]),
           lambda im, i: ImageOps.solarize(im, float(thresholds[i])))


def _affine_params(kind, rs, n):
    if kind == "rotate":
        return np.concatenate([[0.0, 360.0, 6.0, -6.0, 30.0, -0.5], rs.uniform(-45, 45, n - 6)])
    if kind in ("shear_x", "shear_y"):
        return np.concatenate([[0.0], rs.uniform(-0.3, 0.3, n - 1).astype(np.float32)])
    return np.concatenate([[0.0, 20.0, -20.0, 30.000001907348633], rs.uniform(-40, 40, n - 4).astype(np.float32)])


def _matrix(kind, v):
    return {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
            "translate_x": (1, 0, v, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v)}[kind]


@pytest.mark.parametrize("kind", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_nearest_affine_equals_pillow(kind):
    rs = np.random.RandomState(4)
    images = _random_images(rs, 40, sizes=((17, 23), (24, 24), (32, 20), (9, 9)))
    values = _affine_params(kind, rs, 40)

    def coefficients(i):
        h, w = images[i].shape[:2]
        m = R.pil_rotate_matrix(values[i], w, h) if kind == "rotate" else _matrix(kind, float(values[i]))
        return R.pil_affine_coefficients(m, w, h)

    coeffs = torch.tensor([coefficients(i) for i in range(len(images))])

    def per_image(im, i):
        if kind == "rotate":
            return im.rotate(float(values[i]))
        return im.transform(im.size, Image.AFFINE, _matrix(kind, float(values[i])))

    _check(images, lambda x, i: R.affine_nearest(x, coeffs[i]), per_image)
    assert R.pil_rotate_matrix(360.0, 8, 8) is None and R.pil_affine_coefficients(None, 8, 8) == R.IDENTITY_AFFINE


def test_affine_rejects_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="only translations, shears and rotations"):
        R.pil_affine_coefficients((2, 0, 0, 0, 2, 0), 8, 8)
    with pytest.raises(ValueError, match="transposes"):
        R.pil_rotate_matrix(90.0, 8, 8)
