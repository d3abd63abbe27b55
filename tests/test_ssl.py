"""Self-supervised bases (lightly), DDM and the linear probe."""

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dg_lightning.data import SyntheticShapes
from dg_lightning.eval.probe import fit_linear_probe
from dg_lightning.methods import DDM, SSL
from dg_lightning.methods.ddm import GradientReversal, robust_kmeans, style_statistics, uniform_posterior_loss
from dg_lightning.methods.ssl import OBJECTIVES

TINY_HEADS = {
    "simclr": {"hidden_dim": 32, "out_dim": 16},
    "moco": {"hidden_dim": 32, "out_dim": 16, "queue_size": 64},
    "byol": {"hidden_dim": 32, "out_dim": 16},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 8, "out_dim": 32, "n_local_views": 2},
    "simsiam": {"hidden_dim": 32, "out_dim": 32, "pred_hidden_dim": 8},
    "barlowtwins": {"hidden_dim": 32, "out_dim": 32},
}


def tiny_data(**kw):
    args = dict(per_class=6, test_domains=["cartoon"], batch_size=4, steps_per_epoch=2, split_seed=0, image_size=32)
    args.update(kw)
    return SyntheticShapes(**args)


def trainer(**kw):
    args = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                use_distributed_sampler=False, enable_model_summary=False)
    args.update(kw)
    return L.Trainer(**args)


# -- linear probe -----------------------------------------------------------------------------------
def test_linear_probe_separates_and_ignores_feature_scale():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    x = centres[y] + 0.3 * torch.randn(60, 2, generator=g)
    probe = fit_linear_probe(x, y, 3)
    assert (probe(x).argmax(1) == y).all()
    # the probe standardises its input: a feature in other units gives the same predictions
    scaled = x * torch.tensor([1000.0, 0.001])
    probe_scaled = fit_linear_probe(scaled, y, 3)
    assert torch.allclose(probe_scaled(scaled).softmax(1), probe(x).softmax(1), atol=1e-4)


# -- DDM pieces --------------------------------------------------------------------------------------
def test_gradient_reversal_negates_the_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    (GradientReversal.apply(x, 0.5) * torch.tensor([3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.5, -2.0]))


def test_uniform_posterior_loss_by_hand():
    # p = (1/3, 2/3): -(log 1/3 + log 2/3) / 2
    assert uniform_posterior_loss(torch.tensor([[0.0, math.log(2.0)]])).item() == pytest.approx(
        (math.log(3) + math.log(1.5)) / 2)
    assert uniform_posterior_loss(torch.zeros(4, 3)).item() == pytest.approx(math.log(3))


def test_style_statistics_by_hand():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    assert torch.allclose(style_statistics(f), torch.tensor([[2.5, math.sqrt(5 / 3)]]))


@pytest.mark.parametrize("adversarial", ["grl", "uniform"])
def test_ddm_split_heads_and_domain_terms_by_hand(adversarial):
    model = DDM(num_classes=3, backbone="resnet10t", ssl="simclr", ssl_args=TINY_HEADS["simclr"],
                adversarial=adversarial, num_domains=2, split=0.5)
    width = model.backbone.num_features
    k = width // 2
    assert model.k_inv == k and model.domain_head.in_features == width - k and model.adversary.in_features == k
    assert model.objective.head.layers[0].in_features == k  # the SSL loss sees h_inv only
    # h_inv = first k features: only its first two are non-zero; h_var: only its first two
    h = torch.zeros(2, width)
    h[0, 0], h[1, 1] = 1.0, 1.0
    h[0, k], h[1, k + 1] = 2.0, 2.0
    h.requires_grad_(True)
    with torch.no_grad():
        for head in (model.domain_head, model.adversary):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, 0] = head.weight[1, 1] = 1.0
    d = torch.tensor([0, 1])
    terms = model.domain_terms(h, d)
    # domain head on h_var: logits [[2, 0], [0, 2]] -> CE = log(1 + e^-2)
    assert terms["domain"].item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    if adversarial == "grl":
        # the adversary's CE on h_inv (logits [[1, 0], [0, 1]]) = log(1 + e^-1); gradient reversed into h_inv
        assert terms["adversarial"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
        (g_rev,) = torch.autograd.grad(terms["adversarial"], h)
        plain = F.cross_entropy(model.adversary(h[:, :k]), d)
        (g_plain,) = torch.autograd.grad(plain, h)
        assert torch.allclose(g_rev[:, :k], -g_plain[:, :k]) and g_rev[:, :k].abs().sum() > 0
    else:
        # encoder: -mean log softmax of logits [[1, 0], [0, 1]]; the adversary fits on detached h_inv
        p = math.exp(1) / (math.exp(1) + 1)
        assert terms["adversarial"].item() == pytest.approx((-math.log(p) - math.log(1 - p)) / 2, abs=1e-6)
        assert terms["adversary_fit"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
        (g_fit,) = torch.autograd.grad(terms["adversary_fit"], h, allow_unused=True, retain_graph=True)
        assert g_fit is None or g_fit.abs().sum() == 0
    # unlabelled samples (-1, dropped pseudo-domains) carry no domain loss
    only_first = model.domain_terms(h, torch.tensor([0, -1]))["domain"]
    assert only_first.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_robust_kmeans_finds_blobs_and_drops_ambiguous_points():
    rng = np.random.RandomState(0)
    blobs = np.concatenate([c + 0.1 * rng.randn(20, 2) for c in ([0, 0], [6, 0], [0, 6])])
    between = np.array([[3.0, 0.0], [0.0, 3.0]])  # halfway between two centres
    labels = robust_kmeans(np.concatenate([blobs, between]), k=3, drop=0.04, seed=0)
    assert (labels[-2:] == -1).all() and (labels[:-2] >= 0).all()
    for b in range(3):  # each blob one cluster, different clusters for different blobs
        assert len(set(labels[20 * b:20 * b + 20])) == 1
    assert len({labels[0], labels[20], labels[40]}) == 3


def test_ddm_pseudo_domains_follow_the_styles():
    """Pseudo-domains from k-means on early-layer style statistics recover SyntheticShapes' three
    drawing styles (sources) well above chance, and the batch's sample indices select them."""
    from sklearn.metrics import adjusted_rand_score

    L.seed_everything(0)
    dm = tiny_data(per_class=8)
    model = DDM(num_classes=6, backbone="resnet10t", ssl="simclr", ssl_args=TINY_HEADS["simclr"],
                domain_labels="pseudo", pseudo_domains=3, pseudo_drop=0.1)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch[3].clone(), pl_module.batch_domains(batch[2]).clone()))

    trainer(callbacks=[Spy()], limit_val_batches=0).fit(model, datamodule=dm)
    labels = model.pseudo_labels.cpu().numpy()
    n_in = sum(len(dm.split_indices(d, "in")) for d in dm.train_domains)
    assert labels.shape == (n_in,) and set(labels) <= {-1, 0, 1, 2}
    assert (labels == -1).sum() == int(0.1 * n_in)
    true = np.concatenate([[k] * len(dm.split_indices(d, "in")) for k, d in enumerate(dm.train_domains)])
    kept = labels >= 0
    assert adjusted_rand_score(true[kept], labels[kept]) > 0.5
    for index, d in seen:
        assert torch.equal(d, model.pseudo_labels[index])


# -- the six bases, each trained for two steps ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_ssl_base_trains_and_is_probed(name):
    L.seed_everything(0)
    dm = tiny_data()
    model = SSL(num_classes=6, backbone="resnet10t", ssl=name, ssl_args=TINY_HEADS[name])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    t = trainer()
    t.fit(model, datamodule=dm)
    assert torch.isfinite(t.callback_metrics["train/loss_epoch"])
    changed = [k for k, v in model.backbone.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed, "the backbone did not train"
    views = 4 if name == "dino" else 2  # DINO: 2 global + 2 local crops here
    x = next(iter(dm.train_dataloader()))[0]
    assert isinstance(x, list) and len(x) == views
    if model.objective.momentum is not None:
        # the momentum encoder moved towards the online one but is not equal to it
        mom = model.momentum_backbone.state_dict()
        w = "conv1.0.weight"
        assert not torch.equal(mom[w], before[w]) and not torch.equal(mom[w], model.backbone.state_dict()[w])
    # the probe was fitted on frozen features and scores every source domain
    assert model.probes["full"].weight.abs().sum() > 0
    for d in dm.train_domains:
        assert f"val/{d}/acc" in t.callback_metrics
    t.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(t.callback_metrics["test/cartoon/acc"]) <= 1.0


def test_unknown_ssl_base_is_named():
    with pytest.raises(ValueError, match="simclr"):
        SSL(num_classes=3, backbone="resnet10t", ssl="swav")
    with pytest.raises(TypeError, match="ssl_args for 'simclr'"):
        SSL(num_classes=3, backbone="resnet10t", ssl="simclr", ssl_args={"queue_size": 3})


def test_linear_probe_fits_under_inference_mode():
    """trainer.validate/test run hooks under torch.inference_mode; the probe must still fit there."""
    y = torch.arange(20) % 2
    x = torch.stack([y.float() * 2 - 1, torch.zeros(20)], dim=1)
    with torch.inference_mode():
        probe = fit_linear_probe(x, y, 2)
    assert (probe(x).argmax(1) == y).all()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_ddm_wraps_every_base(name):
    """DDM around each base: the base's heads see h_inv only, and one step's loss has every term."""
    torch.manual_seed(0)
    model = DDM(num_classes=3, backbone="resnet10t", ssl=name, ssl_args=TINY_HEADS[name], num_domains=3, split=0.25)
    k = model.k_inv
    assert k == round(0.25 * model.backbone.num_features)
    first = next(m for m in model.objective.head.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == k
    local_crops = 2 if name == "dino" else 0  # DINO: two global views and two smaller local ones
    views = [torch.rand(6, 3, 32, 32) for _ in range(2)] + [torch.rand(6, 3, 16, 16) for _ in range(local_crops)]
    terms = model.training_losses(views, torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert {"loss", "ssl", "domain", "adversarial"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert model.domain_head.weight.grad is not None and model.adversary.weight.grad is not None


def test_unshard_restores_dataset_order_after_gather():
    from dg_lightning.core.data import ShardSampler
    from dg_lightning.eval.probe import pad_rows, unshard

    n, world = 7, 3
    data = torch.arange(n * 2).view(n, 2)
    m = len(ShardSampler(n, 0, world))
    shards = [pad_rows(data[list(ShardSampler(n, r, world))], m) for r in range(world)]
    assert [len(s) for s in shards] == [3, 3, 3]  # ranks 1 and 2 padded by one row
    assert torch.equal(unshard(torch.stack(shards), n), data)
