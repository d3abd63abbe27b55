"""DomainBed's baselines: each loss against a value computed by hand (NumPy, float64, independent loops)
on a tiny linear model, the update schedules (DANN's alternation, IRM/VREx's optimiser reset, Fish's
inner loop, SagNet's three phases), MixStyle, and a smoke fit of every baseline on the fake PACS tree."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from dg_lightning import methods as M
from dg_lightning.core.mixstyle import insert_mixstyle, mix_style
from dg_lightning.methods.coral import coral_distance
from dg_lightning.methods.groupdro import groupdro_weights
from dg_lightning.methods.irm import irm_penalty
from dg_lightning.methods.mixup import mixup_objective, random_domain_pairs
from dg_lightning.methods.mmd import mmd_distance
from dg_lightning.methods.sagnet import randomize

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

D, K, DOMAINS, PER = 2, 3, 4, 4  # feature size, classes, source domains (4: K(K-1)/2 != K), samples per domain


def batch(seed: int = 0):
    """A domain-balanced batch as the data core builds it: PER samples of each domain, in domain
    order; 'images' (N, D, 1, 1) whose flattening is the feature vector."""
    g = np.random.RandomState(seed)
    x = g.normal(size=(DOMAINS * PER, D)) * np.array([1.0, 0.5]) + np.repeat(g.normal(size=(DOMAINS, D)), PER, 0)
    y = g.randint(0, K, size=DOMAINS * PER)
    d = np.repeat(np.arange(DOMAINS), PER)
    return x, y, d


def tensors(x, y, d):
    return (torch.tensor(x, dtype=torch.float64).view(len(x), D, 1, 1), torch.tensor(y), torch.tensor(d))


W0 = np.array([[0.5, -1.0], [0.3, 0.8], [-0.7, 0.2]])
B0 = np.array([0.1, -0.2, 0.05])


def linear(cls, **kwargs):
    """``cls`` with the identity as featuriser (features = the 2 'pixels') and the classifier (W0, B0),
    no input normalisation, float64."""
    model = cls(num_classes=K, backbone="resnet10t", **kwargs)
    model.backbone = nn.Flatten()
    model.backbone.num_features = D
    model.pixel_mean, model.pixel_std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    model.double()
    model.classifier = nn.Linear(D, K, dtype=torch.float64)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor(W0))
        model.classifier.bias.copy_(torch.tensor(B0))
    return model.double()


# -- NumPy references ------------------------------------------------------------------------------
def logits_np(x, w=W0, b=B0):
    return x @ w.T + b


def ce_np(logits, y):
    out = 0.0
    for row, t in zip(logits, y):
        out += np.log(np.exp(row).sum()) - row[t]
    return out / len(y)


def coral_np(a, b):
    return np.mean((a.mean(0) - b.mean(0)) ** 2) + np.mean((np.cov(a.T, ddof=1) - np.cov(b.T, ddof=1)) ** 2)


def mmd_np(a, b):
    def k(u, v):
        return sum(np.exp(-g * np.sum((u - v) ** 2)) for g in (0.001, 0.01, 0.1, 1, 10, 100, 1000))

    def mean_k(p, q):
        return np.mean([[k(u, v) for v in q] for u in p])

    return mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b)


def pairs_mean(feats, fn):
    vals = [fn(feats[i], feats[j]) for i in range(len(feats)) for j in range(i + 1, len(feats))]
    return sum(vals) / len(vals)


def per_domain(x, y, d):
    return [(x[d == k], y[d == k]) for k in range(DOMAINS)]


# -- CORAL and MMD ---------------------------------------------------------------------------------
def test_coral_loss_by_hand():
    x, y, d = batch()
    model = linear(M.CORAL, mmd_gamma=0.7)
    out = model.training_losses(*tensors(x, y, d))
    parts = per_domain(x, y, d)
    ce = np.mean([ce_np(logits_np(xk), yk) for xk, yk in parts])
    penalty = pairs_mean([xk for xk, _ in parts], coral_np)
    assert penalty > 0.05 and float(out["penalty"]) == pytest.approx(penalty, rel=1e-9)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-9)
    assert float(out["loss"]) == pytest.approx(ce + 0.7 * penalty, rel=1e-9)


def test_coral_distance_of_identical_samples_is_zero_and_sees_covariance():
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]], dtype=torch.float64)
    assert float(coral_distance(a, a)) == 0.0
    assert float(coral_distance(a, a * 2 - a.mean(0))) == pytest.approx(coral_np(a.numpy(), (a * 2 - a.mean(0)).numpy()))


def test_mmd_loss_by_hand():
    x, y, d = batch(1)
    x = x * 0.3  # distances where several of the kernel's bandwidths matter
    model = linear(M.MMD, mmd_gamma=0.5)
    out = model.training_losses(*tensors(x, y, d))
    parts = per_domain(x, y, d)
    penalty = pairs_mean([xk for xk, _ in parts], mmd_np)
    ce = np.mean([ce_np(logits_np(xk), yk) for xk, yk in parts])
    assert penalty > 0.05 and float(out["penalty"]) == pytest.approx(penalty, rel=1e-9)
    assert float(out["loss"]) == pytest.approx(ce + 0.5 * penalty, rel=1e-9)
    a = torch.tensor(parts[0][0])
    assert float(mmd_distance(a, a)) == pytest.approx(0.0, abs=1e-12)


# -- IRM and VREx ----------------------------------------------------------------------------------
def scale_grad_np(logits, y):
    """d/dw CE(w * logits, y) at w = 1: mean over samples of E_softmax[logit] - logit_y."""
    out = 0.0
    for row, t in zip(logits, y):
        p = np.exp(row - row.max())
        p /= p.sum()
        out += (p * row).sum() - row[t]
    return out / len(y)


def test_irm_loss_by_hand_and_its_annealed_weight():
    x, y, d = batch(2)
    model = linear(M.IRM, irm_lambda=30.0, irm_penalty_anneal_iters=5)
    nll = pen = 0.0
    for xk, yk in per_domain(x, y, d):
        lk = logits_np(xk)
        nll += ce_np(lk, yk) / DOMAINS
        pen += scale_grad_np(lk[::2], yk[::2]) * scale_grad_np(lk[1::2], yk[1::2]) / DOMAINS
    out = model.training_losses(*tensors(x, y, d))
    assert abs(pen) > 1e-3 and float(out["penalty"]) == pytest.approx(pen, rel=1e-9)
    assert float(out["loss"]) == pytest.approx(nll + 1.0 * pen, rel=1e-9)  # annealing: weight 1
    model.update_count.fill_(5)
    assert float(model.training_losses(*tensors(x, y, d))["loss"]) == pytest.approx(nll + 30.0 * pen, rel=1e-9)
    lg = torch.tensor(logits_np(x[:4]))
    assert float(irm_penalty(lg, torch.tensor(y[:4]))) == pytest.approx(
        scale_grad_np(logits_np(x[:4])[::2], y[:4:2]) * scale_grad_np(logits_np(x[:4])[1::2], y[1:4:2]), rel=1e-9)


def test_vrex_loss_by_hand():
    x, y, d = batch(3)
    model = linear(M.VREx, vrex_lambda=7.0, vrex_penalty_anneal_iters=0)
    risks = np.array([ce_np(logits_np(xk), yk) for xk, yk in per_domain(x, y, d)])
    var = np.mean((risks - risks.mean()) ** 2)
    out = model.training_losses(*tensors(x, y, d))
    assert var > 1e-3 and float(out["penalty"]) == pytest.approx(var, rel=1e-9)
    assert float(out["loss"]) == pytest.approx(risks.mean() + 7.0 * var, rel=1e-9)


class Balanced(L.LightningDataModule):
    """The batch of :func:`batch`, ``steps`` times per epoch, as ``(x, y, domain)``."""

    train_domains = ["a", "b", "c", "d"]

    def __init__(self, steps: int = 3):
        super().__init__()
        self.steps = steps

    def train_dataloader(self):
        x, y, d = tensors(*batch(4))
        return torch.utils.data.DataLoader([(x, y, d)] * self.steps, batch_size=None)


def fit_steps(model, steps: int):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=Balanced(steps))
    return trainer


@pytest.mark.parametrize("cls,anneal", [(M.IRM, "irm_penalty_anneal_iters"), (M.VREx, "vrex_penalty_anneal_iters")])
def test_optimizer_state_is_reset_when_the_penalty_weight_jumps(cls, anneal):
    """DomainBed builds a fresh Adam at update ``anneal_iters``: after 3 updates with the jump at the
    third (0-based update 2), Adam has taken 1 step from fresh state, not 3."""
    model = linear(cls, **{anneal: 2})
    trainer = fit_steps(model, 3)
    state = trainer.optimizers[0].state[model.classifier.weight]
    assert int(model.update_count) == 3 and int(state["step"]) == 1
    model = linear(cls, **{anneal: 10})
    trainer = fit_steps(model, 3)
    assert int(trainer.optimizers[0].state[model.classifier.weight]["step"]) == 3


# -- GroupDRO --------------------------------------------------------------------------------------
def test_groupdro_loss_and_weights_by_hand():
    x, y, d = batch(5)
    model = linear(M.GroupDRO, groupdro_eta=0.5)
    risks = np.array([ce_np(logits_np(xk), yk) for xk, yk in per_domain(x, y, d)])
    q = np.exp(0.5 * risks) / np.exp(0.5 * risks).sum()  # from uniform
    out = model.training_losses(*tensors(x, y, d))
    assert np.ptp(q) > 1e-3 and float(out["loss"]) == pytest.approx(q @ risks, rel=1e-9)
    q2 = q * np.exp(0.5 * risks)  # a second step on the same batch compounds the weights
    q2 /= q2.sum()
    assert float(model.training_losses(*tensors(x, y, d))["loss"]) == pytest.approx(q2 @ risks, rel=1e-9)
    assert np.allclose(model.q.numpy(), q2)
    got = groupdro_weights(torch.tensor([0.2, 0.8]), torch.tensor([1.0, 0.0]), 1.0)
    assert torch.allclose(got, torch.tensor([0.2 * np.e, 0.8]) / (0.2 * np.e + 0.8))


# -- Mixup -----------------------------------------------------------------------------------------
def test_mixup_objective_by_hand():
    x, y, d = batch(6)
    model = linear(M.Mixup)
    parts = per_domain(x, y, d)
    pairs, lams = [(2, 0), (0, 3), (3, 1), (1, 2)], [0.3, 0.9, 0.55, 0.7]
    expected = 0.0
    for (i, j), lam in zip(pairs, lams):
        (xi, yi), (xj, yj) = parts[i], parts[j]
        lg = logits_np(lam * xi + (1 - lam) * xj)
        expected += lam * ce_np(lg, yi) + (1 - lam) * ce_np(lg, yj)
    expected /= DOMAINS
    batches = [(torch.tensor(a).view(-1, D, 1, 1), torch.tensor(b)) for a, b in parts]
    assert float(mixup_objective(model, batches, pairs, lams)) == pytest.approx(expected, rel=1e-9)


def test_mixup_pairs_form_one_cycle_over_the_domains():
    torch.manual_seed(0)
    for k in (2, 3, 5):
        pairs = random_domain_pairs(k)
        assert sorted(i for i, _ in pairs) == list(range(k)) == sorted(j for _, j in pairs)
        nxt, at, seen = dict(pairs), pairs[0][0], set()
        for _ in range(k):
            seen.add(at)
            at = nxt[at]
        assert seen == set(range(k)) and at == pairs[0][0]


# -- SagNet ----------------------------------------------------------------------------------------
def randomize_np(z, what, alpha, perm, eps=1e-5):
    mean = z.mean(1, keepdims=True)
    var = z.var(1, ddof=1, keepdims=True)
    zn = (z - mean) / np.sqrt(var + eps)
    if what == "style":
        mean = alpha[:, None] * mean + (1 - alpha[:, None]) * mean[perm]
        var = alpha[:, None] * var + (1 - alpha[:, None]) * var[perm]
    else:
        zn = zn[perm]
    return zn * np.sqrt(var + eps) + mean


def test_sagnet_randomisations_and_losses_by_hand():
    z = np.array([[1.0, 3.0, -2.0], [0.5, 0.0, 4.0], [2.0, 2.5, 1.0]])
    alpha, perm = np.array([0.2, 0.7, 0.5]), np.array([2, 0, 1])
    for what in ("style", "content"):
        got = randomize(torch.tensor(z), what, torch.tensor(alpha), torch.tensor(perm))
        assert np.allclose(got.numpy(), randomize_np(z, what, alpha, perm), rtol=1e-10)
    # on the linear model: features (N, 2), content classifier W0, style classifier Ws
    x, y, d = batch(7)
    model = linear(M.SagNet, sag_w_adv=0.3)
    ws = np.array([[0.2, 0.4], [-0.5, 0.1], [0.9, -0.3]])
    with torch.no_grad():
        model.style_classifier = nn.Linear(D, K).double()
        model.style_classifier.weight.copy_(torch.tensor(ws))
        model.style_classifier.bias.zero_()
    n = len(x)
    alpha, perm = np.linspace(0.1, 0.9, n), np.roll(np.arange(n), 5)
    xt, yt, _ = tensors(x, y, d)
    loss_c = model.content_loss(xt, yt, torch.tensor(alpha), torch.tensor(perm))
    assert float(loss_c) == pytest.approx(ce_np(logits_np(randomize_np(x, "style", alpha, perm)), y), rel=1e-9)
    s = randomize_np(x, "content", alpha, perm) @ ws.T
    log_p = s - np.log(np.exp(s).sum(1, keepdims=True))
    adv = model.adversarial_loss(xt, torch.tensor(alpha), torch.tensor(perm))
    assert float(adv) == pytest.approx(-0.3 * log_p.mean(), rel=1e-9)


def test_sagnet_step_is_domainbeds_three_phase_update(monkeypatch):
    """One training step with SGD against the three phases replayed with plain autograd: content step
    (featuriser + content head), style step (style head, on the updated featuriser), adversarial step
    (featuriser only, against the updated style head)."""
    x, y, d = batch(8)
    xt, yt, dt = tensors(x, y, d)
    torch.manual_seed(0)
    model = M.SagNet(num_classes=K, backbone="resnet10t", sag_w_adv=0.4,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    model.backbone = nn.Sequential(nn.Flatten(), nn.Linear(D, D))
    model.backbone.num_features = D
    model.pixel_mean, model.pixel_std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    model.classifier, model.style_classifier = nn.Linear(D, K), nn.Linear(D, K)
    model.double()
    n = len(x)
    draws = [(torch.linspace(0.1, 0.9, n, dtype=torch.float64), torch.roll(torch.arange(n), s)) for s in (1, 2, 3)]
    it = iter(list(draws))
    monkeypatch.setattr(model, "_draws", lambda n, device: next(it))
    f = [p.detach().clone() for p in model.backbone[1].parameters()]
    c = [p.detach().clone() for p in model.classifier.parameters()]
    s = [p.detach().clone() for p in model.style_classifier.parameters()]
    opts = [torch.optim.SGD(list(model.backbone.parameters()), lr=0.1),
            torch.optim.SGD(list(model.classifier.parameters()), lr=0.1),
            torch.optim.SGD(list(model.style_classifier.parameters()), lr=0.1)]
    monkeypatch.setattr(model, "optimizers", lambda: opts)
    monkeypatch.setattr(model, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(model, "log_terms", lambda terms, n: None)
    monkeypatch.setattr(model, "step_schedulers", lambda interval: None)
    model.training_step((xt, yt, dt), 0)

    def feats(fw, fb):
        return xt.view(n, D) @ fw.T + fb

    def sgd(params, loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [p - 0.1 * (g if g is not None else 0) for p, g in zip(params, grads)]

    fw, fb = (p.requires_grad_() for p in f)
    cw, cb = (p.requires_grad_() for p in c)
    a, p = draws[0]
    loss_c = nn.functional.cross_entropy(randomize(feats(fw, fb), "style", a, p) @ cw.T + cb, yt)
    fw1, fb1, cw1, cb1 = sgd([fw, fb, cw, cb], loss_c)
    sw, sb = (q.requires_grad_() for q in s)
    a, p = draws[1]
    loss_s = nn.functional.cross_entropy(randomize(feats(fw1.detach(), fb1.detach()), "content", a, p) @ sw.T + sb, yt)
    sw1, sb1 = sgd([sw, sb], loss_s)
    fw1, fb1 = fw1.detach().requires_grad_(), fb1.detach().requires_grad_()
    a, p = draws[2]
    logits = randomize(feats(fw1, fb1), "content", a, p) @ sw1.detach().T + sb1.detach()
    loss_adv = -0.4 * nn.functional.log_softmax(logits, dim=1).mean()
    fw2, fb2 = sgd([fw1, fb1], loss_adv)
    for got, want in [(model.backbone[1].weight, fw2), (model.backbone[1].bias, fb2), (model.classifier.weight, cw1),
                      (model.style_classifier.weight, sw1)]:
        assert torch.allclose(got.detach(), want.detach(), atol=1e-12)
    assert not torch.allclose(fw2, fw1)  # the adversarial phase moved the featuriser


# -- Fish ------------------------------------------------------------------------------------------
def test_fish_update_by_hand():
    """Inner SGD steps domain by domain on a copy, then theta + meta_lr * (copy - theta); gradients of
    the linear softmax model by hand: dW = (p - onehot)^T x / n, db = mean(p - onehot)."""
    x, y, d = batch(9)
    model = linear(M.Fish, meta_lr=0.3)
    w, b = W0.copy(), B0.copy()
    for xk, yk in per_domain(x, y, d):
        lg = logits_np(xk, w, b)
        p = np.exp(lg - lg.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        err = p - np.eye(K)[yk]
        w, b = w - 0.2 * err.T @ xk / len(yk), b - 0.2 * err.mean(0)
    want_w, want_b = W0 + 0.3 * (w - W0), B0 + 0.3 * (b - B0)
    xt, yt, dt = tensors(x, y, d)
    from dg_lightning.methods.common import domain_minibatches

    losses = model.fish_step(torch.optim.SGD(model.parameters(), lr=0.2), domain_minibatches(xt, yt, dt))
    assert np.allclose(model.classifier.weight.detach().numpy(), want_w, atol=1e-12)
    assert np.allclose(model.classifier.bias.detach().numpy(), want_b, atol=1e-12)
    assert float(losses[0]) == pytest.approx(ce_np(logits_np(per_domain(x, y, d)[0][0]), per_domain(x, y, d)[0][1]))
    assert not np.allclose(want_w, W0 + (w - W0))  # meta_lr < 1: not the inner result


# -- DANN ------------------------------------------------------------------------------------------
def mlp_np(z, layers):
    h = z
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def test_dann_losses_by_hand():
    x, y, d = batch(10)
    model = linear(M.DANN, num_domains=None, dann_lambda=0.8, grad_penalty=0.3, mlp_width=4, mlp_depth=3)
    model._build_discriminator(DOMAINS)
    model.double()
    g = np.random.RandomState(1)
    layers = []
    with torch.no_grad():
        for lin in [m for m in model.discriminator.net if isinstance(m, nn.Linear)]:
            w, b = g.normal(size=lin.weight.shape), g.normal(size=lin.bias.shape) * 0.1
            lin.weight.copy_(torch.tensor(w))
            lin.bias.copy_(torch.tensor(b))
            layers.append((w, b))
    out = model.training_losses(*tensors(x, y, d))

    def disc_sum(z):  # summed domain CE as a function of the features
        return ce_np(mlp_np(z, layers), d) * len(d)

    h = 1e-6
    grad = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(D):
            e = np.zeros_like(x)
            e[i, j] = h
            grad[i, j] = (disc_sum(x + e) - disc_sum(x - e)) / (2 * h)
    gp = np.mean((grad**2).sum(1))
    disc = ce_np(mlp_np(x, layers), d) + 0.3 * gp
    ce = ce_np(logits_np(x), y)
    assert gp > 1e-3 and float(out["grad_penalty"]) == pytest.approx(gp, rel=1e-6)
    assert float(out["disc"]) == pytest.approx(disc, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(ce - 0.8 * disc, rel=1e-6)


def test_dann_alternates_discriminator_and_generator_steps_as_domainbed():
    model = linear(M.DANN, num_domains=DOMAINS, d_steps_per_g_step=3)
    assert [model.is_discriminator_step(t) for t in range(1, 9)] == [True, True, False, True, True, True, False, True]
    model = linear(M.DANN, num_domains=None, d_steps_per_g_step=1)
    model._build_discriminator(DOMAINS)
    model.double()
    snap = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit_steps(model, 1)  # update 1: 1 % 2 < 1 is false -> a generator step
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, snap[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    snap = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit_steps(model, 1)  # a fresh fit: update 2 (the counter is a buffer) -> a discriminator step
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, snap[k])}
    assert int(model.update_count) == 2 and changed and all(k.startswith("discriminator.") for k in changed)


def test_dann_refuses_an_optimizer_it_would_ignore():
    with pytest.raises(ValueError, match="lr_g"):
        M.DANN(num_classes=K, backbone="resnet10t", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


# -- MixStyle --------------------------------------------------------------------------------------
def test_mix_style_by_hand():
    g = np.random.RandomState(0)
    x = g.normal(size=(3, 2, 2, 3)) * np.array([1.0, 3.0])[None, :, None, None] + 2.0
    lam, perm = np.array([0.25, 0.6, 0.9]), np.array([1, 2, 0])
    got = mix_style(torch.tensor(x), torch.tensor(lam), torch.tensor(perm)).numpy()
    mu = x.mean(axis=(2, 3), keepdims=True)
    sig = np.sqrt(x.var(axis=(2, 3), ddof=1, keepdims=True) + 1e-6)
    lam4 = lam[:, None, None, None]
    want = (x - mu) / sig * (lam4 * sig + (1 - lam4) * sig[perm]) + lam4 * mu + (1 - lam4) * mu[perm]
    assert np.allclose(got, want, rtol=1e-10)
    assert not np.allclose(want, x)


def test_mixstyle_after_the_chosen_stages_only_in_training():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * torch.tensor([0.1, 1.0, 0.5, 0.3]).view(4, 1, 1, 1)
    plain = M.ERM(num_classes=K, backbone="resnet10t")
    mixed = M.ERM(num_classes=K, backbone="resnet10t", mixstyle_stages=[1, 2], mixstyle_p=1.0, mixstyle_alpha=5.0)
    mixed.load_state_dict(plain.state_dict())  # no new parameters: same state dict
    plain.eval(), mixed.eval()
    assert torch.equal(plain(x), mixed(x))
    plain.train(), mixed.train()
    torch.manual_seed(1)
    a = mixed(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, plain(x))
    names = insert_mixstyle(M.ERM(num_classes=K, backbone="resnet10t").backbone, [1, 2, 3])
    assert names == ["layer1", "layer2", "layer3"]
    with pytest.raises(ValueError, match="stage 7 does not exist"):
        M.ERM(num_classes=K, backbone="resnet10t", mixstyle_stages=[7])
    assert M.MixStyle(num_classes=K, backbone="resnet10t").hparams.mixstyle_stages == [1, 2, 3]


def test_mixstyle_on_the_segmentation_encoder():
    torch.manual_seed(0)
    model = M.ERM(num_classes=K, backbone="resnet10t", task="segmentation", mixstyle_stages=[1], mixstyle_p=1.0,
                  mixstyle_alpha=5.0)  # lam near 0.5: a visible mix (alpha 0.1 draws lam near 0 or 1)
    x = torch.rand(4, 3, 64, 64) * torch.tensor([0.1, 1.0, 0.5, 0.3]).view(4, 1, 1, 1)  # four different styles
    model.eval()
    ref = model(x)
    model.train()
    for m in model.modules():  # only MixStyle may differ between modes (not BatchNorm, not ASPP's dropout)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
    assert not torch.allclose(model(x), ref)


# -- every baseline trains on the fake PACS tree ---------------------------------------------------
BASELINES = ["CORAL", "MMD", "DANN", "IRM", "VREx", "GroupDRO", "Mixup", "SagNet", "Fish", "MixStyle"]


@pytest.mark.parametrize("name", BASELINES)
def test_smoke_fit_on_fake_pacs(name, fake_pacs, tmp_path):
    from dg_lightning.data import PACS

    L.seed_everything(0, verbose=False)
    dm = PACS(root=str(fake_pacs), test_domains=["sketch"], batch_size=2, image_size=32, steps_per_epoch=2,
              augment="none")
    extra = {"IRM": {"irm_penalty_anneal_iters": 1}, "VREx": {"vrex_penalty_anneal_iters": 1}}.get(name, {})
    model = getattr(M, name)(num_classes=7, backbone="resnet10t", **extra)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and torch.isfinite(m["val/loss"]) and "val/cartoon/loss" in m
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # it learned something
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0 <= float(trainer.callback_metrics["test/sketch/acc"]) <= 1
