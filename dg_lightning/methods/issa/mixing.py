"""ISSA stage 3: intra-source style mixing in segmentation training, for any segmentation method.

``G(w_B, noise_A)``: the inverted noise of image A carries its layout (so A's label still holds),
the w+ of B its appearance. :class:`ISSAStyleMixing` is a callback: at every training step each
image of the batch is replaced, with probability ``prob``, by its mix with the style of another
image of the same batch (intra-source) or of an exemplar from any image folder (extra-source), so
ERM, GCISG or any other method trains on the mixed batch unchanged:

    trainer:
      callbacks:
        - class_path: dg_lightning.methods.issa.ISSAStyleMixing
          init_args: {encoder_ckpt: runs/issa-encoder/checkpoints/last.ckpt, prob: 0.5}

Images are resized to the generator's size for the inversion and the mix, and back to the training
crop afterwards (a tiny generator gives blurrier mixed images than the crops it replaces).

Stylised proxy validation (``proxy_validation: true``): the source validation images are re-styled
(fixed styles: another image of the same batch, or an exemplar, drawn from a seed per batch) and
scored as ``val/<source>_stylised/miou``. Add a second ``BestCheckpoint`` monitoring that key to get
it as a model selection of its own in ``results.json``, next to the usual two:

        - class_path: dg_lightning.core.callbacks.BestCheckpoint
          init_args: {monitor: val/cityscapes_stylised/miou, selection: stylised proxy validation,
                      prefix: best-stylised}
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from dg_lightning.methods.issa.inversion import load_inverter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def invert(G, E, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(w+, noise list) of images ``x`` in [0, 1] (any size): the encoder's mean prediction."""
    out = E(_resize(x, G.size) * 2 - 1)
    return out["w_plus"], E.generator_noise(out, sample=False)


@torch.no_grad()
def style_mix(G, E, content: torch.Tensor, w_style: torch.Tensor) -> torch.Tensor:
    """``G(w_style, noise(content))`` in [0, 1] at the content images' size."""
    _, noise = invert(G, E, content)
    return _resize((G.synthesis(w_style, noise) + 1) / 2, content.shape[-2:]).clamp(0, 1)


def load_folder_images(folder: str | Path, max_images: int | None = None) -> torch.Tensor:
    """Every image of ``folder`` (recursively, sorted) as [0, 1] tensors at a common size."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder} for ISSA exemplars")
    if max_images and len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    first = Image.open(paths[0]).convert("RGB").size
    imgs = [np.asarray(Image.open(p).convert("RGB").resize(first)) for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


class ISSAStyleMixing(L.Callback):
    """Style-mix training images on the fly (see module docstring).

    Args:
        encoder_ckpt: an ISSA stage-2 checkpoint (generator + encoder).
        prob: probability that an image of the batch is replaced by a mix.
        exemplars: a folder of style images (extra-source); ``None``: styles of the same batch.
        max_exemplars: exemplars kept (evenly spaced over the sorted folder).
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
        if self.proxy_validation:
            from dg_lightning.core.metrics import SegmentationIoU

            dm = trainer.datamodule
            source = pl_module.val_domains[0] if pl_module.val_domains else dm.val_domains[0]
            self.proxy_name = f"{source}_stylised"
            self.proxy_metric = SegmentationIoU(pl_module.hparams.num_classes, pl_module.hparams.ignore_index,
                                                dm.eval_classes(source, "val") if hasattr(dm, "eval_classes") else None)
        if self.exemplars:
            imgs = load_folder_images(self.exemplars, self.max_exemplars)
            self.style_bank = torch.cat([invert(self.G, self.E, chunk)[0] for chunk in imgs.split(16)])

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

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.proxy_metric is None or trainer.sanity_checking:
            return
        value = self.proxy_metric.compute()
        self.proxy_metric.reset()
        pl_module.log(f"val/{self.proxy_name}/miou", value, sync_dist=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x = batch[0]
        if self.G is None or not torch.is_tensor(x) or self.prob == 0:
            return
        device = x.device
        self.G.to(device), self.E.to(device)
        chosen = torch.rand(len(x), device=device) < self.prob
        if chosen.any():  # intra-source: the style of another image of the batch (or an exemplar's)
            x[chosen] = style_mix(self.G, self.E, x[chosen], self.styles_for(x)[chosen]).to(x.dtype)
        pl_module.log("train/issa_mixed", chosen.float().mean(), on_step=False, on_epoch=True, batch_size=len(x))
