"""Multi-space style disentanglement: parameter sharing, losses by hand, probes, identifiability."""

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_style_keys_share_exactly_their_own_group_with_the_query():
    aug = GroupedAugment(32)
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


def test_unknown_group_is_named():
    with pytest.raises(ValueError, match="noise"):
        GroupedAugment(32, style_groups=["color", "noise"])


def test_chunk_sizes():
    assert chunk_sizes(128, [0.5, 0.25, 0.25]) == [64, 32, 32]
    assert chunk_sizes(10, [1, 1, 1]) == [3, 3, 4]


def test_multispace_simclr_loss_by_hand():
    # two samples, content + one style space, 2-d each; tau = 0.5, lambdas (1, 2)
    zq = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    zk = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    loss, mis = multispace_simclr_loss(zq, zk, torch.tensor([1.0, 2.0]), tau=0.5)
    # alignment: mean cosines 0.5 and 0.5 -> (1 * -1 + 2 * -1) / 2 = -1.5
    # joint: <Zq1, Zk.> = (1, 1), <Zq2, Zk.> = (0, 0) -> logsumexp/tau: 2 + log 2 and log 2
    assert loss.item() == pytest.approx(-1.5 + (2 + 2 * math.log(2)) / 2, abs=1e-6)
    assert torch.allclose(mis, torch.tensor([0.5, 0.5]))
    # with every lambda = 1 it is InfoNCE on the joint vectors
    loss1, _ = multispace_simclr_loss(zq, zk, torch.ones(2), tau=0.5)
    joint_q, joint_k = torch.cat(zq, 1) / math.sqrt(2), torch.cat(zk, 1) / math.sqrt(2)
    assert loss1.item() == pytest.approx(F.cross_entropy(joint_q @ joint_k.T / 0.5, torch.arange(2)).item(), abs=1e-6)


def test_multispace_vicreg_loss_by_hand():
    zq = [torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]])]
    zk = [torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [1.0]])]
    loss, inv = multispace_vicreg_loss(zq, zk, torch.tensor([1.0, 2.0]))
    # invariance MSE 2 and 2 -> 25 * (1*2 + 2*2) / 2 = 75
    # variance: joint q has std sqrt(2) in both dims -> 0; joint k has std sqrt(1e-4) = 0.01 -> 0.99; / 2 -> 25 * 0.495
    # covariance: joint q's off-diagonal covariance 2 (twice) -> 8 / 2 dims = 4; joint k: 0
    assert loss.item() == pytest.approx(75 + 25 * 0.495 + 4, abs=1e-4)
    assert torch.allclose(inv, torch.tensor([2.0, 2.0]))


def test_dual_ascent_step():
    model = MultiSpace(num_classes=3, backbone="resnet10t", style_groups=["color"], proj_hidden=8, proj_dim=8,
                       dual_lr=0.5, dual_tolerance=0.1, lambdas=[1.0, 0.01])
    model.dual_step(torch.tensor([0.3, 0.0]))
    assert torch.allclose(model.lambdas, torch.tensor([1.1, 0.0]))  # 1 + 0.5 * 0.2; 0.01 - 0.05 clamped to 0


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
