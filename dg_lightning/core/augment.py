"""Augmentation on whole batches, on the model's device, with every sample's parameters drawn from its seed.

The per-sample path (``core.data.build_transform``) decodes each image and augments it with PIL in
the loader. The batched path (``data.batch_augment``) splits the work where each part is cheapest:

1. **in the loader, per sample** (:meth:`BatchAugment.prepare`): the sample's seed (from the balanced
   sampler) and its original size give its parameters; the geometric part (crop, resize, flip) is
   applied to the stored uint8 image with PIL's resampling, which is a few tens of microseconds per
   image, cheaper than any float resampling of the batch on a CPU; the collate function adds a
   per-batch :meth:`~BatchAugment.plan` (index groups, so the device never waits for a host read);
2. **on the device, per batch** (:meth:`BatchAugment.__call__`, from the data module's
   ``on_after_batch_transfer``): uint8 to float and the photometric part, the expensive part of the
   per-sample path (PIL's colour jitter), as a few tensor ops over the whole batch.

A sample's augmentation therefore depends only on its seed, as in the per-sample path: the same seed
gives the same batches with any number of workers or DDP ranks, and a resumed run repeats the
uninterrupted one. The loader's batches are uint8 (a quarter of the bytes to copy to a GPU).

Presets (``data.augment``):

* ``domainbed``: DomainBed's training augmentation (``domainbed/datasets.py``,
  ``MultipleEnvironmentImageFolder``'s ``augment_transform``): RandomResizedCrop(scale 0.7-1, ratio
  3/4-4/3), horizontal flip, ColorJitter(0.3, 0.3, 0.3, 0.3) in a random order per image,
  RandomGrayscale(0.1). The crop box is drawn as torchvision draws it, on the *original* image's
  pixel grid, and cut from the stored copy (``cache_scale`` x the training side, never larger than
  the file: ``core.cache.stored_extent``) in the same relative coordinates (PIL's antialiased
  bilinear resize, as torchvision's on PIL images), so a file no larger than the copy is cut at its
  own pixels, as the per-sample path cuts it. The colour
  operations are torchvision's tensor formulas with one factor per sample, in float rather than
  PIL's uint8 between operations. (Written here: torchvision's functional ops take one factor per
  call, and kornia's per-sample ColorJitter applies one order to the whole batch.)
* ``flip``: the resized image, mirrored with probability 0.5; ``none``: the resized image.

A method can replace the preset by its own batched views (``DGMethod.batch_views``), for instance
:class:`BatchViews` of several augmentations of the same stored image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from dg_lightning.core.cache import stored_extent
from dg_lightning.core.errors import ConfigError
from dg_lightning.core.seeding import stable_seed


def stored_side(image_size: int, augment: str, cache_scale: float) -> int:
    """Side at which images are stored for a preset: a cropping preset reads a larger copy."""
    return int(round(image_size * cache_scale)) if augment == "domainbed" else image_size


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], bit for bit as ``v2.ToDtype(torch.float32, scale=True)``."""
    return images.float().mul_(1.0 / 255)


def hwc_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> contiguous float (..., 3, H, W) in [0, 1]."""
    return to_float(images.movedim(-1, -3).contiguous())


class BatchAugment:
    """A batched augmentation: the base is the identity (``augment: none``).

    Attributes:
        size: output side.
        source_side: side of the stored (cached) images it reads.
        upscale: whether a file smaller than ``source_side`` is stored enlarged to it; ``False`` (a
            cropping preset): stored at its own size at the top left (``core.cache.stored_extent``).
    """

    upscale = True

    def __init__(self, size: int, source_side: int | None = None):
        self.size, self.source_side = size, source_side or size

    def prepare(self, image: np.ndarray, original_hw: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
        """Loader side, one sample: the stored uint8 image (S, S, 3) -> ``{"image": uint8 (size, size, 3),
        ...parameters}``, a pure function of ``seed`` and the original (height, width)."""
        return {"image": torch.from_numpy(np.ascontiguousarray(image))}

    def plan(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Loader side, one collated batch: extra entries computed on the CPU (they travel with the batch)."""
        return {}

    def __call__(self, batch: dict[str, Any]):
        """Device side: the collated (and planned) batch -> float images (B, 3, size, size) in [0, 1]."""
        return hwc_to_float(batch["image"])


def resized_crop_params(rng: random.Random, height: int, width: int, scale=(0.7, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, drawn as torchvision's ``RandomResizedCrop`` draws it
    (10 tries of area fraction ~ U(scale) and log-uniform aspect ratio, else the central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# -- colour operations on batches, one factor per sample (torchvision's tensor formulas) ---------------
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W), torchvision's weights."""
    return v2.functional.rgb_to_grayscale(x)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``f x + (1 - f) other``, clamped to [0, 1]."""
    f = _per_sample(f)
    return (x * f).add_(other * (1 - f)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), f)


#: per channel (R, G, B): the hue-to-RGB ramps ``sign |H - offset| + base``
_HUE_RAMPS = torch.tensor([[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]]).view(3, 1, 3, 1, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``f`` (a fraction of the circle, per sample), keeping value and saturation,
    as torchvision's ``adjust_hue``, without materialising HSV. With max/min/chroma ``M, m, C`` the hue
    in sextants is ``H = (g - b)/C``, ``(b - r)/C + 2`` or ``(r - g)/C + 4`` as R, G or B is the max
    (first one on ties, as torchvision); after the shift, the channels are ``m + C (|H - 3| - 1, 2 -
    |H - 2|, 2 - |H - 4|)`` clamped to [0, 1]. Branch-free (masks from signs): ``torch.where`` and
    argmax are several times slower on a CPU."""
    r, g, b = x.unbind(1)
    hi = torch.maximum(torch.maximum(r, g), b)
    lo = torch.minimum(torch.minimum(r, g), b)
    chroma = hi - lo
    is_r = (r - hi).sign_().add_(1)  # 1 where r is the max, else 0
    is_g = (g - hi).sign_().add_(1).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    h = is_r * (g - b) + is_g * (b - r) + is_b * (r - g)
    h = h.div_(chroma.clamp(min=1e-12)).add_(2 * is_g + 4 * is_b).add_(6 * f.view(-1, 1, 1))
    h = h.sub_(torch.floor(h * (1 / 6)).mul_(6)).unsqueeze(1)  # modulo 6
    offset, sign, base = _HUE_RAMPS.to(device=x.device, dtype=x.dtype)
    rgb = (h - offset).abs_().mul_(sign).add_(base).clamp_(0, 1)
    return rgb.mul_(chroma.unsqueeze(1)).add_(lo.unsqueeze(1))


#: ColorJitter's four operations, in torchvision's indexing (brightness, contrast, saturation, hue)
COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class DomainBedBatch(BatchAugment):
    """DomainBed's training augmentation (module docstring). Per-sample parameters after the crop:
    brightness / contrast / saturation / hue factors, their order (a permutation of 0..3), grayscale."""

    upscale = False

    def __init__(self, size: int, source_side: int | None = None, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3),
                 jitter: float = 0.3, grayscale: float = 0.1):
        super().__init__(size, source_side)
        self.scale, self.ratio, self.jitter, self.grayscale = tuple(scale), tuple(ratio), jitter, grayscale

    def draw(self, seed: int, original_hw: tuple[int, int]) -> dict[str, Any]:
        """The parameters of one sample: crop box (x0, y0, x1, y1 as fractions of the image), flip, colour
        factors, colour order, grayscale."""
        rng = random.Random(seed)
        height, width = original_hw
        top, left, h, w = resized_crop_params(rng, height, width, self.scale, self.ratio)
        flip = rng.random() < 0.5
        j = self.jitter
        factors = [rng.uniform(max(0.0, 1 - j), 1 + j) for _ in range(3)] + [rng.uniform(-j, j)]
        order = list(range(4))
        rng.shuffle(order)
        return {"box": (left / width, top / height, (left + w) / width, (top + h) / height), "flip": flip,
                "factors": factors, "order": order, "gray": rng.random() < self.grayscale}

    def prepare(self, image: np.ndarray, original_hw: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
        p = self.draw(seed, original_hw)
        side_h, side_w = stored_extent(original_hw, image.shape[0], self.upscale)
        x0, y0, x1, y1 = p["box"]
        # only the file's own extent: PIL's filter reads past the box, never into the zero padding
        out = Image.fromarray(image[:side_h, :side_w]).resize((self.size, self.size), Image.BILINEAR,
                                            box=(x0 * side_w, y0 * side_h, x1 * side_w, y1 * side_h))
        if p["flip"]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        params = np.array([*p["factors"], *p["order"], p["gray"]], dtype=np.float32)
        return {"image": torch.from_numpy(np.array(out)), "params": torch.from_numpy(params)}

    def plan(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``order[p][k]``: the samples whose ``p``-th colour operation is operation ``k``; ``gray``: the
        samples turned to grayscale."""
        params = batch["params"]
        order = params[:, 4:8].round().long()
        return {"order": [[torch.nonzero(order[:, p] == k).flatten() for k in range(4)] for p in range(4)],
                "gray": torch.nonzero(params[:, 8] > 0.5).flatten()}

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        x = hwc_to_float(batch["image"])
        params = batch["params"].to(x.device)
        plan = batch.get("plan")
        if plan is None:
            plan = _to(self.plan({"params": params.cpu()}), x.device)
        factors = params[:, 0:4]
        for row in plan["order"]:  # position p of each sample's random order
            for k, (op, idx) in enumerate(zip(COLOR_OPS, row, strict=True)):
                if idx.numel():
                    x.index_copy_(0, idx, op(x.index_select(0, idx), factors[idx, k]))
        gray = plan["gray"]
        if gray.numel():
            x.index_copy_(0, gray, rgb_to_gray(x.index_select(0, gray)).expand(-1, 3, -1, -1))
        return x


class FlipBatch(BatchAugment):
    """The stored (resized) image, mirrored with probability 0.5 (in the loader)."""

    def prepare(self, image: np.ndarray, original_hw: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
        if random.Random(seed).random() < 0.5:
            image = image[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(image))}


class BatchViews(BatchAugment):
    """Several batched augmentations of the same stored image: ``x`` becomes a list of views (e.g. a
    method's clean view and two style views). View ``v`` of a sample draws from ``stable_seed(seed, v)``."""

    def __init__(self, augments: Sequence[BatchAugment]):
        sides = {(a.source_side, a.upscale) for a in augments}
        if len(sides) != 1:
            raise ConfigError(f"the views read stored images of different sides or storage {sorted(sides)} "
                              "((side, upscale)): give every view the same source")
        super().__init__(augments[0].size, augments[0].source_side)
        self.upscale = augments[0].upscale
        self.augments = list(augments)

    def prepare(self, image: np.ndarray, original_hw: tuple[int, int], seed: int) -> dict[str, Any]:
        return {"views": [a.prepare(image, original_hw, stable_seed(seed, v)) for v, a in enumerate(self.augments)]}

    def plan(self, batch: dict[str, Any]) -> dict[str, Any]:
        for a, view in zip(self.augments, batch["views"], strict=True):
            view["plan"] = a.plan(view)
        return {}

    def __call__(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [a(view) for a, view in zip(self.augments, batch["views"], strict=True)]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to(v, device) for v in obj]
    return obj


def build_batch_augment(image_size: int, augment: str, cache_scale: float = 1.15) -> BatchAugment:
    """The batched version of a ``data.augment`` preset."""
    if augment == "domainbed":
        return DomainBedBatch(image_size, stored_side(image_size, augment, cache_scale))
    if augment == "flip":
        return FlipBatch(image_size)
    if augment == "none":
        return BatchAugment(image_size)
    raise ConfigError(f"unknown augment {augment!r}: choose one of domainbed, flip, none")


class AugmentCollate:
    """Collate function of a batched-augmentation loader: stacks the samples and adds the batch's
    :meth:`BatchAugment.plan` (computed in the loader's worker)."""

    def __init__(self, augment: BatchAugment):
        self.augment = augment

    def __call__(self, samples):
        batch = default_collate(samples)
        if isinstance(batch[0], dict):
            batch[0]["plan"] = self.augment.plan(batch[0])
        return batch
