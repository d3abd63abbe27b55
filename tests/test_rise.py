import math

import pytest
import torch

from dg_lightning.methods.rise import (
    ANCHOR_TEMPLATE,
    RISE,
    TEMPLATES,
    absolute_distance_loss,
    kd_loss,
    relative_distance_loss,
)

CLASSES = ["dog", "elephant", "guitar"]
SOURCES = ["art_painting", "cartoon"]


def _softmax(v):
    z = sum(math.exp(a) for a in v)
    return [math.exp(a) / z for a in v]


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    tau = 2.0
    expected = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        p = _softmax([v / tau for v in ti])
        q = _softmax([v / tau for v in si])
        expected += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    expected = expected / 2 * tau**2
    assert float(kd_loss(s, t, tau)) == pytest.approx(expected, rel=1e-5)  # float32


def test_absolute_distance_by_hand():
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(absolute_distance_loss(e, text)) == pytest.approx((0 + 1 - 1 / math.sqrt(2)) / 2, rel=1e-6)


def test_relative_distance_by_hand():
    e = torch.tensor([[1.0, 0.0]])
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    raw = torch.tensor([[2.0, 1.0]])
    student = _softmax([1.0, 0.0])                            # cos(e, A) = (1, 0)
    teacher = _softmax([2 / math.sqrt(5), 1 / math.sqrt(5)])  # cos(T~, A): unequal, so its scale matters
    expected = 10 * sum((a - b) ** 2 for a, b in zip(student, teacher)) / 2
    assert float(relative_distance_loss(e, raw, anchors)) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def rise():
    torch.manual_seed(0)
    return RISE(num_classes=3, backbone="resnet10t", clip_model="ViT-B-32", clip_pretrained=None,
                clip_image_size=32, w_kd=0.8, w_ce=0.2, w_dist=2.0)


def test_text_embeddings_are_cached_once(rise, monkeypatch):
    calls = []
    real = rise.encode_text
    monkeypatch.setattr(rise, "encode_text", lambda s: calls.append(list(s)) or real(s))
    rise.text_cache_key = None
    rise.cache_text_embeddings(CLASSES, SOURCES)
    assert len(calls) == len(TEMPLATES) + len(SOURCES)
    assert calls[0] == ["itap of a dog.", "itap of a elephant.", "itap of a guitar."]
    assert calls[-1] == [ANCHOR_TEMPLATE.format(d="cartoon", c=c) for c in CLASSES]
    # T~ is the mean over templates, T its normalised copy, A one anchor per source domain
    manual = torch.stack([real([t.format(c="elephant")])[0] for t in TEMPLATES]).mean(0)
    assert torch.allclose(rise.class_text_raw[1], manual, atol=1e-5)
    assert torch.allclose(rise.class_text.norm(dim=1), torch.ones(3), atol=1e-6)
    assert rise.anchors.shape == (3, 2, rise.class_text.shape[1])
    assert torch.allclose(rise.anchors[2, 0], real(["a art_painting of a guitar"])[0], atol=1e-5)
    calls.clear()
    rise.cache_text_embeddings(CLASSES, SOURCES)  # same names: nothing recomputed
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    rise.training_losses(x, y, None)  # training steps never encode text
    assert calls == []


def test_total_loss_is_the_weighted_sum(rise):
    rise.cache_text_embeddings(CLASSES, SOURCES)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = rise.training_losses(x, y, None)
    assert set(out) == {"loss", "ce", "kd", "ad", "rd"}
    expected = 0.8 * out["kd"] + 0.2 * out["ce"] + 2.0 * (out["ad"] + out["rd"])
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is None for p in rise.teacher.parameters())
    assert rise.projector.weight.grad is not None


def test_fit_initialises_the_classifier_from_text(tmp_path):
    import lightning as L

    from dg_lightning.data import SyntheticShapes

    L.seed_everything(0)
    dm = SyntheticShapes(per_class=6, test_domains=["sketch"], batch_size=2, steps_per_epoch=1, split_seed=0)
    m = RISE(num_classes=dm.num_classes, backbone="resnet10t", clip_model="ViT-B-32", clip_pretrained=None,
             clip_image_size=32, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    assert m.text_cache_key == (tuple(dm.classes), tuple(dm.train_domains))
    assert torch.allclose(m.classifier.weight, m.class_text)  # lr 0: still the text initialisation
    assert {"train/kd_epoch", "train/rd_epoch", "val/acc"} <= set(trainer.callback_metrics)


def _prompts(rise, monkeypatch, **options):
    """The sentences encoded for classes (dog, alarm_clock) and sources (art_painting, cartoon), with
    the model's defaults changed by ``options``."""
    for k, v in options.items():
        monkeypatch.setitem(rise.hparams, k, v)
    calls = []
    real = rise.encode_text
    monkeypatch.setattr(rise, "encode_text", lambda s: calls.append(list(s)) or real(s))
    rise.text_cache_key = None
    rise.cache_text_embeddings(["dog", "alarm_clock"], ["art_painting", "cartoon"])
    return calls


def test_prompts_write_names_as_the_data_gives_them(rise, monkeypatch):
    """Official train_rise.py: f"a {source} of a {c}" with the domain and class names as listed
    ("art_painting"); readable_names writes "art painting"; anchor_names replaces the domains."""
    calls = _prompts(rise, monkeypatch)
    assert calls[0] == ["itap of a dog.", "itap of a alarm_clock."]
    assert calls[len(TEMPLATES):] == [["a art_painting of a dog", "a art_painting of a alarm_clock"],
                                      ["a cartoon of a dog", "a cartoon of a alarm_clock"]]
    calls = _prompts(rise, monkeypatch, readable_names=True)
    assert calls[0] == ["itap of a dog.", "itap of a alarm clock."]
    assert calls[len(TEMPLATES)] == ["a art painting of a dog", "a art painting of a alarm clock"]
    calls = _prompts(rise, monkeypatch, readable_names=False, anchor_names=["bright photo", "dark photo", "good photo"])
    assert [c[0] for c in calls[len(TEMPLATES):]] == ["a bright photo of a dog", "a dark photo of a dog",
                                                      "a good photo of a dog"]


def test_a_checkpoint_keeps_its_trained_classifier(tmp_path):
    """The classifier starts from the class text at a fresh fit only: a model loaded from a checkpoint
    and tested (setup -> bind_data) or resumed (ckpt_path) keeps the trained one."""
    import lightning as L

    from dg_lightning.data import SyntheticShapes

    def trainer():
        return L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         limit_val_batches=0, default_root_dir=tmp_path)

    def build():
        return RISE(num_classes=6, backbone="resnet10t", clip_model="ViT-B-32", clip_pretrained=None,
                    clip_image_size=32, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))

    L.seed_everything(0)
    dm = SyntheticShapes(per_class=4, test_domains=["sketch"], batch_size=2, steps_per_epoch=1, split_seed=0,
                         image_size=32)
    m = build()
    t = trainer()
    t.fit(m, datamodule=dm)
    trained = m.classifier.weight.detach().clone()
    assert not torch.allclose(trained, m.class_text, atol=1e-3)  # it trained away from the text
    ckpt = tmp_path / "trained.ckpt"
    t.save_checkpoint(ckpt)

    loaded = RISE.load_from_checkpoint(ckpt)
    trainer().test(loaded, datamodule=dm, verbose=False)
    assert torch.equal(loaded.classifier.weight, trained)
    resumed = build()
    trainer().fit(resumed, datamodule=dm, ckpt_path=ckpt)  # already at max_epochs: restores, trains no more
    assert torch.equal(resumed.classifier.weight, trained)
