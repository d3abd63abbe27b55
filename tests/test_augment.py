"""Batched augmentation (core/augment.py): each colour op against torchvision's own per-image op, the
crop geometry against a hand computation, the parameter distributions, and per-seed determinism."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from dg_lightning.core.augment import (
    COLOR_OPS,
    AugmentCollate,
    BatchViews,
    DomainBedBatch,
    FlipBatch,
    adjust_hue,
    resized_crop_params,
)

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(n=6, side=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g)
    x[0, :, :3, :3] = 0.5  # gray pixels (chroma 0)
    x[1, 0] = x[1, 1]  # ties between the max channels (R = G)
    return x


@pytest.mark.parametrize("k", range(4), ids=["brightness", "contrast", "saturation", "hue"])
def test_each_colour_op_equals_torchvision_per_image(k):
    x = _images()
    f = torch.tensor([0.7, 1.3, 0.9, 1.1, 0.75, 1.25]) if k < 3 else torch.tensor([-0.3, 0.3, 0.1, -0.05, 0.5, 0.0])
    out = COLOR_OPS[k](x.clone(), f)
    for i in range(len(x)):
        ref = TV_OPS[k](x[i], float(f[i]))
        assert torch.allclose(out[i], ref, atol=2e-6), (k, i, (out[i] - ref).abs().max())


def test_hue_of_pure_colours_by_hand():
    # red shifted by a third of the circle is green, by two thirds blue; yellow by -1/6 is red
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 1.0, 0]]).view(3, 3, 1, 1)
    out = adjust_hue(x, torch.tensor([1 / 3, 2 / 3, -1 / 6])).view(3, 3)
    assert torch.allclose(out, torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]), atol=1e-6)


def test_resized_crop_params_follow_torchvision():
    """Same ranges and (rejection-biased) distribution as torchvision's own ``get_params``."""
    from torchvision.transforms import RandomResizedCrop

    def stats(draws):
        hw = np.array([(h, w) for _, _, h, w in draws], dtype=float)
        return (hw[:, 0] * hw[:, 1]).mean() / (90 * 120), (hw[:, 1] / hw[:, 0]).mean()

    ours = [resized_crop_params(random.Random(s), 90, 120) for s in range(4000)]
    for top, left, h, w in ours:
        assert 0 <= top <= 90 - h and 0 <= left <= 120 - w and 0.69 <= h * w / (90 * 120) <= 1
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.zeros(1, 90, 120), [0.7, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    assert stats(ours) == pytest.approx(stats(theirs), abs=0.01)
    # a very wide image cannot hold these crops: the fallback is the central crop at the extreme ratio
    assert resized_crop_params(random.Random(0), 10, 1000) == (0, 493, 10, 13)


def _prepare_many(aug, image, hw, n):
    return [aug.prepare(image, hw, s) for s in range(n)]


def test_domainbed_parameters_are_a_function_of_the_seed():
    aug = DomainBedBatch(8, 10)
    img = np.random.RandomState(0).randint(0, 255, (10, 10, 3), dtype=np.uint8)
    a, b, c = aug.prepare(img, (40, 40), 5), aug.prepare(img, (40, 40), 5), aug.prepare(img, (40, 40), 6)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["params"], b["params"])
    assert not torch.equal(a["params"], c["params"])
    p = torch.stack([s["params"] for s in _prepare_many(aug, img, (40, 40), 3000)])
    assert p[:, :3].min() >= 0.7 and p[:, :3].max() <= 1.3 and p[:, 3].abs().max() <= 0.3
    assert sorted(p[0, 4:8].tolist()) == [0, 1, 2, 3]  # the colour order is a permutation
    assert p[:, 8].mean() == pytest.approx(0.1, abs=0.02)  # grayscale with probability 0.1
    assert len({tuple(r) for r in p[:, 4:8].tolist()}) == 24  # every order occurs


def test_domainbed_crop_cuts_the_box_of_the_original_geometry():
    """A horizontal ramp stored at 40 px for a 200 x 100 original: the output's columns are the ramp
    over the drawn box (resampling a linear image is exact away from the borders), mirrored if flipped."""
    side, out = 40, 16
    ramp = np.tile(np.arange(side, dtype=np.uint8) * 6, (side, 1))
    img = np.stack([ramp] * 3, -1)
    aug = DomainBedBatch(out, side)
    flips = 0
    for seed in range(20):
        p = aug.draw(seed, (100, 200))
        x0, _, x1, _ = p["box"]
        got = aug.prepare(img, (100, 200), seed)["image"][out // 2, :, 0].float()
        centres = (x0 + (np.arange(out) + 0.5) / out * (x1 - x0)) * side - 0.5
        want = torch.tensor(centres * 6, dtype=torch.float32)
        if p["flip"]:
            want, flips = want.flip(0), flips + 1
        assert torch.allclose(got[2:-2], want[2:-2], atol=1.01), seed  # uint8 rounding
    assert 0 < flips < 20


def test_colour_order_and_grayscale_on_the_batch_match_a_per_image_loop():
    aug = DomainBedBatch(12, 12)
    rng = np.random.RandomState(1)
    samples = [aug.prepare(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8), (12, 12), s) for s in range(40)]
    batch = AugmentCollate(aug)([(s, 0) for s in samples])[0]
    out = aug(batch)
    assert out.shape == (40, 3, 12, 12) and out.dtype == torch.float32
    for i, s in enumerate(samples):  # the reference: torchvision's ops, one image at a time
        x = s["image"].permute(2, 0, 1).float() / 255
        params = s["params"]
        for k in params[4:8].long().tolist():
            x = TV_OPS[k](x, float(params[k]))
        if params[8] > 0.5:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        assert torch.allclose(out[i], x, atol=1e-5), i
    assert aug({"image": batch["image"], "params": batch["params"]}).equal(out)  # plan made on the fly


def test_flip_and_views():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flips = [torch.equal(FlipBatch(2).prepare(img, (2, 3), s)["image"], torch.from_numpy(img[:, ::-1].copy()))
             for s in range(40)]
    assert 5 < sum(flips) < 35
    views = BatchViews([DomainBedBatch(8, 10), DomainBedBatch(8, 10)])
    big = np.random.RandomState(0).randint(0, 255, (10, 10, 3), dtype=np.uint8)
    batch = AugmentCollate(views)([(views.prepare(big, (10, 10), s), 0) for s in range(4)])[0]
    v1, v2_ = views(batch)
    assert v1.shape == v2_.shape == (4, 3, 8, 8) and not torch.equal(v1, v2_)
    with pytest.raises(ValueError, match="different sides"):
        BatchViews([DomainBedBatch(8, 10), FlipBatch(8)])


def test_domainbed_output_distribution_is_close_to_torchvision_on_pil():
    """The same image through DomainBed's PIL pipeline and through the batched one: mean and spread
    of the outputs agree (different random streams, same distribution)."""
    rng = np.random.RandomState(0)
    base = np.clip(rng.normal(128, 60, (48, 48, 3)), 0, 255).astype(np.uint8)
    tv = v2.Compose([v2.RandomResizedCrop(16, scale=(0.7, 1.0)), v2.RandomHorizontalFlip(),
                     v2.ColorJitter(0.3, 0.3, 0.3, 0.3), v2.RandomGrayscale(0.1), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True)])
    torch.manual_seed(0)
    ref = torch.stack([tv(Image.fromarray(base)) for _ in range(300)])
    aug = DomainBedBatch(16, 48)
    ours = aug(AugmentCollate(aug)([(aug.prepare(base, (48, 48), s), 0) for s in range(300)])[0])
    assert ours.mean().item() == pytest.approx(ref.mean().item(), abs=0.02)
    assert ours.std(0).mean().item() == pytest.approx(ref.std(0).mean().item(), rel=0.15)
    assert not math.isnan(ours.sum().item())
