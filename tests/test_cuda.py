"""Every method trains and evaluates on a CUDA GPU in bf16 mixed precision (skipped without a GPU).

CI has no GPU; run ``pytest -m cuda`` on a GPU machine. Catches what only shows on a device:
tensors left on the CPU (queues, caches, pseudo-labels, probes), dtype mismatches under autocast.
"""

import lightning as L
import pytest
import torch

from dg_lightning.data import SyntheticShapes

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"num_classes": 6, "backbone": "resnet10t"}
HEADS = {"hidden_dim": 32, "out_dim": 16}


def build(name: str):
    from dg_lightning import methods as m

    if name == "ERM":
        return m.ERM(**SMALL)
    if name == "GCISG":
        return m.GCISG(queue_size=64, emb_dim=16, **SMALL)
    if name == "RISE":
        return m.RISE(clip_model="ViT-B-32", clip_pretrained=None, clip_image_size=32, **SMALL)
    if name.startswith("SSL-"):
        ssl = name[4:]
        args = dict(HEADS, **({"queue_size": 64} if ssl == "moco" else {}),
                    **({"bottleneck_dim": 8, "out_dim": 32, "n_local_views": 2} if ssl == "dino" else {}))
        return m.SSL(ssl=ssl, ssl_args=args, **SMALL)
    if name == "DDM-pseudo":
        return m.DDM(ssl="byol", ssl_args=HEADS, domain_labels="pseudo", **SMALL)
    if name == "MultiSpace":
        return m.MultiSpace(style_groups=["color", "crop"], proj_hidden=32, proj_dim=16, dual_ascent=True, **SMALL)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["ERM", "GCISG", "RISE", "SSL-simclr", "SSL-moco", "SSL-dino", "DDM-pseudo", "MultiSpace"])
def test_method_trains_on_cuda_in_bf16(name):
    L.seed_everything(0)
    dm = SyntheticShapes(per_class=8, test_domains=["cartoon"], batch_size=8, steps_per_epoch=3, split_seed=0,
                         image_size=32)
    model = build(name)
    devices = set()

    class Where(L.Callback):  # Lightning moves the model back to the CPU after fit/test: look during training
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            devices.update(t.device.type for t in [*pl_module.parameters(), *pl_module.buffers()])
            devices.update(t.device.type for t in vars(pl_module).values() if isinstance(t, torch.Tensor))

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                        enable_model_summary=False, callbacks=[Where()])
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/cartoon/acc"]) <= 1.0
    assert devices == {"cuda"}


def _seg_data(tmp_path):
    from dg_lightning.data.segmentation import CamVid, Cityscapes, SegmentationDG
    from tests.seg_trees import write_camvid, write_cityscapes

    cs = write_cityscapes(tmp_path / "cs", split="train", n=6, h=64, w=64)
    write_cityscapes(tmp_path / "cs", split="val", n=2, h=64, w=64)
    cv = write_camvid(tmp_path / "camvid", h=64, w=96)
    return SegmentationDG(source=Cityscapes(str(cs), split="train"), targets=[Cityscapes(str(cs)), CamVid(str(cv))],
                          holdout_fraction=0.34, crop_size=32, batch_size=2, eval_batch_size=2, steps_per_epoch=2,
                          split_seed=0)


@pytest.mark.parametrize("name", ["ERM", "GCISG", "ERM+ISSA"])
def test_segmentation_trains_on_cuda_in_bf16(name, tmp_path):
    from dg_lightning import methods as m

    L.seed_everything(0)
    dm = _seg_data(tmp_path)
    seg = {"num_classes": 19, "backbone": "resnet10t", "task": "segmentation", "decoder_channels": 16}
    model = m.GCISG(queue_size=64, emb_dim=16, **seg) if name == "GCISG" else m.ERM(**seg)
    callbacks = []
    if name == "ERM+ISSA":  # stages 1 and 2 on the GPU too, then mixing (and the proxy) in training
        from dg_lightning.methods.issa import ISSAStyleMixing, NoiseEncoderTraining, StyleGAN2

        images = torch.utils.data.DataLoader([(torch.rand(3, 32, 64), 0, 0, i) for i in range(4)], batch_size=4)
        gan = StyleGAN2(size=(32, 64), w_dim=16, n_mlp=2, channel_base=64, channel_max=32)
        for module, ckpt in ((gan, "gan.ckpt"), (None, "enc.ckpt")):
            if module is None:
                module = NoiseEncoderTraining(str(tmp_path / "gan.ckpt"), noise_height=8, channels=8, backbone="compact",
                                              d_ndf=8, mask_patch=2, r1_every=1, lpips_net="alex")
            t = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            t.fit(module, images)
            t.save_checkpoint(tmp_path / ckpt)
        callbacks.append(ISSAStyleMixing(str(tmp_path / "enc.ckpt"), prob=1.0, proxy_validation=True))
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert 0.0 <= float(trainer.callback_metrics["val/miou"]) <= 1.0
    if name == "ERM+ISSA":
        assert 0.0 <= float(trainer.callback_metrics["val/cityscapes_stylised/miou"]) <= 1.0
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/camvid/miou"]) <= 1.0


def test_batched_augmentation_on_cuda_matches_the_cpu_and_trains_channels_last():
    """The batched path on the GPU: the same augmented batch as on the CPU (the parameters come from the
    loader), and a bf16 channels-last fit whose batches reach the model augmented on the GPU."""
    from dg_lightning.core.augment import AugmentCollate
    from dg_lightning.core.callbacks import ChannelsLast

    kw = dict(per_class=8, test_domains=["cartoon"], batch_size=8, steps_per_epoch=3, split_seed=0, image_size=32,
              augment="domainbed", batch_augment=True, cache_images=True)
    dm = SyntheticShapes(**kw)
    raw = next(iter(dm.train_dataloader()))
    on_cpu = dm.finish_batch(raw)[0]
    moved = L.fabric.utilities.apply_func.move_data_to_device(raw, torch.device("cuda"))
    on_gpu = dm.finish_batch(moved)[0]
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)
    assert isinstance(dm.train_dataloader().collate_fn, AugmentCollate)
    seen = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch[0].device.type, batch[0].dtype, next(pl_module.backbone.parameters()).is_contiguous(
                memory_format=torch.channels_last) or next(pl_module.backbone.parameters()).dim() != 4))

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                        enable_model_summary=False, callbacks=[Look(), ChannelsLast()])
    trainer.fit(build("ERM"), datamodule=SyntheticShapes(**kw))
    assert seen and all(s == ("cuda", torch.float32, True) for s in seen)
