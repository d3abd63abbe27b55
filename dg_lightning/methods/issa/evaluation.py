"""Measurements of ISSA's mechanism: does ``G(w_B, noise_A)`` keep A's layout and take B's style?

Written against two callables, so that any inverter can be scored, this code's or an earlier
version's (the module imports nothing else of ``dg_lightning.methods.issa``):

* ``invert(x) -> (w+, noise list)`` for whole images ``x`` in [0, 1] (any size);
* ``synthesize(w+, noise) -> images`` in [0, 1] at the generator's size.

:func:`evaluate_inverter` on N scenes A_1..A_N with labels, each paired with a style image
B_i = A_{pi(i)} (``pi``: a seeded random permutation shifted by one, so B_i != A_i):

* **reconstruction**: PSNR (dB, images in [-1, 1]) and LPIPS of ``G(E(A))`` against A at the
  generator's size (LPIPS from the caller's network; say which trunk next to the number);
* **layout kept**: a segmenter trained on real images, applied to the mix ``G(w_B, noise_A)``
  resized to A's size, scored against A's label (mIoU over the scenes), divided by its mIoU on A
  itself (``layout_kept``); the same for the reconstruction ``G(w_A, noise_A)``
  (``recon_layout_kept``), which separates what the mix loses from what the inversion loses;
* **style moved**: colour statistics s(x) = (mean, std) of each RGB channel over the pixels of an
  image (6 numbers). With d_i = s(B_i) - s(A_i) and m_i = s(mix_i) - s(A_i),
  ``style_moved = sum_i <m_i, d_i> / sum_i ||d_i||^2``: the least-squares coefficient t of
  ``m_i ~ t d_i``; 0 = the mix keeps A's statistics, 1 = it takes B's (it can fall outside [0, 1]).
  ``style_moved_recon`` is the same with the reconstructions G(w_A, noise_A) and G(w_B, noise_B)
  standing for A and B (the movement the generator can show at all);
* **grid**: ``n_grid`` content scenes x ``n_grid`` style scenes; ``style_effect`` = per-pixel
  standard deviation across the styles (same content), ``content_effect`` across the contents
  (same style), both averaged over pixels and rows/columns, and their ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def colour_stats(x: torch.Tensor) -> torch.Tensor:
    """(N, 6): per image, the mean and the standard deviation of each channel over its pixels."""
    flat = x.flatten(2)
    return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], dim=1)


def style_moved(mix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum <s(mix) - s(a), s(b) - s(a)> / sum ||s(b) - s(a)||^2`` over the images (module docstring)."""
    sa, sb, sm = colour_stats(a).double(), colour_stats(b).double(), colour_stats(mix).double()
    d = sb - sa
    return float(((sm - sa) * d).sum() / d.pow(2).sum().clamp_min(1e-12))


def grid_effects(mixes: torch.Tensor) -> dict[str, float]:
    """``mixes`` (contents, styles, 3, h, w): per-pixel std across styles and across contents."""
    style, content = float(mixes.std(dim=1).mean()), float(mixes.std(dim=0).mean())
    return {"style_effect": style, "content_effect": content, "style_content_ratio": style / max(content, 1e-12)}


def miou(preds: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], num_classes: int = 19,
         ignore_index: int = 255, classes: Sequence[int] | None = None) -> float:
    """mIoU over all (prediction, label) pairs (one confusion matrix; the project's ``SegmentationIoU``)."""
    from dg_lightning.core.metrics import SegmentationIoU

    metric = SegmentationIoU(num_classes, ignore_index, classes)
    for p, y in zip(preds, labels, strict=True):
        metric.update(p, y)
    return float(metric.compute())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def load_scenes(paths: Sequence[Path | str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images as (N, 3, H, W) uint8 (``size``: (H, W) to resize to, bicubic; default their own)."""
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        if size is not None:
            img = img.resize(size[::-1], Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def style_pairs(n: int, seed: int = 0) -> torch.Tensor:
    """B's index for each A: a seeded permutation shifted by one (never B = A for n > 1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[perm] = perm.roll(-1)
    return partner


@torch.no_grad()
def evaluate_inverter(invert: Callable, synthesize: Callable, gen_size: tuple[int, int], images: torch.Tensor,
                      labels: torch.Tensor | None = None, segment: Callable | None = None, lpips=None,
                      n_grid: int = 4, seed: int = 0, batch: int = 16, grid_path: Path | str | None = None,
                      num_classes: int = 19) -> dict:
    """Every measurement of the module docstring.

    Args:
        invert, synthesize: the inverter (module docstring); gen_size: the generator's (H, W).
        images: (N, 3, H, W) uint8 scenes at their own size; labels: (N, H', W') long train ids.
        segment: ``segment(x [0, 1] (n, 3, H, W), label_size) -> (n, H', W')`` class indices; with
            ``labels``, enables the layout measurements.
        lpips: an ``lpips.LPIPS`` module (inputs in [-1, 1]) or ``None``.
        grid_path: where to write the grid PNG (top row: styles; left column: contents).
        num_classes: classes of the segmenter's mIoU (19 Cityscapes train ids, 255 ignored).
    """
    n = len(images)
    partner = style_pairs(n, seed)
    w_all, noise_all, recon = [], [], []
    for chunk in images.split(batch):
        w, noise = invert(chunk.float() / 255)
        w_all.append(w)
        noise_all.append(noise)
        recon.append(synthesize(w, noise))
    w_all, recon = torch.cat(w_all), torch.cat(recon)
    noise_cat = [torch.cat(layer) for layer in zip(*noise_all, strict=True)]
    a_gen = torch.cat([_resize(c.float() / 255, gen_size) for c in images.split(batch)])
    mixes = torch.cat([synthesize(w_all[partner[i:i + batch]], [m[i:i + batch] for m in noise_cat])
                       for i in range(0, n, batch)])
    result = {"images": n, "psnr_db": float(psnr(recon * 2 - 1, a_gen * 2 - 1).mean())}
    if lpips is not None:
        result["lpips"] = float(torch.cat([lpips(r * 2 - 1, a * 2 - 1).flatten()
                                           for r, a in zip(recon.split(batch), a_gen.split(batch))]).mean())
    result["style_moved"] = style_moved(mixes, a_gen, a_gen[partner])
    result["style_moved_recon"] = style_moved(mixes, recon, recon[partner])
    if segment is not None and labels is not None:
        size = tuple(images.shape[-2:])
        preds = {"real": [], "recon": [], "mix": []}
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            label_size = tuple(labels.shape[-2:])
            preds["real"].append(segment(images[sl].float() / 255, label_size))
            preds["recon"].append(segment(_resize(recon[sl], size).clamp(0, 1), label_size))
            preds["mix"].append(segment(_resize(mixes[sl], size).clamp(0, 1), label_size))
        ys = list(labels.split(batch))
        scores = {k: miou(v, ys, num_classes) for k, v in preds.items()}
        result.update({f"miou_{k}": v for k, v in scores.items()})
        result["layout_kept"] = scores["mix"] / max(scores["real"], 1e-12)
        result["recon_layout_kept"] = scores["recon"] / max(scores["real"], 1e-12)
    if n >= 2 * n_grid:
        content_idx, style_idx = list(range(n_grid)), list(range(n_grid, 2 * n_grid))
        noise_c = [m[:n_grid] for m in noise_cat]
        grid = torch.stack([synthesize(w_all[style_idx], [m[k:k + 1].expand(n_grid, *m.shape[1:]) for m in noise_c])
                            for k in content_idx])  # (content, style, 3, h, w)
        result.update(grid_effects(grid))
        if grid_path is not None:
            save_grid(grid, a_gen[content_idx], a_gen[style_idx], grid_path)
            result["grid"] = str(grid_path)
    return result


def save_grid(grid: torch.Tensor, contents: torch.Tensor, styles: torch.Tensor, path: Path | str) -> None:
    """PNG: top row the style images, left column the content images, cell (i, j) = grid[i, j]."""
    from PIL import Image

    h, w = grid.shape[-2:]
    rows = [torch.cat([torch.ones(3, h, w), *styles], dim=2)]
    rows += [torch.cat([c, *cells], dim=2) for c, cells in zip(contents, grid, strict=True)]
    img = (torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(path)


def segmenter_from_checkpoint(path: Path | str, method: str = "dg_lightning.methods.ERM") -> Callable:
    """``segment(x, label_size)`` of a segmentation checkpoint written by ``dg-lightning fit`` with the
    ``DGMethod`` class ``method`` (e.g. ``make bench-seg``'s ERM): whole-image inference at the label's
    resolution."""
    import importlib

    module, name = method.rsplit(".", 1)
    model = getattr(importlib.import_module(module), name).load_from_checkpoint(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def segment(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return model.predict_full(x, size).argmax(1)

    return segment


def cityscapes_val(root: Path | str, image_suffix: str = "_leftImg8bit.jpg", max_images: int | None = None):
    """(images (N, 3, H, W) uint8, labels (N, H, W) long train ids) of a Cityscapes val split."""
    from dg_lightning.data import Cityscapes

    data = Cityscapes(str(root), split="val", image_suffix=image_suffix, max_samples=max_images)
    pairs = [data[i] for i in range(len(data))]
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im, _ in pairs])
    labels = torch.stack([torch.from_numpy(np.ascontiguousarray(y)).long() for _, y in pairs])
    return images, labels
