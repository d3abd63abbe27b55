"""DomainBedRecords: every validation of a fit appends the held-out domains' "in"/"out" accuracies."""

import json

import lightning as L
import torch

from dg_lightning.core.records import DomainBedRecords, read_records
from dg_lightning.data.mnist import ColoredMNIST
from dg_lightning.methods import ERM
from tests.mnist_trees import id_images, write_mnist


def test_records_hold_each_split_accuracy_at_each_validation(tmp_path):
    root = write_mnist(tmp_path / "m", *id_images(300), 200)
    dm = ColoredMNIST(root=str(root), test_domains=["+80%", "-90%"], batch_size=8, eval_batch_size=16,
                      steps_per_epoch=3, shuffle_seed=0, split_seed=0)
    model = ERM(num_classes=2, backbone="domainbed_mnist_cnn", backbone_args={"in_chans": 2})
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path / "run", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DomainBedRecords()], num_sanity_val_steps=1)
    trainer.fit(model, datamodule=dm)
    records = read_records(tmp_path / "run")
    assert [(r["step"], r["epoch"]) for r in records] == [(3, 0), (6, 1)]  # no record for the sanity check
    last = records[-1]
    assert set(last["val"]) == {"+90%"} and set(last["test_in"]) == set(last["test_out"]) == {"+80%", "-90%"}
    model.eval()
    with torch.no_grad():  # the final weights, scored here independently
        for d in ("+80%", "-90%"):
            for part, key in (("in", "test_in"), ("out", "test_out")):
                ds = dm.dataset(d, part)
                x = torch.stack([ds[i][0] for i in range(len(ds))])
                y = torch.stack([ds[i][1] for i in range(len(ds))])
                acc = (model(x).argmax(1) == y).float().mean().item()
                assert abs(last[key][d] - acc) < 1e-6, (d, part)
        ds = dm.dataset("+90%", "out")
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))])
        assert abs(last["val"]["+90%"] - (model(x).argmax(1) == y).float().mean().item()) < 1e-6
    assert json.loads((tmp_path / "run" / "records.jsonl").read_text().splitlines()[0])["step"] == 3
