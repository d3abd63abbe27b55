"""The compact StyleGAN2 of ISSA: shapes, w+ and noise as explicit inputs, modulation by hand."""

import pytest
import torch

from dg_lightning.methods.issa.generator import Discriminator, Generator, ModulatedConv2d

TINY = dict(w_dim=16, n_mlp=2, channel_base=64, channel_max=32)


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    g = Generator((16, 32), **TINY)
    for layer in g.layers:  # noise strengths start at 0 (as in StyleGAN2); make them count
        layer.noise.strength.data.fill_(0.5)
    return g.eval()


def test_rectangular_layout_of_layers_latents_and_noise(gen):
    assert gen.base == (4, 8) and gen.num_res == 3 and gen.num_ws == 6
    assert gen.noise_shapes() == [(4, 8), (8, 16), (8, 16), (16, 32), (16, 32)]
    assert gen.layers_at(8) == [1, 2]
    z = torch.randn(2, 16)
    assert gen(z).shape == (2, 3, 16, 32)
    with pytest.raises(ValueError, match="powers of two"):
        Generator((16, 24), **TINY)


def test_fixed_w_plus_and_noise_give_the_same_image(gen):
    w = gen.z_to_w_plus(torch.randn(2, 16))
    noise = gen.random_noise(2)
    assert torch.equal(gen.synthesis(w, noise), gen.synthesis(w, noise))
    assert not torch.equal(gen.synthesis(w, noise), gen.synthesis(w, None))  # None: fresh noise


def test_each_noise_map_and_each_w_reaches_the_image(gen):
    w = gen.z_to_w_plus(torch.randn(1, 16)).clone()
    noise = gen.random_noise(1)
    ref = gen.synthesis(w, noise)
    for i in range(len(noise)):
        changed = list(noise)
        changed[i] = torch.randn_like(noise[i])
        assert not torch.allclose(gen.synthesis(w, changed), ref), f"noise {i}"
    for k in range(gen.num_ws):
        w2 = w.clone()
        w2[:, k] += 1.0
        assert not torch.allclose(gen.synthesis(w2, noise), ref), f"w {k}"


def test_zero_noise_strength_ignores_the_noise():
    torch.manual_seed(0)
    g = Generator((8, 16), **TINY)  # strengths are 0 at initialisation
    w = g.z_to_w_plus(torch.randn(1, 16))
    assert torch.allclose(g.synthesis(w, g.random_noise(1)), g.synthesis(w, g.random_noise(1)))


def test_noise_init_sets_every_strength_and_is_kept_in_the_config():
    g = Generator((8, 16), **TINY, noise_init=0.1)
    assert [float(layer.noise.strength) for layer in g.layers] == pytest.approx([0.1] * len(g.layers))
    assert Generator(**{**g.config, "size": tuple(g.config["size"])}).layers[-1].noise.strength.item() == \
        pytest.approx(0.1)


def test_modulated_convolution_by_hand():
    """1 x 1, one channel: modulation scales the weight by the style, demodulation divides by its
    norm, so the output is x times the sign of (weight * style); without demodulation it is
    x * weight * style / sqrt(fan_in)."""
    conv = ModulatedConv2d(1, 1, 1, w_dim=4)
    conv.weight.data.fill_(-3.0)
    conv.affine.weight.data.zero_()
    conv.affine.bias.data.fill_(2.0)  # style s = 2 for any w
    x = torch.randn(2, 1, 3, 3)
    assert torch.allclose(conv(x, torch.randn(2, 4)), -x, atol=1e-5)
    conv.demodulate = False
    assert torch.allclose(conv(x, torch.randn(2, 4)), x * (-3.0 * 2.0), atol=1e-5)


def test_discriminator_scores_and_features():
    torch.manual_seed(0)
    d = Discriminator((16, 32), channel_base=64, channel_max=32)
    x = torch.randn(4, 3, 16, 32)
    logit, feats = d(x, features=True)
    assert logit.shape == (4,) and len(feats) == 2
    assert [f.shape[-2:] for f in feats] == [(8, 16), (4, 8)]
    assert torch.equal(d(x), logit)


def test_gan_losses_by_hand():
    import math

    from dg_lightning.methods.issa.gan import d_logistic_loss, g_nonsaturating_loss, r1_penalty

    assert float(d_logistic_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(2 * math.log(2))
    got = d_logistic_loss(torch.tensor([2.0]), torch.tensor([-1.0]))
    assert float(got) == pytest.approx(math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2)), rel=1e-6)
    assert float(g_nonsaturating_loss(torch.tensor([0.0, 1.0]))) == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(-1))) / 2, rel=1e-6)
    # D(x) = <a, x> + <x, x>: grad = a + 2x, so ||grad||^2 is known per sample
    a = torch.tensor([1.0, -2.0])
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    logits = (x * a).sum(1) + x.pow(2).sum(1)
    assert float(r1_penalty(logits, x)) == pytest.approx(((1 + 4) + (9 + 0)) / 2)


def test_one_gan_step_moves_both_networks_and_the_ema():
    import lightning as L

    from dg_lightning.methods.issa.gan import StyleGAN2

    torch.manual_seed(0)
    gan = StyleGAN2(size=(8, 16), r1_every=1, ema_beta=0.5, **TINY)
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    data = [(torch.rand(3, 8, 16), 0, 0, i) for i in range(4)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(gan, torch.utils.data.DataLoader(data, batch_size=4))
    after = gan.state_dict()
    for prefix in ("G.mapping", "D.from_rgb", "G_ema.const"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert not torch.equal(after["G.w_avg"], torch.zeros_like(after["G.w_avg"]))
    assert torch.equal(after["G.w_avg"], after["G_ema.w_avg"])
    assert {"train/d_loss", "train/g_loss", "train/r1"} <= set(trainer.callback_metrics)


def test_paper_size_widths_and_noise_channels_are_the_official_ones():
    """At the paper size (256 x 512, channel_base 4096, channel_max 512) every layer's width, and so the
    noise channels the encoder predicts, is the official min(32768 // width, 512); at the official
    prediction resolution (width 128) that is 256 channels per layer."""
    from dg_lightning.methods.issa.encoder import MaskedNoiseEncoder

    g = Generator((256, 512), w_dim=16, n_mlp=1, channel_base=4096, channel_max=512)
    assert g.layer_channels == [min(32768 // w, 512) for _, w in g.noise_shapes()]
    enc = MaskedNoiseEncoder(g, noise_height=64, channels=8)
    assert [g.noise_shapes()[i] for i in enc.noise_layers] == [(64, 128), (64, 128)]
    assert enc.noise_channels == [256, 256]


def test_multichannel_noise_reaches_the_image_channel_by_channel(gen):
    """Noise with the layer's width: each channel is its own map (changing one channel changes the image);
    one-channel noise is the same map on every channel; other channel counts are refused."""
    w = gen.z_to_w_plus(torch.randn(1, 16))
    noise = gen.random_noise(1)
    i = 3
    c = gen.layer_channels[i]
    assert c > 1
    multi = list(noise)
    multi[i] = noise[i].expand(1, c, -1, -1).clone()
    assert torch.allclose(gen.synthesis(w, multi), gen.synthesis(w, noise), atol=1e-6)  # broadcast = same map
    for ch in (0, c - 1):
        changed = [m.clone() for m in multi]
        changed[i][:, ch] += 1.0
        assert not torch.allclose(gen.synthesis(w, changed), gen.synthesis(w, multi), atol=1e-4), ch
    wrong = list(noise)
    wrong[i] = torch.randn(1, 2, *noise[i].shape[-2:])
    with pytest.raises(ValueError, match="channels"):
        gen.synthesis(w, wrong)


def test_const_noise_is_fixed_and_not_saved():
    torch.manual_seed(0)
    g = Generator((16, 32), **TINY)
    for layer in g.layers:
        layer.noise.strength.data.fill_(0.5)
    w = g.z_to_w_plus(torch.randn(2, 16))
    assert torch.equal(g.synthesis(w, noise_mode="const"), g.synthesis(w, noise_mode="const"))
    assert not torch.equal(g.synthesis(w, noise_mode="const"), g.synthesis(w, noise_mode="random"))
    assert torch.equal(Generator((16, 32), **TINY).const_noise(3), g.const_noise(3))  # rebuilt, not saved
    assert not any(k.startswith("noise_const") for k in g.state_dict())
