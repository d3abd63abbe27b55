"""RandAugment's image operations on batches of uint8 images, one parameter per sample, pixel for pixel
as Pillow computes them.

RandAugment on PIL images (torchvision's, and the official GCISG code's) calls Pillow for every op:
a lookup table (AutoContrast, Equalize, Posterize, Solarize), a blend with a "degenerate" image
(``ImageEnhance``: Color, Contrast, Brightness, Sharpness), or a nearest-neighbour affine resampling
(``Image.transform`` / ``Image.rotate``: shears, translations, rotations). The functions here take a
batch ``(N, 3, H, W)`` of uint8 images on any device with a parameter per sample and repeat Pillow's
own arithmetic, so that each image comes out bit for bit as Pillow makes it
(``tests/test_randaugment_batch.py`` compares every op with Pillow's on random images):

* blend (``libImaging/Blend.c``): ``trunc(clip(d + a (x - d), 0, 255))`` in float32, the factor ``a``
  rounded to float32 (the C signature) and each product and sum rounded as C rounds them (separate
  tensor ops: no fused multiply-add);
* RGB to L (``Convert.c``): ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` in integers;
* Contrast's degenerate image: the mean of L as ``ImageStat`` computes it, ``int(mean + 0.5)``;
* Sharpness's degenerate image, ``ImageFilter.SMOOTH`` (``Filter.c``, ``ImagingFilter3x3``): the
  float32 kernel 1/13 (5/13 in the centre), summed in Pillow's order from 0.5, truncated; the
  border rows and columns copied;
* AutoContrast (``ImageOps.autocontrast``): per channel ``int(v s + o)``, ``s = 255 / (hi - lo)``,
  ``o = -lo s`` in float64, clipped; unchanged where ``hi <= lo``;
* Equalize (``ImageOps.equalize``): per channel, in integers, ``step = (pixels - count of the
  highest level) // 255``, ``lut(v) = (step // 2 + pixels below v) // step`` clipped at 255 (as
  ``Image.point`` stores it); unchanged with one level or a zero step;
* Posterize, Solarize: their lookup tables;
* affine, nearest neighbour (``Geometry.c``, ``ImagingTransformAffine``): with a shear or a rotation,
  Pillow's 16.16 fixed-point coordinates ``(a2' + x a0 + y a1) >> 16`` (``affine_fixed``); a
  translation alone goes through ``ImagingScaleAffine``, a whole-pixel shift ``floor(a2 + 1/2)``;
  outside the source image, 0. :func:`pil_affine_coefficients` turns the float matrix that Pillow
  receives into those integers, on the CPU, once per sample.

Reproduced from Pillow 13's C code (the version this project installs); an older Pillow rounded
``SMOOTH`` differently. The float arithmetic left to the device is IEEE float32 / float64 multiplication, addition and
true division of tensors, which CPUs and CUDA GPUs round alike (written as separate tensor ops, never
``scalar / tensor``, which torch computes as a product with a reciprocal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Pillow's 16.16 fixed point
_ONE = 65536


def _per_sample(v: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(device=x.device, dtype=dtype).view(-1, 1, 1, 1)


# -- blends (ImageEnhance) -------------------------------------------------------------------------------------
def blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)`` per sample: uint8 (N, C, H, W) (``degenerate`` may
    broadcast), ``factor`` (N,) rounded to float32 as Pillow's C function takes it."""
    d = degenerate.float()
    out = image.float() - d  # exact: integers
    out = out * _per_sample(factor, image, torch.float32)
    out = d + out
    return out.clamp_(0, 255).to(torch.uint8)  # C's (UINT8) cast truncates


def rgb_to_l(x: torch.Tensor) -> torch.Tensor:
    """``convert("L")``: (N, 3, H, W) uint8 -> (N, 1, H, W) uint8, Pillow's integer luma."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(torch.uint8)


def enhance_color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color(im).enhance(f)``: blend with the image's grey (L) version."""
    return blend(rgb_to_l(x), x, factor)


def enhance_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast(im).enhance(f)``: blend with a flat image at the rounded mean of L."""
    lum = rgb_to_l(x)
    total = lum.flatten(1).sum(dim=1, dtype=torch.int64).double()  # exact (ImageStat sums integers)
    # a true division by a device tensor (CUDA divides by a CPU scalar as a product with its reciprocal)
    mean = torch.floor(total / torch.full_like(total, lum[0].numel()) + 0.5)  # int(mean + 0.5), mean > 0
    return blend(mean.view(-1, 1, 1, 1).to(torch.uint8), x, factor)


def enhance_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness(im).enhance(f)``: blend with black."""
    return blend(torch.zeros((), dtype=torch.uint8, device=x.device), x, factor)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """``im.filter(ImageFilter.SMOOTH)``: the 3 x 3 kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 in float32,
    rows summed in Pillow's order (below, centre, above) from 0.5, then truncated; borders copied."""
    if min(x.shape[-2:]) < 3:
        return x.clone()
    edge = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    centre = torch.tensor(5.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    edge, centre = edge.to(x.device), centre.to(x.device)
    f = x.float()
    left, mid, right = f[..., :-2] * edge, f[..., 1:-1], f[..., 2:] * edge
    plain = (left + mid * edge) + right  # rows above and below: ((l k0 + m k1) + r k2)
    middle = (left + mid * centre) + right
    ss = torch.full_like(plain[..., 1:-1, :], 0.5)
    ss = ss + plain[..., 2:, :]  # the row below first (Pillow's kernel[0:3] is applied to y + 1)
    ss = ss + middle[..., 1:-1, :]
    ss = ss + plain[..., :-2, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0, 255).to(torch.uint8)
    return out


def enhance_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness(im).enhance(f)``: blend with the SMOOTH-filtered image."""
    return blend(smooth(x), x, factor)


# -- lookup tables (ImageOps) ----------------------------------------------------------------------------------
def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast(im)`` (no cutoff): each channel stretched from [lo, hi] to [0, 255]."""
    flat = x.flatten(2)
    lo = flat.amin(dim=2).double()[..., None, None]
    hi = flat.amax(dim=2).double()[..., None, None]
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # a true division (``255.0 / t`` is 255 * (1/t))
    offset = -lo * scale
    out = (x.double() * scale + offset).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize(im)``: Pillow's integer histogram equalisation, per channel."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = flat.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255  # (pixels - count of the highest level present) // 255
    below = hist.cumsum(dim=1) - hist  # pixels below each level
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    keep = ((hist > 0).sum(dim=1, keepdim=True) <= 1) | (step == 0)
    out = torch.where(keep, flat, lut.gather(1, flat))
    return out.to(torch.uint8).view(n, c, h, w)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize(im, bits)``: keep the ``bits`` (N,) highest bits."""
    mask = 256 - (2 ** (8 - _per_sample(bits, x, torch.int32)))
    return x & mask.to(torch.uint8)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(im, threshold)``: values ``>= threshold`` (N,) inverted."""
    return torch.where(x.double() < _per_sample(threshold, x, torch.float64), x, 255 - x)


# -- nearest-neighbour affine resampling (Image.transform, Image.rotate) ---------------------------------------
def pil_rotate_matrix(angle: float, width: int, height: int) -> list[float] | None:
    """The inverse matrix ``Image.rotate(angle)`` (about the centre, same size) passes to
    ``Image.transform``, computed as Pillow computes it; ``None`` where Pillow copies the image
    (a multiple of 360 degrees)."""
    angle = angle % 360.0
    if angle == 0:
        return None
    if angle in (90.0, 180.0, 270.0):
        raise ValueError(f"rotation by {angle} degrees: Pillow transposes instead (not reproduced here)")
    cx, cy = width / 2, height / 2
    a = -math.radians(angle)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]
    m[2] += cx
    m[5] += cy
    return m


#: the coefficients of the identity in :func:`affine_nearest`
IDENTITY_AFFINE = (_ONE, 0, 0, 0, _ONE, 0)


def pil_affine_coefficients(matrix: Sequence[float] | None, width: int, height: int) -> tuple[int, ...]:
    """The integers with which Pillow samples ``im.transform(im.size, AFFINE, matrix)`` (nearest
    neighbour): source pixel ``(a2 + x a0 + y a1) >> 16, (a5 + x a3 + y a4) >> 16`` of output pixel
    ``(x, y)``. ``matrix`` maps output to source pixel coordinates; ``None`` is the identity."""
    if matrix is None:
        return IDENTITY_AFFINE
    a = [float(v) for v in matrix[:6]]
    if a[1] == 0 and a[3] == 0:  # ImagingScaleAffine
        if a[0] != 1 or a[4] != 1:
            raise ValueError(f"affine matrix {a}: only translations, shears and rotations are reproduced")
        # xo = a2 + 0.5, stepped by 1.0: exact sums, so every column is floor(a2 + 0.5) + x (COORD)
        return (_ONE, 0, math.floor(a[2] + 0.5) * _ONE, 0, _ONE, math.floor(a[5] + 0.5) * _ONE)
    for x, y in ((0, 0), (width, height), (0, height), (width, 0)):  # Pillow's check_fixed
        if not (abs(x * a[0] + y * a[1] + a[2]) < 32768.0 and abs(x * a[3] + y * a[4] + a[5]) < 32768.0):
            raise ValueError(f"image {width} x {height}: beyond Pillow's fixed-point range (not reproduced)")

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    return (fix(a[0]), fix(a[1]), fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
            fix(a[3]), fix(a[4]), fix(a[5] + a[3] * 0.5 + a[4] * 0.5))


def affine_nearest(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine resampling per sample, (N, C, H, W) uint8 with ``coefficients`` (N, 6)
    from :func:`pil_affine_coefficients`; pixels from outside the image are 0 (Pillow's fill)."""
    n, c, h, w = x.shape
    a = coefficients.to(device=x.device, dtype=torch.int64).T.reshape(6, n, 1, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.int64).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.int64).view(1, h, 1)
    xin = (a[2] + xs * a[0] + ys * a[1]) >> 16  # arithmetic shift: floor, as C's >> on Pillow's ints
    yin = (a[5] + xs * a[3] + ys * a[4]) >> 16
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    index = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return out.masked_fill_(~inside.unsqueeze(1), 0)
