"""SWAD: the official loss-valley rules on synthetic loss curves (start, end, averaging, worked by hand),
the callback's dense averaging inside a fit, BatchNorm recomputation, and the `swad` selection in
results.json through the CLI."""

from __future__ import annotations

import json
import subprocess

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from dg_lightning.methods.swad import SWAD, Average, LossValley, Segment, recompute_batchnorm
from tests.conftest import ROOT, cli_cmd, subprocess_env

# one validation loss per segment: down into a valley (minimum at segment 5), then up again
CURVE = [3.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0]


def segment(i: int, loss: float, length: int = 5) -> Segment:
    """Segment i covers steps 5i..5i+4; its averaged 'weights' are the number i."""
    return Segment({"w": torch.tensor([float(i)])}, length * i, length * i + length - 1, loss)


def run(curve, **kw) -> tuple[LossValley, Average]:
    valley = LossValley(**kw)
    for i, loss in enumerate(curve):
        valley.update(segment(i, loss))
    return valley, valley.final()


def test_loss_valley_start_and_end_by_hand():
    """n_converge 3, n_tolerance 6, ratio 0.3, worked through the official rules:

    * convergence at segment 7, the first time the oldest of the last three (5, 6, 7: 0.9, 0.95, 1.0)
      is their minimum: converge step = segment 5's end (29), threshold 1.3 x 0.95 = 1.235;
    * start: the window up to the converge point holds segments 2..5 (1.5, 1.2, 1.0, 0.9); going back,
      segment 2 is the first above 1.235, so the start is segment 3, and the official code averages
      from the one after it: segments 4 and 5;
    * segments 8, 9 see window fronts 3, 4 (before the converge step): nothing; segments 10..14 each
      add the window's front (5, 6, 7, 8, 9) since the window's minimum stays <= 1.235 (segment 5
      enters a second time, as in the official code);
    * at the end the front (9, already added) is dropped and the rest (10..14: min 1.3) is above.
    Average of {4, 5, 5, 6, 7, 8, 9} = 44 / 7, steps 20 (segment 4's start) to 49 (segment 9's end).
    """
    valley, final = run(CURVE)
    assert valley.converge_step == 29 and valley.threshold == pytest.approx(0.95 * 1.3)
    assert not valley.dead_valley
    assert final.n_averaged == 7 and (final.start_step, final.end_step) == (20, 49)
    assert float(final.weights["w"]) == pytest.approx(44 / 7)


def test_loss_valley_flushes_the_window_at_the_end_of_training():
    """Training ends at segment 11: the last update added segment 6 (window 6..11, min 0.95); at the end
    6 is dropped and 7 (min of 7..11 = 1.0), 8 (1.05), 9 (1.1) are added, 10 is not (min 1.3):
    again {4, 5, 5, 6, 7, 8, 9}."""
    valley, final = run(CURVE[:12])
    assert final.n_averaged == 7 and final.end_step == 49
    assert float(final.weights["w"]) == pytest.approx(44 / 7)


def test_loss_valley_dies_and_ignores_what_follows():
    """Segment 15 (3.5): window 10..15, min 1.3 > 1.235: the valley is dead; a later low loss (16: 0.5)
    is ignored and nothing is added at the end."""
    valley, final = run([*CURVE, 3.5, 0.5])
    assert valley.dead_valley
    assert final.n_averaged == 7 and float(final.weights["w"]) == pytest.approx(44 / 7)


def test_loss_valley_with_a_short_tolerance_window():
    """n_tolerance 2 < n_converge 3 (the other branch): losses 3, 1, 2, 2.5, 2.0. Converged at segment 3
    (window 1, 2, 3: min first), threshold 1.3 x mean(1, 2, 2.5); the start copies segment 1 and adds
    segment 2 (which, as the first update, overwrites it); segment 4 adds the front 3 (min(2.5, 2.0) <= th);
    at the end 4 is added: {2, 3, 4}."""
    valley, final = run([3.0, 1.0, 2.0, 2.5, 2.0], n_converge=3, n_tolerance=2)
    assert valley.threshold == pytest.approx(1.3 * 5.5 / 3)
    assert final.n_averaged == 3 and float(final.weights["w"]) == pytest.approx(3.0)
    assert (final.start_step, final.end_step) == (10, 24)


def test_loss_valley_that_never_converges_returns_the_last_segment():
    valley, final = run([5.0, 4.0, 3.0, 2.0])
    assert not valley.is_converged and float(final.weights["w"]) == 3.0 and final.n_averaged == 1


def test_loss_valley_state_survives_a_checkpoint():
    """Saved after segment 9 and restored in a new object, the stream ends as if never interrupted."""
    valley = LossValley()
    for i, loss in enumerate(CURVE[:10]):
        valley.update(segment(i, loss))
    state = valley.state_dict()
    resumed = LossValley()
    resumed.load_state_dict(state)
    assert [s.end_step for s in resumed.smooth_q] == [s.end_step for s in valley.smooth_q]
    for i, loss in enumerate(CURVE[10:], start=10):
        resumed.update(segment(i, loss))
    final = resumed.final()
    assert final.n_averaged == 7 and float(final.weights["w"]) == pytest.approx(44 / 7)


# -- the callback inside a fit --------------------------------------------------------------------
class StepWeights(L.Callback):
    """Records the trainable weights after every training step and val/loss after every validation."""

    def __init__(self):
        self.weights, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.losses.append(float(trainer.callback_metrics["val/loss"]))


def test_swad_callback_averages_every_step_of_the_chosen_segments(tmp_path):
    """Two steps per segment (validation every 2 of 8 steps). With n_converge = n_tolerance = 1 and a
    threshold that is never crossed, the official rules converge at segment 0 and average every later
    segment (equal lengths, so every step weighs the same), the first one's weights being overwritten by
    the first update: swad.ckpt must hold the mean of the weights after steps 2..7, and the live model
    keeps the last step's weights."""
    from dg_lightning.data import SyntheticShapes
    from dg_lightning.methods import ERM

    L.seed_everything(0, verbose=False)
    dm = SyntheticShapes(per_class=6, test_domains=["sketch"], batch_size=2, steps_per_epoch=4, image_size=32,
                         split_seed=0)
    model = ERM(num_classes=dm.num_classes, backbone="resnet10t", optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    swad = SWAD(n_converge=1, n_tolerance=1, tolerance_ratio=1e9, bn_steps=0)
    rec = StepWeights()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, val_check_interval=2, logger=False, callbacks=[rec, swad],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    steps = len(rec.weights)
    assert steps == 8 and len(rec.losses) == 4
    saved = torch.load(swad.checkpoint_path, weights_only=False)["state_dict"]
    for k in rec.weights[0]:
        want = torch.stack([w[k] for w in rec.weights[2:]]).mean(0)
        assert torch.allclose(saved[k], want, atol=1e-6), k
    live = dict(model.named_parameters())
    assert all(torch.equal(live[k].detach(), v) for k, v in rec.weights[-1].items())
    info = swad.info()
    assert (info["start_step"], info["end_step"], info["n_averaged"]) == (2, 7, 3)
    assert info["converged"] and info["converge_step"] == 1


def test_swad_explains_a_missing_validation_loss():
    class Trainer:
        sanity_checking = False
        callback_metrics = {"val/acc": torch.tensor(0.5)}

        class state:  # noqa: N801
            fn = "fit"

    swad = SWAD()
    swad._segment_n = 1
    with pytest.raises(RuntimeError, match="validation loss 'val/loss'"):
        swad.on_validation_end(Trainer(), nn.Linear(1, 1))


def test_batchnorm_statistics_recomputed_as_plain_averages():
    """Official update_bn: reset, momentum None (cumulative average), training-mode forwards: the running
    mean is the mean of the batch means, the running variance the mean of the unbiased batch variances."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.BatchNorm2d(2)
            self.teacher = nn.BatchNorm2d(2)  # not on the prediction path: untouched

        def forward(self, x):
            return self.backbone(x)

    net = Net()
    net.backbone.running_mean.fill_(7.0)
    net.teacher.running_mean.fill_(7.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 2, 2, 2, generator=g) * (i + 1) + i for i in range(4)]
    assert recompute_batchnorm(net, batches, "cpu") == 1
    x = np.stack([b.numpy() for b in batches])  # (batches, N, C, H, W)
    means = x.mean(axis=(1, 3, 4))
    variances = np.stack([b.transpose(1, 0, 2, 3).reshape(2, -1).var(axis=1, ddof=1) for b in x])
    assert np.allclose(net.backbone.running_mean.numpy(), means.mean(0), atol=1e-6)
    assert np.allclose(net.backbone.running_var.numpy(), variances.mean(0), atol=1e-5)
    assert net.backbone.momentum == 0.1 and torch.all(net.teacher.running_mean == 7.0)


def test_swad_selection_in_results_json_through_the_cli(tmp_path, fake_pacs):
    """The CPU YAML with a tiny schedule: results.json names the `swad` selection, with held-out and
    in-domain accuracy of the averaged model and its step range, beside the usual two."""
    run = tmp_path / "run"
    proc = subprocess.run(cli_cmd(
        "fit", "--config", str(ROOT / "experiments/cpu/pacs_erm_swad_lite0.yaml"), f"--data.root={fake_pacs}",
        "--model.backbone=resnet10t", "--model.pretrained=false", "--data.image_size=32", "--data.batch_size=2",
        "--data.steps_per_epoch=2", "--trainer.max_epochs=2", "--trainer.val_check_interval=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}"), env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((run / "results.json").read_text())
    assert set(record["selections"]) == {"training-domain validation", "oracle", "swad"}
    swad = record["selections"]["swad"]
    assert swad["checkpoint"].endswith("swad.ckpt") and (run / "checkpoints" / "swad.ckpt").is_file()
    assert 0 <= swad["test"]["art_painting"] <= 1 and set(swad["in_domain"]) == {"cartoon", "photo", "sketch"}
    assert swad["n_averaged"] >= 1 and 0 <= swad["start_step"] <= swad["end_step"] <= 3
    assert swad["batchnorm_layers_recomputed"] > 0 and swad["bn_steps"] == 25


def test_swad_on_segmentation(tmp_path):
    """The same callback on a segmentation run: the per-pixel validation loss drives the valley, the
    averaged DeepLabV3+ gets its BatchNorm statistics recomputed and is scored per target as `swad`."""
    from dg_lightning.core.callbacks import BestCheckpoint, LastCheckpoint
    from dg_lightning.core.selection import evaluate_selections
    from dg_lightning.data import Cityscapes, SegmentationDG
    from dg_lightning.methods import ERM
    from tests.seg_trees import write_cityscapes

    cs = write_cityscapes(tmp_path / "cs", split="train", n=6, h=64, w=64)
    write_cityscapes(tmp_path / "cs", split="val", n=2, h=64, w=64)
    L.seed_everything(0, verbose=False)
    dm = SegmentationDG(source=Cityscapes(root=str(cs), split="train"), targets=[Cityscapes(root=str(cs), split="val")],
                        holdout_fraction=0.34, crop_size=32, batch_size=2, eval_batch_size=2, steps_per_epoch=4)
    model = ERM(num_classes=19, backbone="resnet10t", decoder_channels=16, task="segmentation")
    swad = SWAD(n_converge=1, n_tolerance=1, tolerance_ratio=1e9, bn_steps=2)
    ckpts = [BestCheckpoint(tmp_path / "ckpt", monitor="val/miou"), LastCheckpoint(tmp_path / "ckpt")]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, val_check_interval=2, logger=False, callbacks=[*ckpts, swad],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert swad.info()["n_averaged"] == 1 and swad.info()["batchnorm_layers_recomputed"] > 0
    record = evaluate_selections(trainer, model, dm, None)
    entry = record["selections"]["swad"]
    assert 0 <= entry["test"]["cityscapes"] <= 1 and len(entry["per_class_iou"]["cityscapes"]) == 19
