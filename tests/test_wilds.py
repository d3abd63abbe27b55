"""WILDS: fake trees in each dataset's official layout, read by the wilds package; official splits,
domains from metadata, official metrics from ``dataset.eval``; the torch_scatter fallback."""

import json

import pytest
import torch

from tests.conftest import ROOT, subprocess_env
from tests.wilds_trees import TREES

wilds_module = pytest.importorskip("dg_lightning.data.wilds")
pytest.importorskip("wilds")
from dg_lightning.data.wilds import WILDS, scatter  # noqa: E402


def test_scatter_fallback_by_hand():
    src = torch.tensor([1.0, 2.0, 3.0, 5.0])
    index = torch.tensor([0, 0, 2, 2])
    assert scatter(src, index, dim_size=4, reduce="mean").tolist() == [1.5, 0.0, 4.0, 0.0]
    assert scatter(src, index, reduce="sum").tolist() == [3.0, 0.0, 8.0]
    assert scatter(src, index, dim_size=3, reduce="max").tolist() == [2.0, 0.0, 5.0]


@pytest.mark.parametrize("name", sorted(TREES))
def test_official_tree_read_through_the_package(tmp_path, name):
    sizes = TREES[name](tmp_path)
    dm = WILDS(dataset=name, root=str(tmp_path), batch_size=4, image_size=8, augment="none")
    n_domains = {"camelyon17": 3}.get(name, 2)
    assert {s: len(i) for s, i in dm.split_idx.items() if len(i)} == {s: n for s, n in sizes.items() if n}
    assert dm.val_domains == ["val"] and "train" not in dm.test_domains and "test" in dm.test_domains
    assert dm.selection_metric.startswith("val/val/official/")
    # domains: the metadata field's values present in train, indexing train_domains
    x, y, domain, pos = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8)
    assert domain.min() >= 0 and domain.max() < len(dm.train_domains) and len(dm.train_domains) == n_domains
    # labels follow their images (each image is filled with 10 * its label)
    assert torch.allclose(x.mean(dim=(1, 2, 3)) * 255, 10 * y.float(), atol=0.6)
    # official metrics: perfect predictions score 1 on the dataset's own accuracy
    for split in dm.test_domains:
        if len(dm.split_idx[split]):
            n = len(dm.split_idx[split])
            truth = dm.ds.y_array[dm.split_idx[split]]
            res = dm.evaluate(split, torch.arange(n), truth)
            assert res[[k for k in res if k.startswith("acc_avg") or k == "acc_avg"][0]] == pytest.approx(1.0)


def test_camelyon17_domains_and_metrics_by_hand(tmp_path):
    TREES["camelyon17"](tmp_path)
    dm = WILDS(dataset="camelyon17", root=str(tmp_path), batch_size=5, image_size=8)
    assert dm.domain_field == "hospital" and dm.train_domains == ["hospital0", "hospital3", "hospital4"]
    ds = dm.split("val")
    assert {int(dm._column[i]) for i in dm.split_idx["val"]} == {1}  # OOD val is hospital 1
    assert set(ds.domains.tolist()) == {-1}  # not a training domain
    truth = dm.ds.y_array[dm.split_idx["test"]]
    wrong = truth.clone()
    wrong[:3] = 1 - wrong[:3]  # 3 of 6 wrong
    assert dm.evaluate("test", torch.arange(6), wrong)["acc_avg"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="metadata field"):
        WILDS(dataset="camelyon17", root=str(tmp_path), domain_field="country")


def test_missing_dataset_names_the_layout_and_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"camelyon17_v1.0/\{metadata.csv(.|\n)*download=True"):
        WILDS(dataset="camelyon17", root=str(tmp_path))


@pytest.mark.slow
def test_cli_run_reports_official_metrics_per_split(tmp_path):
    import subprocess
    import sys

    TREES["camelyon17"](tmp_path / "data")
    cmd = [sys.executable, "-m", "dg_lightning.cli", "fit", "--config", str(ROOT / "experiments/wilds/camelyon17_erm.yaml"),
           f"--data.root={tmp_path / 'data'}", "--data.batch_size=4", "--data.image_size=32", "--data.steps_per_epoch=2",
           "--model.backbone=resnet10t", "--model.pretrained=false", "--trainer.max_epochs=1",
           "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path / 'run'}",
           "--wandb.mode=disabled", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["selection_metric"] == "val/val/official/acc_avg"
    sel = r["selections"]["training-domain validation"]
    assert set(sel["official"]) == {"id_val", "val", "test"}
    for split, metrics in sel["official"].items():
        # camelyon17's official acc_avg is plain accuracy: it equals the logged accuracy of the split
        assert metrics["acc_avg"] == pytest.approx(sel["test"][split], abs=1e-6)
        assert "acc_slide:0" in metrics or any(k.startswith("acc_slide") for k in metrics)
