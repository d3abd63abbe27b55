"""ISSA stage 3: intra-source style mixing in segmentation training, for any segmentation method.

``G(w_B, noise_A)``: the inverted noise of image A carries its layout (so A's label still holds),
the w+ of B its appearance. :class:`ISSAStyleMixing` is a callback that makes the data module's
training set yield, with probability ``prob`` per sample, the mix of the *whole* source image A
with the style of another source training image B (intra-source) or of an exemplar from any image
folder (extra-source), *before* the segmentation crop and augmentation, so ERM, GCISG or any other
method trains on it unchanged and A's label is untouched:

    trainer:
      callbacks:
        - class_path: dg_lightning.methods.issa.ISSAStyleMixing
          init_args: {encoder_ckpt: runs/issa/encoder/checkpoints/last.ckpt, prob: 0.5}

Geometry (official ISSA re-styles whole source images at the generator's resolution): the whole
image A is resized to the generator's size (for the Cityscapes-aspect generator that is the
scene's own 2:1 aspect, also for the square pix2pix copies of Cityscapes, which were squeezed
from 2:1), inverted and re-synthesised with B's w+, and the mix is resized back to A's own size
(:func:`style_mix`); then the usual random scale, crop, flip and photometric augmentation apply to
image and label together, drawn from the same per-sample seed as without mixing. The mix runs on
the CPU inside the data loader (workers included); whether to mix and which B are drawn from the
sample's seed, so a resumed run sees the same mixes. B is drawn from the whole training split, not
only from the same batch (the same distribution, without tying the data loader to batches).

Stylised proxy validation (``proxy_validation: true``): the source validation images (whole
images) are re-styled (fixed styles: another image of the same batch, or an exemplar, drawn from a
seed per batch) and scored as ``val/<source>_stylised/miou``. Add a second ``BestCheckpoint``
monitoring that key to get it as a model selection of its own in ``results.json``:

        - class_path: dg_lightning.core.callbacks.BestCheckpoint
          init_args: {monitor: val/cityscapes_stylised/miou, selection: stylised proxy validation,
                      prefix: best-stylised}
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dg_lightning.core.data import stable_seed
from dg_lightning.data.segmentation.base import expand_root
from dg_lightning.methods.issa.inversion import load_inverter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def invert(G, E, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(w+, noise list) of whole images ``x`` in [0, 1] (any size: resized to the generator's)."""
    out = E(_resize(x, G.size) * 2 - 1)
    return out["w_plus"], E.generator_noise(out)


@torch.no_grad()
def synthesize(G, w_plus: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """``G(w+, noise)`` in [0, 1] at the generator's size (layers without noise: the fixed maps)."""
    return ((G.synthesis(w_plus, noise, noise_mode="const") + 1) / 2).clamp(0, 1)


@torch.no_grad()
def style_mix(G, E, content: torch.Tensor, w_style: torch.Tensor) -> torch.Tensor:
    """``G(w_style, noise(content))`` in [0, 1], resized back to the content images' own size."""
    _, noise = invert(G, E, content)
    return _resize(synthesize(G, w_style, noise), content.shape[-2:]).clamp(0, 1)


def load_folder_images(folder: str | Path, max_images: int | None = None) -> torch.Tensor:
    """Every image of ``folder`` (recursively, sorted) as [0, 1] tensors at a common size."""
    from PIL import Image

    paths = sorted(p for p in expand_root(str(folder)).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder} for ISSA exemplars")
    if max_images and len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    first = Image.open(paths[0]).convert("RGB").size
    imgs = [np.asarray(Image.open(p).convert("RGB").resize(first)) for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().unsqueeze(0) / 255


class StyleMixer:
    """Mixes whole uint8 images (H, W, 3): ``mix(image, rng)`` -> ``G(w_B, noise_image)`` at (H, W),
    B an exemplar of ``style_bank`` or, without one, ``source[style_indices[k]]`` inverted on the fly."""

    def __init__(self, G, E, prob: float, source=None, style_indices=None, style_bank: torch.Tensor | None = None):
        self.G, self.E, self.prob = G, E, prob
        self.source, self.style_indices, self.style_bank = source, style_indices, style_bank

    def style_for(self, rng: torch.Generator) -> torch.Tensor:
        if self.style_bank is not None:
            return self.style_bank[int(torch.randint(len(self.style_bank), (), generator=rng))][None]
        b = self.style_indices[int(torch.randint(len(self.style_indices), (), generator=rng))]
        return invert(self.G, self.E, _to_tensor(self.source[b][0]))[0]

    def __call__(self, image: np.ndarray, rng: torch.Generator) -> tuple[np.ndarray, bool]:
        if self.prob == 0 or float(torch.rand((), generator=rng)) >= self.prob:
            return image, False
        mixed = style_mix(self.G, self.E, _to_tensor(image), self.style_for(rng))[0]
        return (mixed.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), True


class _MixedSource:
    """Stands in for a ``PairedDataset``'s dataset: the image of sample ``i`` mixed (or not) by the
    mixer with the random generator set for the current sample, the label as it is."""

    def __init__(self, source, mixer: StyleMixer):
        self.source, self.mixer, self.rng = source, mixer, None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        image, label = self.source[i]
        image, _ = self.mixer(image, self.rng if self.rng is not None else torch.Generator().manual_seed(
            int(torch.randint(2**31 - 1, ()))))
        return image, label


class StyleMixedDataset(Dataset):
    """A segmentation ``PairedDataset`` whose images are style-mixed before its augmentation.
    ``dataset[(i, seed)]``: the mix is drawn from ``seed`` (its own stream: the augmentation, drawn
    from the same seed, is the one the unmixed sample gets)."""

    def __init__(self, paired, mixer: StyleMixer):
        self.paired = copy.copy(paired)
        self.source = _MixedSource(paired.data, mixer)
        self.paired.data = self.source

    def __len__(self) -> int:
        return len(self.paired)

    def __getitem__(self, key):
        seed = key[1] if isinstance(key, tuple) else None
        self.source.rng = None if seed is None else torch.Generator().manual_seed(stable_seed("issa-mix", seed))
        return self.paired[key]


class ISSAStyleMixing(L.Callback):
    """Style-mix training images on the fly, before the crop (see module docstring).

    Args:
        encoder_ckpt: an ISSA stage-2 checkpoint (generator + encoder EMA).
        prob: probability that a training sample is replaced by a mix.
        exemplars: a folder of style images (extra-source; ``~``, ``$VAR``, ``${VAR:-default}`` expanded);
            ``None``: styles of the source's training images.
        max_exemplars: exemplars kept (evenly spaced over the sorted folder).
        proxy_validation: also score a re-styled copy of the source validation set (see module docstring).
    """

    def __init__(self, encoder_ckpt: str, prob: float = 0.5, exemplars: str | None = None, max_exemplars: int = 256,
                 proxy_validation: bool = False):
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.encoder_ckpt, self.prob, self.exemplars, self.max_exemplars = encoder_ckpt, prob, exemplars, max_exemplars
        self.proxy_validation = proxy_validation
        self.G = self.E = None
        self.style_bank: torch.Tensor | None = None
        self.proxy_metric = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.G is not None:
            return
        self.G, self.E = load_inverter(self.encoder_ckpt)
        if self.exemplars:
            imgs = load_folder_images(self.exemplars, self.max_exemplars)
            self.style_bank = torch.cat([invert(self.G, self.E, chunk)[0] for chunk in imgs.split(16)])
        if trainer is None:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_dataset"):
            raise TypeError("ISSAStyleMixing mixes the source images before the crop: it needs a segmentation data "
                            "module with `train_dataset()` (dg_lightning.data.SegmentationDG)")
        build = dm.train_dataset

        def mixed_train_dataset():
            paired = build()
            return StyleMixedDataset(paired, StyleMixer(self.G, self.E, self.prob, paired.data, paired.indices,
                                                        self.style_bank))

        dm.train_dataset = mixed_train_dataset  # the train loader is built after setup, from this
        if self.proxy_validation:
            from dg_lightning.core.metrics import SegmentationIoU

            source = pl_module.val_domains[0] if pl_module.val_domains else dm.val_domains[0]
            self.proxy_name = f"{source}_stylised"
            self.proxy_metric = SegmentationIoU(pl_module.hparams.num_classes, pl_module.hparams.ignore_index,
                                                dm.eval_classes(source, "val") if hasattr(dm, "eval_classes") else None)

    def styles_for(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A style w+ for each image of ``x``: an exemplar's, or another image's of the batch."""
        if self.style_bank is not None:
            pick = torch.randint(len(self.style_bank), (len(x),), generator=generator)
            return self.style_bank[pick].to(x.device)
        w_all, _ = invert(self.G, self.E, x)
        return w_all[torch.randperm(len(x), generator=generator).to(x.device)]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if self.proxy_metric is None or dataloader_idx != 0 or trainer.sanity_checking:
            return
        x, y = batch[0], batch[1]
        self.G.to(x.device), self.E.to(x.device), self.proxy_metric.to(x.device)
        g = torch.Generator().manual_seed(batch_idx)  # the same re-styled set at every validation
        stylised = style_mix(self.G, self.E, x, self.styles_for(x, g))
        self.proxy_metric.update(pl_module.predict_full(stylised, tuple(y.shape[-2:])).argmax(1), y)
        self.G.to("cpu"), self.E.to("cpu")  # the data loader mixes on the CPU

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.proxy_metric is None or trainer.sanity_checking:
            return
        value = self.proxy_metric.compute()
        self.proxy_metric.reset()
        pl_module.log(f"val/{self.proxy_name}/miou", value, sync_dist=True)
