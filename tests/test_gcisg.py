import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from dg_lightning.data import SyntheticShapes
from dg_lightning.methods.gcisg import (
    GCISG,
    EmbeddingQueue,
    GCISGPhotometricRandAugment,
    GCISGRandAugment,
    StyleViews,
    attention_pool,
    ema_update,
    guidance_loss,
    relational_ci_loss,
)


def _xent(p, logits):
    z = sum(math.exp(v) for v in logits)
    return -sum(pj * (lj - math.log(z)) for pj, lj in zip(p, logits))


def test_relational_ci_loss_by_hand():
    queue = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    q = torch.tensor([[1.0, 0, 0, 0], [0.6, 0, 0.8, 0]])
    k = torch.tensor([[0, 1.0, 0, 0], [0, 1.0, 0, 0]])
    # sample 1: student logits (1, 0, 0)/0.5, teacher logits (0, 1, 0)/0.25
    z1 = 2 + math.exp(4)
    l1 = _xent([1 / z1, math.exp(4) / z1, 1 / z1], [2.0, 0.0, 0.0])
    # sample 2: student logits (0.6, 0, 0.8)/0.5, teacher (0, 1, 0)/0.25
    # (chosen so the two samples' dependence on tau_k does not cancel, as a mirrored pair would)
    z2 = 2 + math.exp(4)
    l2 = _xent([1 / z2, math.exp(4) / z2, 1 / z2], [1.2, 0.0, 1.6])
    got = relational_ci_loss(q, k, queue, tau_q=0.5, tau_k=0.25)
    assert float(got) == pytest.approx((l1 + l2) / 2, rel=1e-6)
    assert float(relational_ci_loss(q, k, queue, tau_q=0.5, tau_k=0.5)) != pytest.approx(float(got), rel=1e-3)


def test_ci_loss_does_not_differentiate_the_teacher():
    q = torch.randn(2, 4, requires_grad=True)
    k = torch.randn(2, 4, requires_grad=True)
    relational_ci_loss(q, k, torch.randn(3, 4), 0.12, 0.04).backward()
    assert q.grad is not None and k.grad is None


def test_attention_pool_by_hand():
    # one sample, 2 channels, 1 x 2 positions: F = [1, 0] and [1, 2]; GAP = [1, 1]
    f = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]]])
    # a = (1, 3) / 4 -> p = 0.25 [1, 0] + 0.75 [1, 2] = [1, 1.5]
    assert torch.allclose(attention_pool(f), torch.tensor([[1.0, 1.5]]))


def test_guidance_loss_by_hand():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 2, 1, 1)  # 1x1 maps: p = the vector
    guide = torch.tensor([[4.0, 3.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    # N(p): (0.6, 0.8) vs (0.8, 0.6), and equal rows -> ||(-0.2, 0.2; 0, 0)||_F = sqrt(0.08)
    assert float(guidance_loss(student, guide)) == pytest.approx(math.sqrt(0.08), rel=1e-6)


def test_queue_enqueue_wraps_around():
    queue = EmbeddingQueue(dim=2, size=5)
    assert torch.allclose(queue.embeddings.norm(dim=1), torch.ones(5))
    first = torch.arange(6.0).view(3, 2)
    second = -torch.arange(1.0, 7.0).view(3, 2)
    queue.enqueue(first)
    assert int(queue.ptr) == 3 and torch.equal(queue.embeddings[:3], first)
    old = queue.embeddings[3:].clone()
    queue.enqueue(second)
    assert int(queue.ptr) == 1
    assert torch.equal(queue.embeddings[3:], second[:2]) and torch.equal(queue.embeddings[0], second[2])
    assert torch.equal(queue.embeddings[1:3], first[1:]) and not torch.equal(queue.embeddings[3:], old)


def test_ema_update():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    torch.nn.init.constant_(teacher.weight, 1.0)
    torch.nn.init.constant_(student.weight, 0.0)
    ema_update(teacher, student, 0.996)
    assert torch.allclose(teacher.weight, torch.full_like(teacher.weight, 0.996))


def _tiny(**kw):
    return GCISG(num_classes=6, backbone="resnet10t", queue_size=32, emb_dim=8, **kw)


def test_training_losses_terms_and_queue():
    torch.manual_seed(0)
    m = _tiny().train()
    x, y = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)], torch.randint(0, 6, (4,))
    out = m.training_losses(x, y, None)
    assert set(out) == {"loss", "ce", "guidance", "ci_12", "ci_21"}
    assert torch.allclose(out["loss"], out["ce"] + out["ci_12"] + out["ci_21"] + out["guidance"])
    assert [int(q.ptr) for q in m.queues] == [8, 8]  # two CI terms x 4 teacher keys per stage
    assert torch.allclose(m.queues[0].embeddings[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in m.guide.parameters()) and all(p.grad is None for p in m.teacher.parameters())
    assert all(not b.training for b in m.guide.modules())


def test_fit_moves_the_teacher_by_ema_and_keeps_the_guide(tmp_path):
    L.seed_everything(0)
    dm = SyntheticShapes(per_class=8, test_domains=["sketch"], batch_size=2, steps_per_epoch=2, split_seed=0)
    m = _tiny()
    guide0 = [p.clone() for p in m.guide.parameters()]
    teacher0 = [p.clone() for p in m.teacher.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(guide0, m.guide.parameters()))
    moved = [not torch.equal(a, b) for a, b in zip(teacher0, m.teacher.parameters())]
    assert any(moved)
    # after 2 steps the teacher is 0.996^2 of its start plus student mass: it is close to where it began
    w0, w = teacher0[0], next(m.teacher.parameters())
    assert (w - w0).abs().max() < 0.05
    assert {"train/ci_12_epoch", "train/guidance_epoch", "val/acc"} <= set(trainer.callback_metrics)


# -- the views: made per sample in the data loader ---------------------------------------------------
def _shapes(**kw):
    return SyntheticShapes(per_class=4, test_domains=["sketch"], batch_size=2, steps_per_epoch=1, split_seed=0,
                           image_size=32, **kw)


def test_views_are_made_per_sample_by_the_loader_and_seeded():
    dm = _shapes()
    m = _tiny()
    m.bind_data(dm)
    assert isinstance(dm.train_transform, StyleViews)
    loader = dm.train_dataloader()
    x, y, _, _ = next(iter(loader))
    assert isinstance(x, list) and len(x) == 2
    assert x[0].shape == x[1].shape == (6, 3, 32, 32) and x[0].dtype == torch.float32
    assert not torch.equal(x[0], x[1])  # two independent randomisations
    again = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(again[0], x[0]) and torch.equal(again[1], x[1])  # seeded per sample
    # each sample's two views are its dataset item under the sampler's per-sample seed
    for j, key in enumerate(list(loader.sampler)[:6]):
        views = loader.dataset[key][0]
        assert torch.equal(views[0], x[0][j]) and torch.equal(views[1], x[1][j])


def test_training_step_takes_the_loader_views_as_they_are():
    torch.manual_seed(0)
    m = _tiny().eval()  # BatchNorm on running statistics: the logits of x2 can be recomputed
    x1, x2, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.randint(0, 6, (4,))
    out = m.training_losses([x1, x2], y, None)
    assert torch.allclose(out["ce"], F.cross_entropy(m(x2), y), atol=1e-6)  # CE on x2 itself, not re-augmented
    with pytest.raises(ValueError, match="train_views"):
        m.training_losses(x1, y, None)


# -- the official RandAugment (GCISG/GCISG data/transforms/rand_augment.py), written with PIL ---------
OFFICIAL_OPS = {"Identity", "AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
                "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def _official(img: Image.Image, op: str, magnitude: int, sign: int) -> Image.Image:
    """The official op at level v = m/30 of its range, with sign ``sign`` for the signed ops."""
    v = magnitude / 30
    affine = {"ShearX": (1, sign * 0.3 * v, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * 0.3 * v, 1, 0),
              "TranslateX": (1, 0, sign * 100 * v, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, sign * 100 * v)}
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if op == "Identity":
        return img
    if op in affine:
        return img.transform(img.size, Image.AFFINE, affine[op])
    if op in enhance:
        return enhance[op](img).enhance(1 + sign * 0.9 * v)
    if op == "Rotate":
        return img.rotate(sign * 30 * v)
    if op == "Posterize":
        return ImageOps.posterize(img, max(1, 8 - int(7 * v)))
    if op == "Solarize":
        return ImageOps.solarize(img, 256 - 256 * v)
    return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize}[op](img)


def _forced(aug: GCISGRandAugment, op: str, monkeypatch):
    monkeypatch.setattr(aug, "_get_random_item", lambda space: (op, space[op]))


@pytest.mark.parametrize("magnitude", [6, 9, 17])
def test_randaugment_ops_are_the_official_ones(magnitude, monkeypatch):
    img = Image.fromarray(np.random.RandomState(magnitude).randint(0, 256, (48, 64, 3), dtype=np.uint8))
    aug = GCISGRandAugment(num_ops=1, magnitude=magnitude)
    assert set(aug._AUGMENTATION_SPACE) == OFFICIAL_OPS
    for op in sorted(OFFICIAL_OPS - {"AutoContrast", "Equalize"}):
        _forced(aug, op, monkeypatch)
        outputs = set()
        for seed in range(20):  # signed ops: both signs show up
            torch.manual_seed(seed)
            outputs.add(np.asarray(aug(img)).tobytes())
        signed = op.startswith(("Shear", "Translate", "Rotate", "Color", "Contrast", "Brightness", "Sharpness"))
        expected = {np.asarray(_official(img, op, magnitude, s)).tobytes() for s in ((1, -1) if signed else (1,))}
        assert outputs == expected, op


def test_autocontrast_and_equalize_act_with_probability_magnitude_over_30(monkeypatch):
    img = Image.fromarray(np.random.RandomState(0).randint(40, 200, (24, 32, 3), dtype=np.uint8))
    for magnitude in (6, 15):
        aug = GCISGRandAugment(num_ops=1, magnitude=magnitude)
        for op in ("AutoContrast", "Equalize"):
            _forced(aug, op, monkeypatch)
            done = np.asarray(_official(img, op, magnitude, 1)).tobytes()
            applied = 0
            for seed in range(400):
                torch.manual_seed(seed)
                out = np.asarray(aug(img)).tobytes()
                assert out in (done, np.asarray(img).tobytes())
                applied += out == done
            assert applied / 400 == pytest.approx(magnitude / 30, abs=0.07), op  # 3.5 binomial sd


def test_segmentation_draws_the_photometric_official_ops():
    m = GCISG(num_classes=19, backbone="resnet10t", task="segmentation", decoder_channels=16, queue_size=32, emb_dim=8)
    views = m.train_views(32)
    assert isinstance(views.augment, GCISGPhotometricRandAugment)
    assert set(views.augment._AUGMENTATION_SPACE) == OFFICIAL_OPS - {"ShearX", "ShearY", "TranslateX",
                                                                     "TranslateY", "Rotate"}
    crop = np.random.RandomState(0).randint(0, 256, (16, 24, 3), dtype=np.uint8)
    out = views(crop)
    assert len(out) == 2 and out[0].shape == (3, 16, 24) and out[0].dtype == torch.float32


# -- the EMA teacher: updated before the optimiser step (official _post_training_step) ---------------
@pytest.mark.parametrize("before", [True, False])
def test_ema_update_before_or_after_the_optimiser_step(before, tmp_path):
    L.seed_everything(0)
    m = _tiny(ema_momentum=0.5, ema_before_step=before, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    snaps = []  # (student, teacher) weights at the start of each batch, and at the end

    def snap():
        snaps.append(([p.detach().clone() for p in m.backbone.parameters()],
                      [p.detach().clone() for p in m.teacher.parameters()]))

    class Snap(L.Callback):
        def on_train_batch_start(self, *args):
            snap()

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[Snap()])
    trainer.fit(m, datamodule=_shapes())
    snap()
    (th0, xi0), (th1, xi1), (th2, xi2) = snaps
    assert any(not torch.allclose(a, b) for a, b in zip(th0, th1))  # the student moved
    # before the step: xi_t+1 = m xi_t + (1 - m) theta_t; after: ... + (1 - m) theta_t+1
    for t, (xi_prev, xi_next) in enumerate([(xi0, xi1), (xi1, xi2)]):
        theta = (th0, th1)[t] if before else (th1, th2)[t]
        for a, b, s in zip(xi_next, xi_prev, theta, strict=True):
            assert torch.allclose(a, 0.5 * b + 0.5 * s, atol=1e-6)

