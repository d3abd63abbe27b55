"""ISSA's three stages chained through saved checkpoints, and the style mix itself."""

import lightning as L
import numpy as np
import pytest
import torch

from dg_lightning.methods.issa import (
    ISSAStyleMixing,
    NoiseEncoderTraining,
    StyleGAN2,
    load_inverter,
    style_mix,
)
from dg_lightning.methods.issa.mixing import invert
from tests.seg_trees import write_cityscapes

TINY = dict(size=(32, 64), w_dim=16, n_mlp=2, channel_base=64, channel_max=32, noise_init=0.2)


def _trainer(root, steps):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def _images(n=4):
    return torch.utils.data.DataLoader([(torch.rand(3, 24, 40), 0, 0, i) for i in range(n)], batch_size=n)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("issa")
    torch.manual_seed(0)
    gan = StyleGAN2(**TINY)
    t = _trainer(root, 2)
    t.fit(gan, _images())
    t.save_checkpoint(root / "gan.ckpt")
    enc = NoiseEncoderTraining(generator_ckpt=str(root / "gan.ckpt"), noise_height=8, channels=16,
                               latent_fade_steps=10, lpips_trunk="random")
    assert torch.equal(enc.G.const, gan.G_ema.const)  # stage 2 starts from stage 1's G_ema
    t = _trainer(root, 2)
    t.fit(enc, _images())
    assert {"train/pixel", "train/lpips", "train/adv", "train/fm", "train/latent", "train/kl", "train/noise",
            "train/loss", "train/d_hinge"} <= set(t.callback_metrics)
    t.save_checkpoint(root / "encoder.ckpt")
    (root / "gan.ckpt").unlink()  # stage 3 must need only the stage-2 checkpoint
    return root / "encoder.ckpt", enc


def test_stage2_checkpoint_rebuilds_generator_and_encoder(encoder_ckpt):
    path, trained = encoder_ckpt
    G, E = load_inverter(str(path))
    x = torch.rand(2, 3, 32, 64)
    w, noise = invert(G, E, x)
    w_ref, noise_ref = invert(trained.G, trained.E.eval(), x)
    assert torch.allclose(w, w_ref) and all(torch.allclose(a, b) for a, b in zip(noise, noise_ref))
    assert not any(p.requires_grad for p in [*G.parameters(), *E.parameters()])


def test_mixing_an_image_with_its_own_style_is_its_inversion(encoder_ckpt):
    G, E = load_inverter(str(encoder_ckpt[0]))
    x = torch.rand(2, 3, 32, 64)
    w, noise = invert(G, E, x)
    reconstruction = ((G.synthesis(w, noise) + 1) / 2).clamp(0, 1)
    assert torch.allclose(style_mix(G, E, x, w), reconstruction, atol=1e-6)
    other = style_mix(G, E, x, w.flip(0))  # A's noise, B's style: a different image
    assert not torch.allclose(other, reconstruction, atol=1e-3)


def test_callback_mixes_with_its_probability_and_keeps_labels(encoder_ckpt, tmp_path):
    from dg_lightning.data.segmentation import Cityscapes, SegmentationDG
    from dg_lightning.methods import ERM

    cs = write_cityscapes(tmp_path / "cs", split="train", n=6, h=32, w=64)
    write_cityscapes(tmp_path / "cs", split="val", n=2, h=32, w=64)
    dm = SegmentationDG(source=Cityscapes(str(cs), split="train"), targets=[Cityscapes(str(cs), split="val")],
                        holdout_fraction=0.34, crop_size=32, batch_size=2, steps_per_epoch=2, split_seed=0)
    seen = []

    class Spy(L.Callback):  # runs after ISSAStyleMixing: records what the method trains on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch[0].clone(), batch[1].clone()))

    mixing = ISSAStyleMixing(str(encoder_ckpt[0]), prob=1.0)
    model = ERM(backbone="resnet10t", num_classes=19, task="segmentation", decoder_channels=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[mixing, Spy()],
                        use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 2 and float(trainer.callback_metrics["train/issa_mixed"]) == 1.0
    plain = next(iter(dm.train_dataloader()))  # the same seeded batch, unmixed
    assert torch.equal(seen[0][1], plain[1])  # labels untouched
    assert not torch.allclose(seen[0][0], plain[0], atol=1e-3)  # images replaced by their mixes
    G, E = mixing.G, mixing.E
    w_batch = invert(G, E, plain[0])[0]
    candidates = [style_mix(G, E, plain[0][:1], w_batch[k:k + 1])[0] for k in range(2)]  # style of image 0 or 1
    assert any(torch.allclose(seen[0][0][0], c, atol=1e-5) for c in candidates)


def test_exemplar_styles_come_from_a_folder(encoder_ckpt, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 20), (80 * i, 30, 200)).save(tmp_path / f"style{i}.png")
    mixing = ISSAStyleMixing(str(encoder_ckpt[0]), prob=0.5, exemplars=str(tmp_path))
    mixing.setup(None, None, "fit")
    assert mixing.style_bank.shape == (3, mixing.G.num_ws, mixing.G.w_dim)
    with pytest.raises(FileNotFoundError, match="no images"):
        ISSAStyleMixing(str(encoder_ckpt[0]), exemplars=str(tmp_path / "empty")).setup(None, None, "fit")


@pytest.mark.slow
def test_three_stages_run_from_the_cli_through_their_checkpoints(tmp_path):
    """The shipped YAMLs, shrunk: `issa fit` (generator) -> `issa fit` (encoder, loading the generator's
    last.ckpt) -> `fit` ERM + ISSA mixing (loading the encoder's), each from its default run directory."""
    import json
    import subprocess

    from tests.conftest import ROOT, cli_cmd, subprocess_env
    from tests.seg_trees import write_camvid

    data = tmp_path / "data"
    write_cityscapes(data / "cityscapes-pix2pix", split="train", n=6, h=64, w=64, suffix=".jpg")
    write_cityscapes(data / "cityscapes-pix2pix", split="val", n=2, h=64, w=64, suffix=".jpg")
    write_camvid(data / "camvid", h=64, w=96)
    env = subprocess_env(DG_DATA=str(data))
    small = ["--model.init_args.size=[32, 64]", "--data.init_args.size=[32, 64]", "--data.init_args.batch_size=2",
             "--trainer.max_steps=4", "--trainer.enable_progress_bar=false"]
    stages = [
        cli_cmd("issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_gan.yaml"), *small,
                "--model.init_args.w_dim=16", "--model.init_args.n_mlp=2", "--model.init_args.channel_base=64",
                "--model.init_args.channel_max=32"),
        cli_cmd("issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_encoder.yaml"),
                *[a for a in small if "model.init_args.size" not in a], "--model.init_args.noise_height=8",
                "--model.init_args.channels=8"),
        cli_cmd("fit", "--config", str(ROOT / "experiments/cpu/seg_cityscapes_erm_issa.yaml"),
                "--model.init_args.backbone=resnet10t", "--model.init_args.pretrained=false",
                "--model.init_args.decoder_channels=16", "--data.init_args.crop_size=32", "--data.init_args.batch_size=2",
                "--data.init_args.holdout_fraction=0.34", "--data.init_args.steps_per_epoch=2", "--trainer.max_epochs=1",
                "--trainer.default_root_dir=runs/seg", "--trainer.enable_progress_bar=false"),
    ]
    for cmd in stages:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs/issa/gan/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "runs/issa/encoder/config.yaml").is_file()
    r = json.loads((tmp_path / "runs/seg/results.json").read_text())
    assert set(r["selections"]) == {"training-domain validation", "oracle", "stylised proxy validation"}
    proxy = r["selections"]["stylised proxy validation"]
    assert proxy["monitor"] == "val/cityscapes_stylised/miou" and 0 <= proxy["val"] <= 1
    assert set(proxy["test"]) == {"cityscapes", "camvid", "camvid_dusk"}
    assert "train/issa_mixed_epoch" in (tmp_path / "runs/seg/csv/metrics.csv").read_text().splitlines()[0] or \
        "train/issa_mixed" in (tmp_path / "runs/seg/csv/metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_bench_issa_runs_end_to_end_at_toy_size(tmp_path):
    """`make bench-issa`'s script on a toy tree: stages, reconstruction numbers, the grid, the table."""
    import json

    from PIL import Image

    from dg_lightning.bench.issa import main
    from tests.seg_trees import write_camvid

    data = tmp_path / "data"
    write_cityscapes(data / "cityscapes-pix2pix", split="train", n=6, h=64, w=64, suffix=".jpg")
    write_cityscapes(data / "cityscapes-pix2pix", split="val", n=8, h=64, w=64, suffix=".jpg")
    write_camvid(data / "camvid", h=64, w=96)
    size = "--data.init_args.size=[32,64] --data.init_args.batch_size=2"
    seg = ["--model.init_args.backbone=resnet10t", "--model.init_args.pretrained=false",
           "--model.init_args.decoder_channels=16", "--data.init_args.crop_size=32", "--data.init_args.batch_size=2",
           "--data.init_args.holdout_fraction=0.34", "--data.init_args.steps_per_epoch=2", "--trainer.max_epochs=1"]
    assert main(["--data", str(data), "--seeds", "0", "--out", str(tmp_path / "out"), "--gan-steps", "2",
                 "--encoder-steps", "2", "--erm-runs", str(tmp_path / "none"),
                 f"--gan-args={size} --model.init_args.size=[32,64] --model.init_args.w_dim=16 --model.init_args.n_mlp=2"
                 " --model.init_args.channel_base=64 --model.init_args.channel_max=32",
                 f"--encoder-args={size} --model.init_args.noise_height=8 --model.init_args.channels=8",
                 "--", *seg]) == 0
    r = json.loads((tmp_path / "out/bench_issa.json").read_text())
    assert r["reconstruction"]["images"] == 8 and np.isfinite(r["reconstruction"]["psnr_db"])
    assert {x["method"] for x in r["runs"]} == {"ERM", "ERM+ISSA"}
    assert Image.open(tmp_path / "out/mixing_grid.png").size == (5 * 64, 5 * 32)  # 4 styles + content column
    md = (tmp_path / "out/bench_issa.md").read_text()
    assert "| ERM+ISSA |" in md and "stylised proxy validation" in md
