"""ISSA's masked noise encoder and stage-2 discriminator: masking, the loss terms by hand, shapes."""

import math

import pytest
import torch

from dg_lightning.methods.issa.encoder import (
    MaskedNoiseEncoder,
    input_noise_kl,
    mask_layers,
    mask_noise,
    masked_mse,
    noise_l1,
    patch_mask,
    pixel_mask,
)
from dg_lightning.methods.issa.generator import Generator

TINY = dict(w_dim=16, n_mlp=2, channel_base=64, channel_max=32)


def test_patch_mask_hides_the_official_count_of_patches():
    m = patch_mask(3, 16, 32, patch=4, ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert m.shape == (3, 1, 16, 32)
    cells = m.view(3, 4, 4, 8, 4).permute(0, 1, 3, 2, 4)  # (n, gh, gw, 4, 4)
    assert (cells.all(-1).all(-1) == cells.any(-1).any(-1)).all()  # each 4 x 4 patch all or nothing
    assert cells.all(-1).all(-1).flatten(1).sum(1).tolist() == [8, 8, 8]  # 32 - int(32 * 0.75)
    assert not torch.equal(m[0], m[1])  # drawn per image
    # MAE's count: L - int(L * (1 - ratio)), 10 cells at 0.25 -> 3 masked (rounding would give 2)
    assert int(patch_mask(1, 2, 5, patch=1, ratio=0.25).sum()) == 3
    with pytest.raises(ValueError, match="divide"):
        patch_mask(1, 6, 8, patch=4)


def test_masked_noise_changes_only_where_masked_in_every_channel():
    noise = torch.randn(2, 5, 16, 32)
    mask = patch_mask(2, 16, 32)
    out = mask_noise(noise, mask)
    keep = ~mask.expand_as(noise)
    assert torch.equal(out[keep], noise[keep])
    assert (out[~keep] != noise[~keep]).all()


def test_each_layer_gets_its_own_mask_and_the_pixel_loss_keeps_what_no_layer_masked():
    torch.manual_seed(0)
    maps = [torch.randn(3, 4, 8, 16), torch.randn(3, 4, 8, 16)]
    masked, keep, masks = mask_layers(maps, (16, 32), patch=2, ratio=0.25)
    assert not torch.equal(masks[0], masks[1])  # independent per layer
    for m, out, mask in zip(maps, masked, masks):
        assert torch.equal(out[~mask.expand_as(m)], m[~mask.expand_as(m)])
    union = pixel_mask(masks[0], (16, 32)) | pixel_mask(masks[1], (16, 32))
    assert keep.shape == (3, 1, 16, 32) and torch.equal(keep.bool(), ~union)
    assert 0.25 < float(1 - keep.mean()) < 0.5  # the union of two 25 % masks


def test_loss_terms_by_hand():
    recon, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    recon[..., 0, 0] = 1.0  # exact at one pixel
    keep = torch.ones(1, 1, 2, 2)
    keep[..., 1, 1] = 0.0  # one pixel masked: it counts as 0 in a mean over all 12 elements (official)
    assert float(masked_mse(recon, target, keep)) == pytest.approx(2 * 3 / 12)
    # KL of N(m, v) (v as the scale, as the official code) to N(0, 1), per image, averaged
    a = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(1, 1, 2, 2)  # m 2.5, unbiased v 5/3
    b = torch.tensor([0.0, 2.0, 0.0, 2.0]).view(1, 1, 2, 2)  # m 1.0, v 4/3
    kl = [-math.log(v) + (v ** 2 + m ** 2) / 2 - 0.5 for m, v in ((2.5, 5 / 3), (1.0, 4 / 3))]
    assert float(input_noise_kl(torch.cat([a, b]))) == pytest.approx(sum(kl) / 2)
    assert float(noise_l1([torch.tensor([[-1.0, 2.0]]), torch.tensor([[3.0]])])) == pytest.approx(2.0)
    assert pixel_mask(torch.tensor([[[[True, False]]]]), (2, 4)).tolist() == [[[[True, True, False, False]] * 2]]


def test_compact_encoder_predicts_the_layer_widths_and_the_rest_is_the_generators_fixed_noise():
    torch.manual_seed(0)
    g = Generator((16, 32), **TINY).eval()
    enc = MaskedNoiseEncoder(g, noise_height=8, channels=16)
    assert enc.noise_layers == [1, 2] and enc.noise_channels == [g.layer_channels[1]] * 2 == [32, 32]
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    out = enc(x)
    assert out["w_plus"].shape == (2, g.num_ws, 16) and out["input_noise"].shape == (2, 1, 4, 8)
    assert [tuple(m.shape) for m in out["noise_maps"]] == [(2, 32, 8, 16)] * 2
    noise = enc.generator_noise(out)
    assert torch.equal(noise[0], out["input_noise"]) and torch.equal(noise[2], out["noise_maps"][1])
    assert torch.equal(noise[3][1], g.const_noise(3)[0]) and noise[3].shape[1] == 1
    assert g.synthesis(out["w_plus"], noise, noise_mode="const").shape == x.shape
    with pytest.raises(ValueError, match="noise_height"):
        MaskedNoiseEncoder(g, noise_height=2)


def test_compact_noise_heads_end_as_the_official_heads_with_leaky_relu():
    """The official ``ToLayerNoise``/``ToSingleDimLayerNoise`` end with ``nn.LeakyReLU()`` (slope 0.01):
    the compact encoder's maps are its convolution's output through that, ``noise_out="linear"`` keeps
    them signed (the earlier encoder); the choice is saved in ``config()``."""
    torch.manual_seed(0)
    g = Generator((16, 32), **TINY).eval()
    official = MaskedNoiseEncoder(g, noise_height=8, channels=16)
    linear = MaskedNoiseEncoder(g, noise_height=8, channels=16, noise_out="linear")
    linear.load_state_dict(official.state_dict())
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    raw, maps = linear(x)["noise_maps"], official(x)["noise_maps"]
    for r, m in zip(raw, maps, strict=True):
        assert (r < 0).any() and (r > 0).any()  # the convolution's output has both signs
        assert torch.equal(m[r > 0], r[r > 0]) and torch.allclose(m[r < 0], 0.01 * r[r < 0])
    assert official.config()["noise_out"] == "leaky_relu" and linear.config()["noise_out"] == "linear"
    with pytest.raises(ValueError, match="noise_out"):
        MaskedNoiseEncoder(g, noise_height=8, channels=16, noise_out="relu")


def test_official_fpn_encoder_shapes():
    torch.manual_seed(0)
    g = Generator((64, 128), **TINY).eval()
    enc = MaskedNoiseEncoder(g, noise_height=16, backbone="fpn_resnet50", fpn_dim=32).eval()
    out = enc(torch.rand(1, 3, 64, 128) * 2 - 1)
    assert out["w_plus"].shape == (1, g.num_ws, 16) and out["input_noise"].shape == (1, 1, 4, 8)
    assert [tuple(m.shape) for m in out["noise_maps"]] == [(1, g.layer_channels[3], 16, 32)] * 2
    assert enc.style_levels[:7] == [4, 4, 4, 3, 3, 3, 3] and set(enc.style_levels[7:]) == {2}
    with pytest.raises(ValueError, match="pyramid level"):
        MaskedNoiseEncoder(g, noise_height=32, backbone="fpn_resnet50", fpn_dim=32)


def test_random_lpips_trunk_is_the_same_network_every_time():
    from dg_lightning.methods.issa.inversion import make_lpips

    torch.manual_seed(1)
    a = make_lpips("random", "alex")
    torch.manual_seed(2)
    b = make_lpips("random", "alex")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))


# -- the stage-2 discriminator ---------------------------------------------------------------------

def test_multiscale_patchgan_layout():
    from torch import nn

    from dg_lightning.methods.issa.discriminator import MultiScalePatchGAN

    d = MultiScalePatchGAN(ndf=8)
    out = d(torch.randn(2, 3, 32, 64))
    assert len(out) == 3 and all(len(s) == 5 for s in out)
    assert [tuple(s[-1].shape) for s in out] == [(2, 1, 7, 11), (2, 1, 5, 7), (2, 1, 4, 5)]
    assert [s[k].shape[1] for s in out[:1] for k in range(4)] == [8, 16, 32, 64]
    convs = [m for m in d.scales[0].modules() if isinstance(m, nn.Conv2d)]
    normed = [hasattr(c, "weight_orig") for c in convs]
    assert normed == [False, True, True, True, False]  # spectral norm on the middle convolutions
    assert all(c.bias is None for c, n in zip(convs, normed) if n)


def test_discriminator_losses_by_hand():
    from dg_lightning.methods.issa.discriminator import (
        blur,
        blur_sigma_at,
        feature_matching,
        hinge_d_fake,
        hinge_d_real,
        hinge_g,
        r1_penalty,
    )

    def scale(feat, logits):
        return [torch.tensor(feat), torch.tensor(logits)]

    real = [scale([1.0, 2.0], [2.0, 0.0]), scale([0.0], [0.5, -1.0])]
    fake = [scale([3.0, 2.0], [-3.0, 0.5]), scale([1.0], [1.0, -2.0])]
    # per scale mean(relu(1 - D)) then averaged over the 2 scales
    assert float(hinge_d_real(real)) == pytest.approx(((0 + 1) / 2 + (0.5 + 2) / 2) / 2)
    assert float(hinge_d_fake(fake)) == pytest.approx(((0 + 1.5) / 2 + (2 + 0) / 2) / 2)
    assert float(hinge_g(fake)) == pytest.approx(((3 - 0.5) / 2 + (-1 + 2) / 2) / 2)
    # L1 of the non-logit features, each scale weighted 1 / 2 here (1 / num_scales)
    assert float(feature_matching(fake, real)) == pytest.approx((2 / 2 + 0) / 2 + 1 / 2)
    # R1: D_s(x) = a_s * x summed over pixels -> score = sum_s mean(a_s x) over 2 pixels: grad = sum_s a_s / 2
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)  # 2 images of 2 pixels
    preds = [[x * 2.0], [x * 4.0]]
    g = (2.0 + 4.0) / 4  # d/dx of mean over 4 elements, two scales
    assert float(r1_penalty(preds, x)) == pytest.approx(2 * g ** 2)
    assert blur_sigma_at(0, 10.0, 200) == 10.0 and blur_sigma_at(150, 10.0, 200) == pytest.approx(2.5)
    assert blur_sigma_at(500, 10.0, 200) == 0.0
    # blur: kernel 2^-(t / sigma)^2 on t = -3..3 for sigma 1, zero padding
    img = torch.zeros(1, 1, 9, 9)
    img[..., 4, 4] = 1.0  # an impulse comes out as the 2-D kernel
    k = torch.tensor([2.0 ** -(t * t) for t in range(-3, 4)])
    k = k / k.sum()
    assert torch.allclose(blur(img, 1.0)[0, 0, 1:8, 1:8], k[:, None] * k[None, :], atol=1e-6)
    edge = torch.ones(1, 1, 9, 9)
    assert float(blur(edge, 1.0)[0, 0, 0, 4]) == pytest.approx(float(k[3:].sum()), rel=1e-5)  # zero padding
    assert torch.equal(blur(img, 0.2), img)


def test_stage2_schedules():
    from dg_lightning.methods.issa.inversion import ema_beta, latent_weight

    assert latent_weight(100, 0.1, 200, 500) == 0.1
    assert latent_weight(350, 0.1, 200, 500) == pytest.approx(0.05)
    assert latent_weight(600, 0.1, 200, 500) == 0.0
    assert ema_beta(0, 32, 10_000, 0.05) == 0.0  # the EMA starts as a copy
    assert ema_beta(100_000, 32, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 5000))
    assert ema_beta(1e9, 32, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 10_000))


def test_official_ranger_choice_is_radam_in_lookahead(tmp_path):
    import lightning as L
    from timm.optim import Lookahead

    from dg_lightning.methods.issa import NoiseEncoderTraining, StyleGAN2

    torch.manual_seed(0)
    gan = StyleGAN2(size=(16, 32), **TINY)
    t = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    t.fit(gan, torch.utils.data.DataLoader([(torch.rand(3, 16, 32), 0, 0, i) for i in range(2)], batch_size=2))
    t.save_checkpoint(tmp_path / "g.ckpt")
    enc = NoiseEncoderTraining(str(tmp_path / "g.ckpt"), noise_height=8, backbone="compact", channels=8,
                               lpips_trunk="none", r1_every=16, d_lr=1e-5)
    opt_e, opt_d = enc.configure_optimizers()
    assert isinstance(opt_e, Lookahead) and isinstance(opt_e._base_optimizer, torch.optim.RAdam)
    assert opt_e.param_groups[0]["lookahead_k"] == 6 and opt_e.param_groups[0]["betas"] == (0.95, 0.999)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1e-5 * 16 / 17)
    assert opt_d.param_groups[0]["betas"][1] == pytest.approx(0.99 ** (16 / 17))
