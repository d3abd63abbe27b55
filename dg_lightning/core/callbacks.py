"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import SaveConfigCallback

from dg_lightning.core.data import stable_seed


class EpochSeed(L.Callback):
    """Reseed Python, NumPy and torch at the start of every training epoch from (seed, epoch, rank).

    Augmentation and dropout draws of an epoch then depend only on its number, so a run resumed
    from an epoch-end checkpoint repeats the uninterrupted run exactly (on the same hardware).
    Runs before the epoch's data loader iterator (and its workers' seeds) is created.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = stable_seed(os.environ.get("PL_GLOBAL_SEED", 0), trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config to ``<default_root_dir>/config.yaml`` (and to W&B's run config)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            for logger in trainer.loggers:
                if isinstance(logger, L.pytorch.loggers.WandbLogger):
                    logger.log_hyperparams(self.config.as_dict())
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
