"""ISSA's three stages chained through saved checkpoints, and the style mix itself."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    enc = NoiseEncoderTraining(generator_ckpt=str(root / "gan.ckpt"), noise_height=8, channels=16, backbone="compact",
                               optimizer="adam", d_ndf=8, r1_every=2, latent_hold_images=4, latent_fade_images=12,
                               blur_sigma=1.0, blur_fade_images=8, mask_patch=2, lpips_trunk="random", lpips_net="alex")
    assert torch.equal(enc.G.const, gan.G_ema.const)  # stage 2 starts from stage 1's G_ema
    t = _trainer(root, 4)  # two batches: encoder + discriminator steps (the R1 steps are not counted)
    t.fit(enc, _images())
    assert {"train/pixel", "train/lpips", "train/adv", "train/fm", "train/latent", "train/kl", "train/noise",
            "train/loss", "train/d_fake", "train/d_real", "train/r1", "train/lambda_w"} <= set(t.callback_metrics)
    assert float(enc.images_seen) == 16  # 2 batches x (4 real + 4 generated)
    assert float(t.callback_metrics["train/lambda_w"]) < 0.1  # faded by images seen (8 at the second batch)
    assert not all(torch.equal(a, b) for a, b in zip(enc.E.parameters(), enc.E_ema.parameters()))
    t.save_checkpoint(root / "encoder.ckpt")
    (root / "gan.ckpt").unlink()  # stage 3 must need only the stage-2 checkpoint
    return root / "encoder.ckpt", enc


def test_stage2_checkpoint_rebuilds_generator_and_the_encoder_ema(encoder_ckpt):
    path, trained = encoder_ckpt
    G, E = load_inverter(str(path))
    x = torch.rand(2, 3, 32, 64)
    w, noise = invert(G, E, x)
    w_ref, noise_ref = invert(trained.G, trained.E_ema.eval(), x)
    assert torch.allclose(w, w_ref) and all(torch.allclose(a, b) for a, b in zip(noise, noise_ref))
    assert not torch.allclose(w, invert(trained.G, trained.E.eval(), x)[0])  # the EMA, not the last weights
    assert [n.shape[1] for n in noise] == [1, 32, 32, 1, 1, 1, 1]  # multi-channel only where predicted
    assert not any(p.requires_grad for p in [*G.parameters(), *E.parameters()])
    assert E.noise_out == trained.E.noise_out == "leaky_relu"
    # a checkpoint of the earlier compact encoder (no noise_out saved) loads with the signed maps it learnt
    old = torch.load(path, map_location="cpu", weights_only=False)
    del old["issa"]["encoder"]["noise_out"]
    torch.save(old, path.parent / "earlier.ckpt")
    assert load_inverter(str(path.parent / "earlier.ckpt"))[1].noise_out == "linear"


def test_mixing_an_image_with_its_own_style_is_its_inversion(encoder_ckpt):
    G, E = load_inverter(str(encoder_ckpt[0]))
    x = torch.rand(2, 3, 32, 64)
    w, noise = invert(G, E, x)
    reconstruction = ((G.synthesis(w, noise, noise_mode="const") + 1) / 2).clamp(0, 1)
    assert torch.allclose(style_mix(G, E, x, w), reconstruction, atol=1e-6)
    other = style_mix(G, E, x, w.flip(0))  # A's noise, B's style: a different image
    assert not torch.allclose(other, reconstruction, atol=1e-3)


def _seg_data(tmp_path, h=48, w=48):
    from dg_lightning.data.segmentation import Cityscapes, SegmentationDG

    cs = write_cityscapes(tmp_path / "cs", split="train", n=6, h=h, w=w)
    write_cityscapes(tmp_path / "cs", split="val", n=2, h=h, w=w)
    return SegmentationDG(source=Cityscapes(str(cs), split="train"), targets=[Cityscapes(str(cs), split="val")],
                          holdout_fraction=0.34, crop_size=32, batch_size=2, steps_per_epoch=2, split_seed=0)


def test_whole_images_are_mixed_before_the_crop_and_labels_stay_pixel_for_pixel(encoder_ckpt, tmp_path):
    """The mix is made on the whole (square, 48 x 48) image at the generator's 2:1 size and brought back to
    48 x 48; then the crop and augmentation of the unmixed sample (same seed) apply: so the label is
    the unmixed one pixel for pixel, and the image is the augmentation of the whole-image mix."""
    from dg_lightning.methods import ERM
    from dg_lightning.methods.issa.mixing import StyleMixedDataset

    dm = _seg_data(tmp_path)
    seen = []

    class Spy(L.Callback):  # records what the method trains on
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch[0].clone(), batch[1].clone()))

    mixing = ISSAStyleMixing(str(encoder_ckpt[0]), prob=1.0)
    model = ERM(backbone="resnet10t", num_classes=19, task="segmentation", decoder_channels=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[mixing, Spy()],
                        use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    assert len(seen) == 2
    plain_dm = _seg_data(tmp_path)
    plain = next(iter(plain_dm.train_dataloader()))  # the same seeded batch, unmixed
    assert torch.equal(seen[0][1], plain[1])  # labels untouched, pixel for pixel
    assert not torch.allclose(seen[0][0], plain[0], atol=1e-2)  # images replaced by mixes
    # rebuild sample 0 by hand: its whole image, mixed with each possible style, then the same augmentation
    ds = dm.train_dataset()
    assert isinstance(ds, StyleMixedDataset)
    key = next(iter(plain_dm.train_dataloader().sampler))
    image, label = plain_dm.train_dataset().data[plain_dm.train_dataset().indices[key[0]]]
    G, E = mixing.G, mixing.E
    whole = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    candidates = []
    for b in ds.paired.indices:
        w_b = invert(G, E, torch.from_numpy(ds.source.source[b][0]).permute(2, 0, 1)[None].float() / 255)[0]
        mixed = style_mix(G, E, whole, w_b)
        assert mixed.shape == whole.shape  # the image's own size (and aspect) kept
        mixed = (mixed[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        plain_dm.train_transform.set_random_seed(key[1])
        out = plain_dm.train_transform(image=mixed, mask=label)
        candidates.append(torch.from_numpy(out["image"]).permute(2, 0, 1).float() / 255)
    assert any(torch.allclose(seen[0][0][0], c, atol=1e-6) for c in candidates)


def test_mixing_probability_and_seeded_draws(encoder_ckpt, tmp_path):
    from dg_lightning.methods.issa.mixing import StyleMixer

    G, E = load_inverter(str(encoder_ckpt[0]))
    source = [(np.full((24, 40, 3), 40 * k, np.uint8), None) for k in range(4)]
    mixer = StyleMixer(G, E, prob=0.5, source=source, style_indices=[0, 1, 2, 3])
    flags = [mixer(source[0][0], torch.Generator().manual_seed(s))[1] for s in range(40)]
    assert 8 < sum(flags) < 32
    a = mixer(source[1][0], torch.Generator().manual_seed(3))
    b = mixer(source[1][0], torch.Generator().manual_seed(3))
    assert a[1] == b[1] and np.array_equal(a[0], b[0]) and a[0].shape == (24, 40, 3)
    assert all(not StyleMixer(G, E, prob=0.0, source=source, style_indices=[0])(source[0][0], torch.Generator())[1]
               for _ in range(3))


def test_exemplar_styles_come_from_a_folder(encoder_ckpt, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 20), (80 * i, 30, 200)).save(tmp_path / f"style{i}.png")
    mixing = ISSAStyleMixing(str(encoder_ckpt[0]), prob=0.5, exemplars=str(tmp_path))
    mixing.setup(None, None, "fit")
    assert mixing.style_bank.shape == (3, mixing.G.num_ws, mixing.G.w_dim)
    with pytest.raises(FileNotFoundError, match="no images"):
        ISSAStyleMixing(str(encoder_ckpt[0]), exemplars=str(tmp_path / "empty")).setup(None, None, "fit")


def test_evaluation_measures_by_hand(encoder_ckpt):
    from dg_lightning.methods.issa.evaluation import (
        colour_stats,
        evaluate_inverter,
        grid_effects,
        style_moved,
    )

    a = torch.zeros(1, 3, 2, 2)
    b = torch.ones(1, 3, 2, 2)
    b[..., 0, 0] = 0.0  # means 0.75, stds sqrt(3) / 4
    assert torch.allclose(colour_stats(b), torch.tensor([[0.75] * 3 + [3 ** 0.5 / 4] * 3]))
    assert style_moved(a, a, b) == 0.0 and style_moved(b, a, b) == pytest.approx(1.0)
    half = torch.full((1, 3, 2, 2), 0.375)  # means half way, std 0: t = (3 * 0.375 * 0.75) / (3 * 0.75^2 + 3 * 3 / 16)
    assert style_moved(half, a, b) == pytest.approx(0.375 * 0.75 / (0.75 ** 2 + 3 / 16))
    mixes = torch.zeros(2, 2, 3, 1, 1)
    mixes[:, 1] = 1.0  # styles differ by 1, contents not at all
    assert grid_effects(mixes)["content_effect"] == 0.0 and grid_effects(mixes)["style_effect"] == pytest.approx(2 ** -0.5)
    # the whole evaluation on random scenes with a fake segmenter that thresholds the red channel
    G, E = load_inverter(str(encoder_ckpt[0]))
    torch.manual_seed(0)
    images = (torch.rand(8, 3, 48, 48) * 255).to(torch.uint8)
    labels = (images[:, 0] > 127).long()

    def segment(x, size):
        return (F.interpolate(x, size=size, mode="bilinear")[:, 0] > 0.5).long()

    r = evaluate_inverter(lambda x: invert(G, E, x), lambda w, n: ((G.synthesis(w, n, noise_mode="const") + 1) / 2
                                                                     ).clamp(0, 1), G.size, images, labels, segment,
                          n_grid=2, num_classes=2)
    assert r["miou_real"] == 1.0 and 0 <= r["layout_kept"] <= 1.0 / r["miou_real"] + 1e-9
    assert {"psnr_db", "style_moved", "style_moved_recon", "style_effect", "content_effect", "miou_mix"} <= set(r)


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
                "--model.init_args.channels=8", "--model.init_args.d_ndf=8", "--model.init_args.mask_patch=2"),
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


@pytest.mark.slow
def test_bench_issa_runs_end_to_end_at_toy_size(tmp_path):
    """`make bench-issa`'s script on a toy tree: stages, the three segmentation runs, the mechanism
    measurements with the seed-0 ERM run as the segmenter, the grid, the tables."""
    import json

    from PIL import Image

    from dg_lightning.bench.issa import main
    from tests.seg_trees import write_camvid

    data = tmp_path / "data"
    write_cityscapes(data / "cityscapes-pix2pix", split="train", n=6, h=64, w=64, suffix=".jpg")
    write_cityscapes(data / "cityscapes-pix2pix", split="val", n=8, h=64, w=64, suffix=".jpg")
    write_camvid(data / "camvid", h=64, w=96)
    (data / "camvid/train").mkdir()
    for i in range(2):  # CamVid train images: the extra-source styles
        Image.new("RGB", (96, 64), (60 * i, 90, 30)).save(data / f"camvid/train/0001TP_00{i}.png")
    size = "--data.init_args.size=[32,64] --data.init_args.batch_size=2"
    seg = ["--model.init_args.backbone=resnet10t", "--model.init_args.pretrained=false",
           "--model.init_args.decoder_channels=16", "--data.init_args.crop_size=32", "--data.init_args.batch_size=2",
           "--data.init_args.holdout_fraction=0.34", "--data.init_args.steps_per_epoch=2", "--trainer.max_epochs=1"]
    assert main(["--data", str(data), "--seeds", "0", "--out", str(tmp_path / "out"), "--gan-steps", "2",
                 "--encoder-steps", "2", "--erm-runs", str(tmp_path / "none"), "--encoder-every", "1",
                 "--trajectory-images", "4",
                 f"--gan-args={size} --model.init_args.size=[32,64] --model.init_args.w_dim=16 --model.init_args.n_mlp=2"
                 " --model.init_args.channel_base=64 --model.init_args.channel_max=32",
                 f"--encoder-args={size} --model.init_args.noise_height=8 --model.init_args.channels=8"
                 " --model.init_args.d_ndf=8 --model.init_args.mask_patch=2",
                 "--", *seg]) == 0
    r = json.loads((tmp_path / "out/bench_issa.json").read_text())
    m = r["mechanism"]
    assert m["images"] == 8 and np.isfinite(m["psnr_db"]) and 0 <= m["miou_real"] <= 1
    assert {"layout_kept", "style_moved", "style_moved_recon", "style_content_ratio"} <= set(m)
    assert m["segmenter"].endswith("erm/seed0/checkpoints/last.ckpt")
    assert {x["method"] for x in r["runs"]} == {"ERM", "ERM+ISSA", "ERM+ISSA (CamVid-train styles)"}
    assert Image.open(tmp_path / "out/mixing_grid.png").size == (5 * 64, 5 * 32)  # 4 styles + content column
    md = (tmp_path / "out/bench_issa.md").read_text()
    assert "| ERM+ISSA |" in md and "| ERM+ISSA (CamVid-train styles) |" in md and "stylised proxy validation" in md
    # --encoder-every 1: the mechanism after each stage-2 batch, on 4 scenes
    assert [(t["batches"], t["images"]) for t in r["trajectory"]] == [(1, 4), (2, 4)]
    assert all(np.isfinite(t["style_moved"]) for t in r["trajectory"]) and "Stage 2 after 2 batches" in md
    assert (tmp_path / "out/runs/issa/encoder/checkpoints/last.ckpt").is_file()


def test_reconstruction_terms_use_both_halves_and_the_adversarial_terms_the_real_one(encoder_ckpt):
    """Official ``multi_accumulate``: pixel, LPIPS, KL and noise terms on the real and the generated
    half; hinge and feature matching on the real half's reconstructions; the latent term on the
    generated half. Changing one half moves exactly the terms that half enters."""
    _, enc = encoder_ckpt
    enc.eval()
    torch.manual_seed(1)
    real = torch.rand(2, 3, *TINY["size"]) * 2 - 1
    gen, w_gt = enc.generated_half(2)

    def terms(r, g, w):
        torch.manual_seed(0)  # the same masks each call
        with torch.no_grad():
            return {k: float(v) for k, v in enc.encoder_losses(r, g, w)[0].items()}

    base = terms(real, gen, w_gt)
    other_gen = terms(real, gen.flip(-1), w_gt)  # only the generated half changes
    for k in ("pixel", "lpips", "kl", "noise"):
        assert other_gen[k] != pytest.approx(base[k], rel=1e-6, abs=0), k
    for k in ("adv", "fm"):
        assert other_gen[k] == pytest.approx(base[k], rel=1e-6), k
    other_real = terms(real.flip(-1), gen, w_gt)  # only the real half changes
    for k in ("pixel", "lpips", "adv", "fm"):
        assert other_real[k] != pytest.approx(base[k], rel=1e-6, abs=0), k
    assert other_real["latent"] == pytest.approx(base["latent"], rel=1e-6)
    assert terms(real, gen, w_gt.flip(0))["latent"] != pytest.approx(base["latent"], rel=1e-6, abs=0)


def test_paper_size_encoder_yaml_makes_the_official_choices():
    """The paper-size stage 2 uses what the official configuration uses; the tiny CPU one may differ."""
    import yaml

    from tests.conftest import ROOT

    args = yaml.safe_load((ROOT / "experiments/issa/cityscapes_paper_encoder.yaml").read_text())["model"]["init_args"]
    assert args["backbone"] == "fpn_resnet50" and args["optimizer"] == "ranger" and args["lpips_net"] == "vgg"
    assert args["d_ndf"] == 64 and args["d_refresh_fakes"] is True and args["mask_patch"] == 4
    assert (args["lr"], args["d_lr"], args["r1_gamma"], args["r1_every"]) == (1e-4, 1e-5, 0.1, 16)
    assert (args["blur_sigma"], args["blur_fade_images"]) == (10.0, 200_000)
    assert (args["latent_hold_images"], args["latent_fade_images"]) == (200_000, 500_000)
