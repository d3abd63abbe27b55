"""Multi-space style disentanglement: parameter sharing, official augmentation presets, losses by hand
and against straightforward loops, probes, identifiability."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dg_lightning.bench.identifiability import Setting, run
from dg_lightning.data import SyntheticShapes
from dg_lightning.methods import MultiSpace
from dg_lightning.methods.multispace import (
    GROUPS,
    GroupedAugment,
    chunk_sizes,
    multispace_simclr_loss,
    multispace_vicreg_loss,
)


def image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, 48, 48, generator=g) * 255).to(torch.uint8)


# -- augmentation ---------------------------------------------------------------------------------

def test_style_keys_share_exactly_their_own_group_with_the_query():
    aug = GroupedAugment(32, rotate=True)  # with rotation off, two views' affine groups can coincide (flip only)
    torch.manual_seed(0)
    q, k0, *keys = aug.view_params(image())
    assert len(keys) == len(GROUPS)
    for g in GROUPS:
        assert k0[g] != q[g], f"content key shares {g} with the query"
    for g, k in zip(GROUPS, keys, strict=True):
        assert k[g] == q[g]
        for other in GROUPS:
            if other != g:
                assert k[other] != q[other], f"key of {g} shares {other} with the query"


def test_equal_parameters_give_equal_views_and_the_pipeline_applies_them():
    aug = GroupedAugment(32)
    img = image(1)
    torch.manual_seed(3)
    params = aug.view_params(img)
    torch.manual_seed(3)
    views = aug(img)
    assert len(views) == 2 + len(GROUPS)
    for p, v in zip(params, views, strict=True):
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert torch.equal(aug.apply(img, p), v)
    # the style-colour key and the query differ only in non-colour groups: same colour ops, other crops
    assert not torch.equal(views[0], views[2])


def test_official_presets():
    """configs/imagenet/dataset.yaml, medium strengths; asymmetric is the multi-head configs' aug_type.
    Catches: any preset value changed (e.g. saturation 0.4, one blur probability for every view)."""
    a = GroupedAugment(32)
    assert a.jitter == (0.4, 0.4, 0.2, 0.1) and a.jitter_prob == 0.8 and a.gray_prob == 0.2
    assert a.blur_prob == (1.0, 0.1) and a.solarize_prob == (0.0, 0.2) and a.equalize_prob == (0.0, 0.0)
    assert a.blur_sigma == (0.1, 2.0) and a.crop_scale == (0.08, 1.0) and a.flip_prob == 0.5
    assert a.rotate is False and (a.rotation_prob, a.max_rotation) == (0.5, 40.0)
    s = GroupedAugment(32, preset="symmetric")
    assert s.jitter == (0.8, 0.8, 0.8, 0.2) and s.blur_prob == (0.5, 0.5) and s.solarize_prob == (0.0, 0.0)
    assert GroupedAugment(32, blur_prob=0.3, solarize_prob=[0.1, 0.4]).solarize_prob == (0.1, 0.4)
    with pytest.raises(ValueError, match="preset"):
        GroupedAugment(32, preset="strong")


def test_blur_and_solarize_probabilities_per_view():
    """Query: always blurred, never solarized; content key: blur 0.1, solarize 0.2; a style key takes
    the query's flags for its own group only. Catches: one probability for every view, a style key
    drawing its own group's flags, rotation on by default."""
    aug = GroupedAugment(32)
    img = image(2)
    torch.manual_seed(0)
    draws = [aug.view_params(img) for _ in range(2000)]
    q, k0 = [d[0] for d in draws], [d[1] for d in draws]
    k_color, k_texture = [d[2] for d in draws], [d[3] for d in draws]
    assert all(p["texture"]["blur"] for p in q) and not any(p["color"]["solarize"] for p in q)
    assert np.mean([p["texture"]["blur"] for p in k0]) == pytest.approx(0.1, abs=0.025)
    assert np.mean([p["color"]["solarize"] for p in k0]) == pytest.approx(0.2, abs=0.03)
    assert not any(p["color"]["solarize"] for p in k_color)  # the query's (never)
    assert all(p["texture"]["blur"] for p in k_texture)  # the query's (always)
    assert np.mean([p["color"]["solarize"] for p in k_texture]) == pytest.approx(0.2, abs=0.03)
    assert np.mean([p["color"]["jitter"] for p in k0]) == pytest.approx(0.8, abs=0.03)
    assert not any(p["color"]["equalize"] or p["affine"]["rotate"] for d in draws for p in d)
    rot = GroupedAugment(32, rotate=True)
    angles = [p["affine"] for p in (rot.sample(img) for _ in range(1000))]
    assert np.mean([a["rotate"] for a in angles]) == pytest.approx(0.5, abs=0.05)
    assert max(abs(a["angle"]) for a in angles) <= 40.0


def test_official_order_blur_before_solarize_and_equalize():
    """crop (bicubic), flip, colour, blur, then solarize, then equalize. Catches: solarize/equalize
    before the blur, bilinear crops."""
    aug = GroupedAugment(32, rotate=True)
    img = image(3)
    torch.manual_seed(1)
    p = aug.sample(img)
    p["affine"].update(flip=True, rotate=True, angle=17.0)
    p["color"].update(jitter=False, gray=False, solarize=True, equalize=True)
    p["texture"].update(blur=True, sigma=1.5)
    i, j, h, w = p["crop"]["box"]
    x = TF.resized_crop(img, i, j, h, w, [32, 32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.rotate(TF.horizontal_flip(x), 17.0)
    x = TF.gaussian_blur(x, [11, 11], [1.5, 1.5])  # 2 * ceil(3 sigma) + 1
    x = TF.equalize(TF.solarize(x, threshold=128))
    assert torch.equal(aug.apply(img, p), TF.to_dtype(x, torch.float32, scale=True))


def test_unknown_group_is_named():
    with pytest.raises(ValueError, match="noise"):
        GroupedAugment(32, style_groups=["color", "noise"])


def test_chunk_sizes_as_official():
    """int(D * fraction) each, the remainder to the content space (official precompute_z_split_inds).
    Catches: rounding, or the remainder given to the last space."""
    assert chunk_sizes(128, [0.5, 0.125, 0.125, 0.125, 0.125]) == [64, 16, 16, 16, 16]
    assert chunk_sizes(11, [0.5, 0.25, 0.25]) == [7, 2, 2]
    assert chunk_sizes(10, [1, 1, 1]) == [4, 3, 3]
    with pytest.raises(ValueError, match="empty"):
        chunk_sizes(4, [0.9, 0.05, 0.05])


# -- losses ---------------------------------------------------------------------------------------

def _unit(x: list[float]) -> list[float]:
    n = math.sqrt(sum(v * v for v in x))
    return [v / n for v in x]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def simclr_by_loops(views, sizes, lambdas, tau, add_cont_neg=False):
    """The official SimCLRMultiHead.loss written out: anchors = every view of every image, negatives =
    every view of every other image, joint vectors = per-space unit chunks / sqrt(M+1)."""
    views = [v.tolist() for v in views]
    m1, n_views, n = len(sizes), len(views), len(views[0])
    bounds = [sum(sizes[:i]) for i in range(m1 + 1)]

    def chunk(x, i):
        return _unit(x[bounds[i]:bounds[i + 1]])

    joint = [[[c / math.sqrt(m1) for i in range(m1) for c in chunk(views[v][b], i)] for b in range(n)]
             for v in range(n_views)]
    align, mis = 0.0, []
    for i in range(m1):
        cos = [_dot(chunk(views[0][b], i), chunk(views[1 + i][b], i)) for b in range(n)]
        align += float(lambdas[i]) * sum(-c / tau for c in cos) / n
        mis.append(1 - sum(cos) / n)
    align /= m1

    def entropy(dim):
        total = 0.0
        for v in range(n_views):
            for b in range(n):
                s = 0.0
                for v2 in range(n_views):
                    for b2 in range(n):
                        if b2 != b:
                            s += math.exp(_dot(joint[v][b][:dim], joint[v2][b2][:dim]) / tau)
                total += math.log(s)
        return total / (n_views * n)

    ent = entropy(sum(sizes)) + (entropy(sizes[0]) if add_cont_neg else 0.0)
    return align + ent, mis


def vicreg_by_loops(views, sizes, lambdas, std_coeff=25.0, cov_coeff=1.0, add_cont_neg=False):
    views = [v.tolist() for v in views]
    m1, n = len(sizes), len(views[0])
    bounds = [sum(sizes[:i]) for i in range(m1 + 1)]
    mse = []
    for i in range(m1):
        sq = [(views[0][b][d] - views[1 + i][b][d]) ** 2 for b in range(n) for d in range(bounds[i], bounds[i + 1])]
        mse.append(sum(sq) / len(sq))

    def var_cov(rows, dim):
        mean = [sum(r[d] for r in rows) / n for d in range(dim)]
        cov = [[sum((r[d] - mean[d]) * (r[e] - mean[e]) for r in rows) / (n - 1) for e in range(dim)] for d in range(dim)]
        std = sum(max(0.0, 1 - math.sqrt(cov[d][d] + 1e-4)) for d in range(dim)) / dim
        off = sum(cov[d][e] ** 2 for d in range(dim) for e in range(dim) if d != e) / dim
        return std, off

    std = cov = 0.0
    for v in views:
        dims = [sum(sizes), sizes[0]] if add_cont_neg else [sum(sizes)]
        for dim in dims:
            s, c = var_cov([r[:dim] for r in v], dim)
            std, cov = std + s, cov + c
    std, cov = std / len(views), cov / len(views)
    return sum(float(lam) * m for lam, m in zip(lambdas, mse, strict=True)) / m1 + std_coeff * std + cov_coeff * cov, mse


def test_multispace_simclr_loss_by_hand():
    """B = 2 images, content + one style space of 1 dimension each (unit chunks are signs), tau = 1,
    lambdas (2, 3). Joint vectors (signs / sqrt 2): image 0: q (1, 1), k_0 (1, -1), k_1 (-1, 1);
    image 1: q (1, 1), k_0 (1, 1), k_1 (-1, 1), so <Z_a, Z_n> in {-1, 0, 1}.
    Catches: a query-only anchor, the anchor's own views among the negatives, no per-space
    normalisation, no 1/sqrt(M+1), no 1/(M+1), lambdas not applied."""
    v = lambda *rows: torch.tensor(rows)  # noqa: E731
    views = [v([2.0, 0.5], [3.0, 1.0]), v([1.0, -4.0], [0.5, 2.0]), v([-0.3, 7.0], [-2.0, 0.1])]
    loss, mis = multispace_simclr_loss(views, [1, 1], torch.tensor([2.0, 3.0]), tau=1.0)
    e = math.e
    # alignment: every q-k pair has cos 1 in its space -> (2 * -1 + 3 * -1) / 2
    align = -2.5
    # negatives of each anchor = the 3 views of the other image:
    # q0: 1, 1, 0   k0_0: 0, 0, -1   k1_0: 0, 0, 1   q1: 1, 0, 0   k0_1: 1, 0, 0   k1_1: 0, -1, 1
    entropy = (math.log(2 * e + 1) + math.log(2 + 1 / e) + math.log(2 + e) + 2 * math.log(e + 2)
               + math.log(1 + 1 / e + e)) / 6
    assert loss.item() == pytest.approx(align + entropy, abs=1e-6)
    assert torch.allclose(mis, torch.zeros(2), atol=1e-6)
    # add_cont_neg: content chunks of Z are +-1/sqrt 2, products +-1/2; signs (1, 1, -1) in both images
    loss_c, _ = multispace_simclr_loss(views, [1, 1], torch.tensor([2.0, 3.0]), tau=1.0, add_cont_neg=True)
    extra = (4 * math.log(2 * math.exp(0.5) + math.exp(-0.5)) + 2 * math.log(2 * math.exp(-0.5) + math.exp(0.5))) / 6
    assert loss_c.item() == pytest.approx(align + entropy + extra, abs=1e-6)


@pytest.mark.parametrize("sizes,n,add_cont_neg", [([3, 2], 3, False), ([2, 2, 3], 2, True), ([4, 1, 1, 2], 4, False)])
def test_multispace_simclr_loss_matches_the_official_formula_by_loops(sizes, n, add_cont_neg):
    g = torch.Generator().manual_seed(len(sizes))
    views = [torch.randn(n, sum(sizes), generator=g, dtype=torch.float64) for _ in range(len(sizes) + 1)]
    lambdas = torch.rand(len(sizes), generator=g, dtype=torch.float64) * 2
    loss, mis = multispace_simclr_loss(views, sizes, lambdas, tau=0.15, add_cont_neg=add_cont_neg)
    ref, ref_mis = simclr_by_loops(views, sizes, lambdas, 0.15, add_cont_neg)
    assert loss.item() == pytest.approx(ref, abs=1e-9)
    assert mis.tolist() == pytest.approx(ref_mis, abs=1e-9)


def test_multispace_vicreg_loss_by_hand():
    """B = 2, content + style of 1 dimension each, lambdas (25, 10).
    q = [[0, 1], [2, 3]]: variances 2 (hinge 0), covariance 2 -> 2 * 2^2 / 2 dims = 4;
    k_0 = 0: std sqrt(1e-4) = 0.01 -> hinge 0.99 in both dims; covariance 0;
    k_1 = [[1, 0], [1, 1]]: hinge 0.99 and 1 - sqrt(0.5001); covariance 0.
    MSE: content (q vs k_0) (0 + 4) / 2 = 2; style (q vs k_1) (1 + 4) / 2 = 2.5.
    Catches: variance/covariance of the joint query/key pair only (not each view), covariance not
    divided by the dimension, lambdas not the invariance weights, no 1/(M+1)."""
    views = [torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
    loss, mis = multispace_vicreg_loss(views, [1, 1], torch.tensor([25.0, 10.0]))
    std = (0 + 0.99 + (0.99 + 1 - math.sqrt(0.5001)) / 2) / 3
    cov = (4 + 0 + 0) / 3
    assert loss.item() == pytest.approx((25 * 2 + 10 * 2.5) / 2 + 25 * std + 1 * cov, abs=1e-4)
    assert torch.allclose(mis, torch.tensor([2.0, 2.5]))


@pytest.mark.parametrize("add_cont_neg", [False, True])
def test_multispace_vicreg_loss_matches_the_official_formula_by_loops(add_cont_neg):
    g = torch.Generator().manual_seed(1)
    sizes = [3, 2, 2]
    views = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.7 for _ in range(4)]
    lambdas = torch.tensor([25.0, 3.0, 11.0], dtype=torch.float64)
    loss, mis = multispace_vicreg_loss(views, sizes, lambdas, 25.0, 1.0, add_cont_neg=add_cont_neg)
    ref, ref_mis = vicreg_by_loops(views, sizes, lambdas, add_cont_neg=add_cont_neg)
    assert loss.item() == pytest.approx(ref, abs=1e-9)
    assert mis.tolist() == pytest.approx(ref_mis, abs=1e-12)


def test_loss_inputs_are_checked():
    views = [torch.randn(2, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="need 3 views"):
        multispace_simclr_loss(views[:2], [2, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="lambdas"):
        multispace_vicreg_loss(views, [2, 2], [1.0])
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        multispace_simclr_loss(views, [2, 3], [1.0, 1.0])


# -- the method -----------------------------------------------------------------------------------

def test_dual_ascent_step_and_official_default_lambdas():
    model = MultiSpace(num_classes=3, backbone="resnet10t", style_groups=["color"], proj_hidden=8, proj_dim=8,
                       dual_lr=0.5, dual_tolerance=0.1, lambdas=[1.0, 0.01])
    model.dual_step(torch.tensor([0.3, 0.0]))
    assert torch.allclose(model.lambdas, torch.tensor([1.1, 0.0]))  # 1 + 0.5 * 0.2; 0.01 - 0.05 clamped to 0
    vic = MultiSpace(num_classes=3, backbone="resnet10t", style_groups=["color"], proj_hidden=8, proj_dim=8, loss="vicreg")
    assert torch.equal(vic.lambdas, torch.tensor([25.0, 25.0]))  # official lambd = sim_coeff


def test_training_loss_is_the_function_of_the_projector_outputs():
    """The method hands the unnormalised projector outputs of all views to the loss."""
    torch.manual_seed(0)
    model = MultiSpace(num_classes=3, backbone="resnet10t", style_groups=["color", "crop"], proj_hidden=16, proj_dim=8,
                       add_cont_neg=True, lambdas=[1.0, 2.0, 0.5])
    views = [torch.rand(3, 3, 32, 32) for _ in range(4)]
    terms = model.training_losses(views, None, None)
    z = [model.projector(h) for h in model.encode_views(views)]
    ref, _ = simclr_by_loops([t.detach() for t in z], model.sizes, model.lambdas, 0.15, add_cont_neg=True)
    assert terms["loss"].item() == pytest.approx(ref, abs=1e-4)
    assert set(terms) >= {"misalign_content", "misalign_style_color", "lambda_style_crop"}


def test_multispace_trains_on_its_views_and_probes_every_space():
    L.seed_everything(0)
    dm = SyntheticShapes(per_class=6, test_domains=["cartoon"], batch_size=4, steps_per_epoch=2, split_seed=0,
                         image_size=32)
    model = MultiSpace(num_classes=6, backbone="resnet10t", style_groups=["color", "crop"], fractions=[0.5, 0.25, 0.25],
                       proj_hidden=16, proj_dim=16, dual_ascent=True)
    t = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  use_distributed_sampler=False, enable_model_summary=False)
    t.fit(model, datamodule=dm)
    assert model.sizes == [8, 4, 4]
    x = next(iter(dm.train_dataloader()))[0]
    assert isinstance(x, list) and len(x) == 4  # q, k_0, k_color, k_crop
    assert not torch.allclose(model.lambdas, torch.ones(3))  # dual ascent moved them
    t.test(model, datamodule=dm, verbose=False)
    m = t.callback_metrics
    for key in ("test/cartoon/acc", "test/cartoon/acc_style_color", "test/cartoon/acc_style_crop", "test/cartoon/acc_full"):
        assert key in m


def test_identifiability_small_run_has_the_expected_structure():
    """Content space predicts c far better than the styles; style space m predicts s_m better than
    the other style block (kernel ridge R², the paper's measure)."""
    torch.set_num_threads(1)
    r = run(Setting(steps=300, batch_size=256, eval_samples=2000), log_every=1000)
    k = np.asarray(r["r2_kernel"])
    assert k.shape == (3, 3) and np.asarray(r["r2_linear"]).shape == (3, 3)
    assert k[0, 0] > 0.8 and k[0, 0] - k[0, 1:].max() > 0.3
    assert k[1, 1] - k[1, 2] > 0.3 and k[2, 2] - k[2, 1] > 0.3
