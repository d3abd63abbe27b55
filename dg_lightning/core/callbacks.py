"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from dg_lightning.core.data import stable_seed
from dg_lightning.core.errors import find_user_error, user_message


class StepSeed(L.Callback):
    """Reseed Python, NumPy and torch before every training batch from (seed, epoch, batch, rank).

    Model-side random draws (dropout, views made inside ``training_step``) then depend only on the
    step's position, so a run resumed from an epoch-end checkpoint repeats the uninterrupted run
    exactly (same hardware). Data augmentation is seeded per sample by the sampler already.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed = stable_seed(os.environ.get("PL_GLOBAL_SEED", 0), trainer.current_epoch, batch_idx, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class ChannelsLast(L.Callback):
    """The model in channels-last memory format (NHWC): convolutions then run on the GPU's tensor cores
    without layout transposes, which matters with ``bf16-mixed``; on a CPU oneDNN runs them, depthwise
    ones above all, without transposes too (``make bench-speed``: tf_efficientnet_lite0's step ~2x). The
    images need no conversion: a convolution with channels-last weights returns channels-last
    activations. The same function as NCHW (float64: ``tests/test_method.py``). In YAML::

        trainer:
          callbacks: [{class_path: dg_lightning.core.callbacks.ChannelsLast}]
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to ``<default_root_dir>/config.yaml`` (``config-<stage>.yaml`` for
    validate/test, so they never overwrite the training config) and to W&B's run config."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        stage = getattr(stage, "value", stage)  # TrainerFn enum or str
        name = self.config_filename if stage == "fit" else f"{Path(self.config_filename).stem}-{stage}.yaml"
        path = Path(trainer.default_root_dir) / name
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            for logger in trainer.loggers:
                if isinstance(logger, L.pytorch.loggers.WandbLogger):
                    logger.log_hyperparams(self.config.as_dict())
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class BestCheckpoint(ModelCheckpoint):
    """The checkpoint that training-domain validation selects: best ``monitor`` so far.

    It also keeps the validation metrics logged when that checkpoint was written
    (``best_val_metrics``: per source domain, in-domain), so that the selection report needs no
    second validation pass over the same checkpoint. They survive a resume (callback state).
    """

    def __init__(self, dirpath=None, monitor: str = "val/acc", mode: str = "max",
                 selection: str = "training-domain validation", prefix: str = "best"):
        super().__init__(dirpath=dirpath, filename=prefix + "-epoch{epoch:03d}", auto_insert_metric_name=False,
                         monitor=monitor, mode=mode, save_top_k=1, save_last=False)
        #: the name of this model selection in results.json (a second BestCheckpoint on another
        #: monitor, e.g. ISSA's stylised proxy validation, adds a selection)
        self.selection = selection
        self.best_val_metrics: dict[str, float] = {}
        #: the global step the best checkpoint was written at (validation may run mid-epoch)
        self.best_step: int | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.best_val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.best_step = trainer.global_step
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_val_metrics": dict(self.best_val_metrics), "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_val_metrics = dict(state_dict.get("best_val_metrics", {}))
        self.best_step = state_dict.get("best_step")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, rewritten after every validation: what ``--ckpt_path last`` resumes from, and
    the oracle selection's checkpoint. (Lightning's own ``save_last`` only writes when a top-k
    checkpoint was written in the same step, i.e. not after an epoch that did not improve.)"""

    def __init__(self, dirpath):
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, enable_version_counter=False)
        #: the global step of the last write
        self.saved_step: int | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.saved_step = trainer.global_step
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.saved_step = state_dict.get("saved_step")


class ExtraSelection(L.Callback):
    """A callback that yields a model of its own to report beside the checkpoint selections (SWAD's
    averaged weights): after fit, :func:`~dg_lightning.core.selection.evaluate_selections` tests
    ``checkpoint_path`` on the held-out domains and validates it on the source domains, exactly as the
    other selections, and records it in ``results.json`` under ``selection`` with :meth:`info`."""

    selection: str = "extra"
    #: the weights to evaluate (a checkpoint file), ``None`` when there is nothing to report
    checkpoint_path: str | None = None

    def info(self) -> dict:
        """What ``results.json`` records about this selection besides its test and in-domain numbers."""
        return {}


class SegmentationOverlays(L.Callback):
    """Predictions on the first ``num_images`` test images of every target, as overlays.

    For each test call (one per model selection) it writes
    ``<run>/overlays/<checkpoint>/<target>/<k>.png``: the image, the ground truth and the prediction
    over it in Cityscapes colours (ignore left uncoloured), side by side; and, with W&B, the images
    with their ``ground_truth`` and ``prediction`` masks (toggle per class in the W&B UI).
    Classification runs are left alone.
    """

    def __init__(self, num_images: int = 4, alpha: float = 0.6):
        self.num_images, self.alpha = num_images, alpha
        self._kept: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._kept = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not getattr(pl_module, "segmentation", False) or outputs is None:
            return
        kept = self._kept.setdefault(pl_module.test_domains[dataloader_idx], [])
        x, y = batch[0], batch[1]
        for i in range(min(len(x), self.num_images - len(kept))):
            image = x[i:i + 1]
            if image.shape[-2:] != y.shape[-2:]:  # images scaled for inference: show them at label size
                image = torch.nn.functional.interpolate(image, size=tuple(y.shape[-2:]), mode="bilinear")
            rgb = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
            kept.append((rgb, y[i].cpu().numpy().astype(np.uint8), outputs[i].cpu().numpy().astype(np.uint8)))

    def blend(self, rgb: np.ndarray, label: np.ndarray) -> np.ndarray:
        from dg_lightning.data.segmentation.labels import colorize

        out = rgb.astype(np.float32)
        valid = label != 255
        out[valid] = (1 - self.alpha) * out[valid] + self.alpha * colorize(label)[valid]
        return out.round().astype(np.uint8)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._kept or not trainer.is_global_zero:
            return
        from PIL import Image

        tag = Path(trainer.ckpt_path).stem if trainer.ckpt_path else "model"
        names = getattr(trainer.datamodule, "classes", None) or [str(c) for c in range(pl_module.hparams.num_classes)]
        class_labels = {**dict(enumerate(names)), 255: "ignore"}
        for target, items in self._kept.items():
            folder = Path(trainer.default_root_dir) / "overlays" / tag / target
            folder.mkdir(parents=True, exist_ok=True)
            for k, (rgb, gt, pred) in enumerate(items):
                panel = np.concatenate([rgb, self.blend(rgb, gt), self.blend(rgb, pred)], axis=1)
                Image.fromarray(panel).save(folder / f"{k}.png")
            for logger in trainer.loggers:
                if isinstance(logger, L.pytorch.loggers.WandbLogger):
                    logger.log_image(
                        key=f"overlays/{tag}/{target}", images=[rgb for rgb, _, _ in items],
                        masks=[{"prediction": {"mask_data": p, "class_labels": class_labels},
                                "ground_truth": {"mask_data": g, "class_labels": class_labels}} for _, g, p in items])
        self._kept = {}


class FailureRecord(L.Callback):
    """``<run dir>/failed.json`` when a run stops on a user error (a loss that became NaN, an image
    that cannot be decoded): the error, its message, the step. ``lodo`` reads it to report the run
    as failed. A run that starts again removes an earlier one."""

    FILE = "failed.json"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            (Path(trainer.default_root_dir) / self.FILE).unlink(missing_ok=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        err = find_user_error(exception)
        if err is None or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"error": type(err).__name__, "message": user_message(err),
                                    "exit_code": err.exit_code, "step": trainer.global_step,
                                    "epoch": trainer.current_epoch}, indent=2))
