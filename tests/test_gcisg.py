import math

import lightning as L
import pytest
import torch

from dg_lightning.data import SyntheticShapes
from dg_lightning.methods.gcisg import (
    GCISG,
    EmbeddingQueue,
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
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 6, (4,))
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
