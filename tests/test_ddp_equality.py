"""DDP on 2 CPU processes (gloo) against one process, on the same global batches:

* per-domain metrics (accuracy per source and held-out domain) and WILDS' official metrics per split;
* the GCISG queue: every rank holds the same queue, and it holds the same keys as the single
  process's (the keys of both ranks' halves of the global batch);
* DDM's pseudo-domains (k-means on rank 0, broadcast): the single process's labels on every rank;
* RISE's cached class and anchor text embeddings: the single process's on every rank;
* the multi-space losses (SimCLR and VICReg multi-head, with the content-space terms): the loss
  function on each rank's rows of one global batch (mean over ranks = the single process's loss;
  each rank's gradient / 2 = the single process's gradient of its rows), and one training step
  of ``MultiSpace`` with batch norm in eval mode (loss, every parameter's gradient after DDP's
  averaging, the lambdas after the dual step).

The single process takes batches of 4 per domain, each DDP rank 2: ``DomainBalancedSampler`` gives
rank r the r-th half of the single process's batch. GCISG's teacher runs in eval mode and its views
are seeded per sample in the loader, so a key depends on its image only, not on the batch it came with.
"""

import subprocess
import sys

import pytest
import torch

from tests.conftest import subprocess_env

SCRIPT = r'''
import json, sys
import lightning as L
import torch
from torch import nn
from dg_lightning.data import SyntheticShapes
from dg_lightning.methods import DDM, ERM, GCISG, RISE, MultiSpace
from dg_lightning.methods.multispace import multispace_simclr_loss, multispace_vicreg_loss

out, devices = sys.argv[1], int(sys.argv[2])
batch = 4 // devices


def trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     use_distributed_sampler=False, **kw)


def data(**kw):
    return SyntheticShapes(per_class=6, test_domains=["cartoon"], batch_size=batch, eval_batch_size=5, image_size=32,
                           split_seed=0, **kw)


def save(name, obj):
    torch.save(obj, f"{out}/{name}_rank{torch.distributed.get_rank() if devices > 1 else 0}.pt")


def metrics(t):
    return {k: float(v) for k, v in t.callback_metrics.items()}


# 1. per-domain metrics of one model
L.seed_everything(0)
dm = data()
model = ERM(num_classes=dm.num_classes, backbone="resnet10t")
t = trainer()
t.validate(model, datamodule=dm, verbose=False)
m = metrics(t)
t.test(model, datamodule=dm, verbose=False)
save("metrics", {**m, **metrics(t)})

# 2. WILDS official metrics per split (predictions gathered over ranks)
from dg_lightning.data import WILDS
L.seed_everything(0)
dm = WILDS(dataset="camelyon17", root=sys.argv[3], batch_size=batch, eval_batch_size=5, image_size=32)
model = ERM(num_classes=dm.num_classes, backbone="resnet10t")
t = trainer(callbacks=dm.callbacks())
t.test(model, datamodule=dm, verbose=False)
save("wilds", metrics(t))

# 3. GCISG queue after one step
L.seed_everything(0)
dm = data()
model = GCISG(num_classes=dm.num_classes, backbone="resnet10t", queue_size=64, emb_dim=8)
model.teacher.eval()  # Lightning keeps each submodule's mode: keys independent of the batch
trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
save("gcisg", {f"queue{i}": (q.embeddings.detach().clone(), int(q.ptr)) for i, q in enumerate(model.queues)})

# 4. DDM pseudo-domains
L.seed_everything(0)
dm = data()
model = DDM(num_classes=dm.num_classes, backbone="resnet10t", ssl="simclr", ssl_args={"hidden_dim": 16, "out_dim": 8},
            domain_labels="pseudo", pseudo_domains=3)
trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
save("ddm", model.pseudo_labels.cpu())

# 5. RISE text cache
L.seed_everything(0)
dm = data()
model = RISE(num_classes=dm.num_classes, backbone="resnet10t", clip_model="ViT-B-32", clip_pretrained=None,
             clip_image_size=32)
trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
save("rise", {"class_text": model.class_text.cpu(), "anchors": model.anchors.cpu()})

# 6. multi-space: one training step (batch norm in eval mode: SyncBatchNorm needs GPUs, and with batch
# statistics per rank the forward pass would not be the global batch's)
class Record(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after DDP's gradient averaging
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = outputs["loss"].detach().clone()


for loss_name in ("simclr", "vicreg"):
    L.seed_everything(0)
    dm = data()
    model = MultiSpace(num_classes=dm.num_classes, backbone="resnet10t", style_groups=["color", "crop"], proj_hidden=16,
                       proj_dim=12, loss=loss_name, add_cont_neg=True, dual_ascent=True, dual_lr=0.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # Lightning keeps each submodule's mode
    rec = Record()
    trainer(max_steps=1, limit_val_batches=0, callbacks=[rec]).fit(model, datamodule=dm)
    save(f"multispace_{loss_name}", {"loss": rec.loss, "grads": rec.grads, "lambdas": model.lambdas.detach().cpu()})

# 7. multi-space: the loss functions on each rank's rows of one global batch of 6
rank = torch.distributed.get_rank() if devices > 1 else 0
g = torch.Generator().manual_seed(0)
views = [torch.randn(6, 10, generator=g) for _ in range(4)]
fns = {"simclr": lambda v: multispace_simclr_loss(v, [4, 3, 3], [1.0, 0.5, 2.0], 0.15, add_cont_neg=True),
       "vicreg": lambda v: multispace_vicreg_loss(v, [4, 3, 3], [25.0, 10.0, 5.0], add_cont_neg=True)}
res = {}
for name, fn in fns.items():
    local = [v[rank * 6 // devices:(rank + 1) * 6 // devices].clone().requires_grad_(True) for v in views]
    loss, misalignment = fn(local)
    loss.backward()
    res[name] = {"loss": loss.detach(), "misalignment": misalignment, "grads": [v.grad for v in local]}
save("multispace_fn", res)
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.wilds_trees import camelyon17

    root = tmp_path_factory.mktemp("ddp")
    pytest.importorskip("wilds")
    camelyon17(root / "wilds")
    script = root / "ddp_equality.py"
    script.write_text(SCRIPT)
    for name, devices in (("single", 1), ("ddp", 2)):
        (root / name).mkdir()
        proc = subprocess.run([sys.executable, str(script), str(root / name), str(devices), str(root / "wilds")],
                              env=subprocess_env(), capture_output=True, text=True, cwd=root, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _load(runs, name):
    one = torch.load(runs / "single" / f"{name}_rank0.pt", weights_only=False)
    return one, [torch.load(runs / "ddp" / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_per_domain_metrics_equal_one_process(runs):
    one, ddp = _load(runs, "metrics")
    keys = [k for k in one if k.endswith("/acc")]
    assert {"val/photo/acc", "val/painting/acc", "test/cartoon/acc"} <= set(keys)
    for r in ddp:
        assert {k: r[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-6)


@pytest.mark.slow
def test_wilds_official_metrics_equal_one_process(runs):
    one, ddp = _load(runs, "wilds")
    keys = [k for k in one if "/official/" in k]
    assert {"test/id_val/official/acc_avg", "test/val/official/acc_avg", "test/test/official/acc_avg"} <= set(keys)
    for r in ddp:
        assert {k: r[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-6)


@pytest.mark.slow
def test_gcisg_queue_is_shared_and_holds_every_ranks_keys(runs):
    one, (r0, r1) = _load(runs, "gcisg")
    for name, (q1, ptr1) in one.items():
        (qa, pa), (qb, pb) = r0[name], r1[name]
        assert torch.equal(qa, qb) and pa == pb  # every rank holds the same queue
        assert pa == ptr1 == 2 * 12  # symmetric loss: two enqueues of the global batch (3 domains x 4)
        new_one, new_ddp = q1[:ptr1], qa[:pa]
        # the same keys, in rank order: match every DDP key to its single-process twin
        d = torch.cdist(new_ddp, new_one)
        assert d.min(dim=1).values.max() < 1e-4 and d.min(dim=0).values.max() < 1e-4
        assert torch.equal(q1[ptr1:], qa[pa:])  # the untouched rest of the queue


@pytest.mark.slow
def test_ddm_pseudo_domains_equal_one_process(runs):
    one, ddp = _load(runs, "ddm")
    assert len(one) > 0 and len(set(one.tolist()) - {-1}) == 3
    for r in ddp:
        assert torch.equal(r, one)


@pytest.mark.slow
def test_rise_text_cache_equals_one_process(runs):
    one, ddp = _load(runs, "rise")
    assert one["class_text"].abs().sum() > 0 and one["anchors"].shape[1] > 0
    for r in ddp:
        assert torch.allclose(r["class_text"], one["class_text"], atol=1e-6)
        assert torch.allclose(r["anchors"], one["anchors"], atol=1e-6)



@pytest.mark.slow
def test_multispace_loss_functions_equal_one_process(runs):
    """Catches: no gather (each rank contrasts and normalises its own rows only), a gather without
    gradients, VICReg statistics per rank."""
    one, ddp = _load(runs, "multispace_fn")
    for name in ("simclr", "vicreg"):
        ranks = [r[name] for r in ddp]
        assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(one[name]["loss"].item(), abs=1e-5)
        mis = (ranks[0]["misalignment"] + ranks[1]["misalignment"]) / 2
        assert torch.allclose(mis, one[name]["misalignment"], atol=1e-6)
        for v, g1 in enumerate(one[name]["grads"]):
            g_ddp = torch.cat([ranks[0]["grads"][v], ranks[1]["grads"][v]]) / 2  # d(sum of rank losses) / 2
            assert g1.abs().sum() > 0 and torch.allclose(g_ddp, g1, rtol=1e-4, atol=1e-7), (name, v)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simclr", "vicreg"])
def test_multispace_training_step_equals_one_process(runs, loss):
    one, ddp = _load(runs, f"multispace_{loss}")
    assert (ddp[0]["loss"] + ddp[1]["loss"]).item() / 2 == pytest.approx(one["loss"].item(), rel=1e-4)
    assert set(one["grads"]) == set(ddp[0]["grads"]) and any("projector" in n for n in one["grads"])
    for r in ddp:
        assert torch.equal(r["lambdas"], ddp[0]["lambdas"])  # every rank took the same dual step
        assert torch.allclose(r["lambdas"], one["lambdas"], atol=1e-6) and not torch.equal(one["lambdas"], torch.tensor(
            [1.0, 1.0, 1.0] if loss == "simclr" else [25.0, 25.0, 25.0]))
        for n, g1 in one["grads"].items():
            assert torch.allclose(r["grads"][n], g1, rtol=1e-3, atol=1e-6), n
