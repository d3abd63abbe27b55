"""Model selection: the best checkpoint keeps the validation metrics it was selected by."""

import lightning as L
import pytest
import torch

from dg_lightning.core.callbacks import BestCheckpoint
from dg_lightning.data import SyntheticShapes
from dg_lightning.methods import ERM


def test_best_checkpoint_keeps_the_in_domain_metrics_it_was_written_with(tmp_path):
    L.seed_everything(0)
    dm = SyntheticShapes(per_class=6, test_domains=["sketch"], batch_size=4, steps_per_epoch=2, split_seed=0)
    model = ERM(num_classes=dm.num_classes, backbone="resnet10t",
                optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    best = BestCheckpoint(tmp_path / "ckpt", monitor="val/acc")
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, callbacks=[best],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    kept = dict(best.best_val_metrics)
    assert kept["val/acc"] == pytest.approx(float(best.best_model_score))
    # the same numbers as a fresh validation pass over the selected checkpoint
    trainer.validate(model, datamodule=dm, ckpt_path=best.best_model_path, verbose=False)
    fresh = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    per_domain = [f"val/{d}/acc" for d in dm.val_domains]
    assert set(per_domain) <= set(kept)
    for k in [*per_domain, "val/acc"]:
        assert kept[k] == pytest.approx(fresh[k], abs=1e-6), k
    # and they travel with the callback state (a resumed run still knows them)
    other = BestCheckpoint(tmp_path / "ckpt2", monitor="val/acc")
    other.load_state_dict(torch.load(best.best_model_path, weights_only=False)["callbacks"][best.state_key])
    assert other.best_val_metrics == kept


class FallingAccuracy(ERM):
    """Validation accuracy that falls with every validation: the first one is the best."""

    def on_validation_epoch_end(self):
        for metric in [*self.val_metrics, *self.val_losses]:
            metric.reset()
        self.log("val/acc", 1.0 / (1 + self.global_step))


def test_best_and_last_checkpoints_of_the_same_epoch_are_told_apart(tmp_path):
    """With validation every 2 steps, the best (step 2) and the last (step 4) checkpoints are both from
    epoch 0: they are different weights, so the oracle row must test the last checkpoint itself."""
    from dg_lightning.core.callbacks import LastCheckpoint
    from dg_lightning.core.selection import evaluate_selections

    L.seed_everything(0)
    dm = SyntheticShapes(per_class=6, test_domains=["sketch"], batch_size=2, steps_per_epoch=4, split_seed=0)
    model = FallingAccuracy(num_classes=dm.num_classes, backbone="resnet10t",
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    best, last = BestCheckpoint(tmp_path / "ckpt", monitor="val/acc"), LastCheckpoint(tmp_path / "ckpt")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, val_check_interval=2, logger=False, callbacks=[best, last],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert (best.best_step, last.saved_step) == (2, 4)
    record = evaluate_selections(trainer, model, dm, None)
    oracle = record["selections"]["oracle"]
    assert oracle["same_checkpoint_as_best"] is False and oracle["checkpoint"].endswith("last.ckpt")
