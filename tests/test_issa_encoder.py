"""ISSA's masked noise encoder: masking, the loss terms by hand, and inverting the generator."""

import math

import pytest
import torch

from dg_lightning.methods.issa.encoder import (
    MaskedNoiseEncoder,
    hinge_d_loss,
    hinge_g_loss,
    kl_standard_normal,
    mask_noise,
    masked_mse,
    patch_mask,
    pixel_mask,
)
from dg_lightning.methods.issa.generator import Generator

TINY = dict(w_dim=16, n_mlp=2, channel_base=64, channel_max=32)


def test_patch_mask_hides_a_quarter_of_the_4x4_patches():
    m = patch_mask(3, 16, 32, patch=4, ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert m.shape == (3, 1, 16, 32)
    cells = m.view(3, 4, 4, 8, 4).permute(0, 1, 3, 2, 4)  # (n, gh, gw, 4, 4)
    assert (cells.all(-1).all(-1) == cells.any(-1).any(-1)).all()  # each 4 x 4 patch all or nothing
    assert cells.all(-1).all(-1).flatten(1).sum(1).tolist() == [8, 8, 8]  # 25 % of 32 cells per image
    assert not torch.equal(m[0], m[1])  # drawn per image


def test_masked_noise_changes_only_where_masked():
    noise = torch.randn(2, 1, 16, 32)
    mask = patch_mask(2, 16, 32)
    out = mask_noise(noise, mask)
    assert torch.equal(out[~mask], noise[~mask])
    assert (out[mask] != noise[mask]).all()


def test_loss_terms_by_hand():
    recon, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    recon[..., 0, 0] = 1.0  # exact at one pixel
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[..., 1, 1] = True  # one pixel ignored: mean of (0, 1, 1) over the three channels
    assert float(masked_mse(recon, target, mask)) == pytest.approx(2 / 3)
    mu, logvar = torch.tensor([1.0, 0.0]), torch.tensor([0.0, math.log(4.0)])
    assert float(kl_standard_normal(mu, logvar)) == pytest.approx((0.5 * 1 + 0.5 * (4 - 1 - math.log(4))) / 2)
    assert float(hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-3.0, 0.5]))) == pytest.approx(0.5 + 0.75)
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)
    assert pixel_mask(torch.tensor([[[[True, False]]]]), (2, 4)).tolist() == [[[[True, True, False, False]] * 2]]


def test_encoder_outputs_fit_the_generator():
    torch.manual_seed(0)
    g = Generator((16, 32), **TINY).eval()
    enc = MaskedNoiseEncoder(g, noise_height=8, channels=16)
    assert enc.noise_layers == [1, 2]
    x = torch.rand(2, 3, 16, 32) * 2 - 1
    out = enc(x)
    assert out["w_plus"].shape == (2, g.num_ws, 16) and out["noise_maps"].shape == (2, 2, 8, 16)
    assert out["input_mu"].shape == (2, 1, 4, 8)
    noise = enc.generator_noise(out)
    assert [tuple(n.shape[-2:]) for n in noise] == g.noise_shapes()
    assert torch.equal(noise[0], out["input_mu"]) and torch.equal(noise[2], out["noise_maps"][:, 1:2])
    assert (noise[3] == 0).all() and (noise[4] == 0).all()
    assert g.synthesis(out["w_plus"], noise).shape == x.shape
    sampled = enc.generator_noise(out, sample=True)
    assert not torch.equal(sampled[0], noise[0])
    with pytest.raises(ValueError, match="noise_height"):
        MaskedNoiseEncoder(g, noise_height=2)


def test_random_lpips_trunk_is_the_same_network_every_time():
    from dg_lightning.methods.issa.inversion import make_lpips

    torch.manual_seed(1)
    a = make_lpips("random")
    torch.manual_seed(2)
    b = make_lpips("random")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))
