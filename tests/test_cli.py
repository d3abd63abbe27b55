import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dg_lightning.cli import DGCLI, RunCLI
from tests.conftest import ROOT, cli_cmd, subprocess_env

YAMLS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if p.parent.name != "sweeps")  # sweeps: test_cluster
TINY = [
    "--config", str(ROOT / "experiments/demo/erm.yaml"),
    "--data.per_class=12", "--data.steps_per_epoch=3", "--data.batch_size=4", "--data.image_size=32",
    "--model.backbone=resnet10t", "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false",
]


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(ROOT)) for p in YAMLS])
def test_every_yaml_prints_its_config(path, capsys):
    # the ISSA generator/encoder stages run through `dg-lightning issa` (any LightningModule)
    cli = RunCLI if path.parent.name == "issa" else DGCLI
    with pytest.raises(SystemExit) as e:
        cli(args=["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def run_fit(run_dir: Path, *extra: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_cmd("fit", *TINY, f"--trainer.default_root_dir={run_dir}", *extra),
                          env=subprocess_env(**env), capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def test_fit_writes_run_directory_and_is_repeatable(tmp_path):
    run_fit(tmp_path / "a", "--trainer.max_epochs=2", "--wandb.mode=offline", WANDB_MODE="")
    run_fit(tmp_path / "b", "--trainer.max_epochs=2")
    for name in ("config.yaml", "results.json", "checkpoints/last.ckpt", "csv/metrics.csv"):
        assert (tmp_path / "a" / name).exists(), name
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*"))  # W&B offline, no prompt
    ra, rb = (json.loads((tmp_path / r / "results.json").read_text()) for r in "ab")
    assert set(ra["selections"]) == {"training-domain validation", "oracle"}
    assert ra["test_domains"] == ["cartoon"] and ra["seed"] == 0
    assert ra["selections"] == json.loads(json.dumps(ra["selections"]))
    for sel in ra["selections"]:  # same seed, same numbers
        assert ra["selections"][sel]["test"] == rb["selections"][sel]["test"]
    assert "num_classes" not in (tmp_path / "a" / "config.yaml").read_text().split("model:")[0]


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


BATCHED = ("--data.augment=domainbed", "--data.batch_augment=true", "--data.cache_images=true")


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [(), BATCHED, (*BATCHED, "--trainer.callbacks+=dg_lightning.core.callbacks.ChannelsLast")],
                         ids=["per-sample", "batched", "batched-channels-last"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, pipeline):
    # dropout: model-side randomness too; batched: augmentation on the batch, from the decoded images;
    # channels-last: the CPU lite0 YAMLs' memory format (weights and Adam state saved and restored NHWC)
    epochs = "--trainer.max_epochs=3", "--model.dropout=0.3", *pipeline
    run_fit(tmp_path / "full", *epochs)
    killed = run_fit(tmp_path / "crash", *epochs, "--trainer.callbacks+=tests.helpers.KillAtStep",
                     "--trainer.callbacks.step=8", check=False)
    assert killed.returncode != 0 and not (tmp_path / "crash" / "results.json").exists()
    assert (tmp_path / "crash" / "checkpoints" / "last.ckpt").exists()  # saved at the end of epoch 1 (step 6)
    run_fit(tmp_path / "crash", *epochs, "--ckpt_path=last")
    full, resumed = _weights(tmp_path / "full/checkpoints/last.ckpt"), _weights(tmp_path / "crash/checkpoints/last.ckpt")
    assert full.keys() == resumed.keys()
    nhwc = [w.dim() == 4 and w.shape[1] > 1 and w.shape[2] > 1 and not w.is_contiguous() for w in resumed.values()]
    assert any(nhwc) == any("ChannelsLast" in a for a in pipeline)  # the resumed run trained channels-last too
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    rf, rr = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("full", "crash"))
    assert rf["selections"]["oracle"]["test"] == rr["selections"]["oracle"]["test"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_log_the_same_keys(tmp_path):
    run_fit(tmp_path / "single", "--trainer.max_epochs=1")
    run_fit(tmp_path / "ddp", "--trainer.max_epochs=1", "--trainer.strategy=ddp", "--trainer.devices=2",
            "--trainer.accelerator=cpu")

    def keys(run):
        header = (tmp_path / run / "csv" / "metrics.csv").read_text().splitlines()[0]
        return set(header.split(","))

    assert keys("single") == keys("ddp")
    assert {"val/photo/acc", "val/sketch/acc", "val/painting/acc", "val/acc", "train/ce_epoch"} <= keys("ddp")
    r = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert 0.0 <= r["selections"]["oracle"]["test"]["cartoon"] <= 1.0


@pytest.mark.slow
def test_lodo_runs_every_domain_and_prints_the_table(tmp_path):
    out = tmp_path / "lodo"
    proc = subprocess.run(
        cli_cmd("lodo", "--config", str(ROOT / "experiments/demo/erm.yaml"), "--seeds", "0", "1",
                "--domains", "cartoon", "sketch", "--out", str(out), "--", *TINY[2:], "--trainer.max_epochs=1"),
        env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["runs"]) == 2 * 2 * 2  # domains x seeds x selections
    assert {r["selection"] for r in summary["runs"]} == {"training-domain validation", "oracle"}
    assert all(Path(r["config"]).exists() for r in summary["runs"])
    assert "| training-domain validation |" in proc.stdout and "cartoon" in proc.stdout
    assert (out / "per_domain.png").stat().st_size > 1000
    # a second call finds every run done and only rebuilds the table
    again = subprocess.run(
        cli_cmd("lodo", "--config", str(ROOT / "experiments/demo/erm.yaml"), "--seeds", "0", "1",
                "--domains", "cartoon", "sketch", "--out", str(out), "--", *TINY[2:], "--trainer.max_epochs=1"),
        env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.stdout.count("done before") == 4


def test_lodo_rejects_unknown_domain(tmp_path):
    proc = subprocess.run(cli_cmd("lodo", "--config", str(ROOT / "experiments/demo/erm.yaml"), "--domains", "clipart",
                                  "--out", str(tmp_path)), env=subprocess_env(), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "unknown domain(s) ['clipart']" in proc.stderr and "photo" in proc.stderr


def test_test_subcommand_keeps_the_training_config(tmp_path):
    run_fit(tmp_path / "r", "--trainer.max_epochs=1")
    before = (tmp_path / "r" / "config.yaml").read_text()
    proc = subprocess.run(cli_cmd("test", *TINY, f"--trainer.default_root_dir={tmp_path / 'r'}",
                                  f"--ckpt_path={tmp_path / 'r' / 'checkpoints' / 'last.ckpt'}"),
                          env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "config.yaml").read_text() == before
    assert (tmp_path / "r" / "config-test.yaml").exists()
    assert "test/cartoon/acc" in (tmp_path / "r" / "csv-test" / "metrics.csv").read_text()
    assert (tmp_path / "r" / "csv" / "metrics.csv").exists()  # the training log is untouched


@pytest.mark.parametrize("method,extra", [
    ("dg_lightning.methods.GCISG", ["--model.queue_size=64", "--model.emb_dim=16"]),
    ("dg_lightning.methods.RISE", ["--model.clip_model=ViT-B-32", "--model.clip_pretrained=null",
                                   "--model.clip_image_size=32"]),
])
def test_methods_run_through_the_cli(tmp_path, method, extra):
    run_fit(tmp_path / "r", f"--model={method}", "--model.backbone=resnet10t", "--trainer.max_epochs=1", *extra)
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert r["method"] == method.rsplit(".", 1)[-1]
    assert set(r["selections"]) == {"training-domain validation", "oracle"}
    # frozen networks rebuilt from the config (CLIP teacher, ImageNet guide) are not checkpointed
    state = _weights(tmp_path / "r" / "checkpoints" / "last.ckpt")
    frozen = "teacher." if method.endswith("RISE") else "guide."
    assert state and not any(k.startswith(frozen) for k in state)
    if method.endswith("GCISG"):
        assert any(k.startswith("teacher.") for k in state) and any(k.startswith("queues.") for k in state)


@pytest.mark.slow
def test_lodo_pretrains_and_probes_a_self_supervised_method(tmp_path):
    """`lodo` runs DDM pre-training + linear probes per held-out domain with no method-specific
    flag; every run reports held-out and in-domain probe accuracy for each representation part."""
    out = tmp_path / "lodo"
    proc = subprocess.run(
        cli_cmd("lodo", "--config", str(ROOT / "experiments/demo/erm.yaml"), "--seeds", "0",
                "--domains", "cartoon", "sketch", "--out", str(out), "--", *TINY[2:], "--trainer.max_epochs=1",
                "--model=dg_lightning.methods.DDM", "--model.ssl=simclr",
                "--model.ssl_args={hidden_dim: 32, out_dim: 16}"),
        env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["method"] == "DDM" and len(summary["runs"]) == 2 * 2
    for row in summary["runs"]:
        assert 0 <= row["acc"] <= 1 and 0 <= row["in_domain"] <= 1
        assert set(row["parts"]) == {"var", "full"}
        assert set(row["parts"]["full"]["test"]) == {row["domain"]}
        assert len(row["parts"]["var"]["in_domain"]) == 3  # the three source domains
    run = json.loads((out / "cartoon" / "seed0" / "results.json").read_text())
    sel = run["selections"]["training-domain validation"]
    # the selected checkpoint's in-domain probe accuracy is the validation score it was selected by
    assert sel["in_domain_mean"] == pytest.approx(sel["val"], abs=1e-6)
    assert "In-domain accuracy" in (out / "summary.md").read_text()


PROBE_SCRIPT = """
import sys, torch, lightning as L
from dg_lightning.data import SyntheticShapes
from dg_lightning.methods import SSL
out, devices = sys.argv[1], int(sys.argv[2])
L.seed_everything(0)
dm = SyntheticShapes(per_class=6, test_domains=["cartoon"], batch_size=4, eval_batch_size=5, image_size=32,
                     split_seed=0)
model = SSL(num_classes=dm.num_classes, backbone="resnet10t", ssl="simclr",
            ssl_args={"hidden_dim": 16, "out_dim": 8})
fit_probes = model.fit_probes
def record():
    feats, labels = model.probe_features()
    sizes = [len(ds) for ds in model.probe_datasets()]
    torch.save({"feats": feats, "labels": labels, "sizes": sizes}, f"{out}/rank{model.global_rank}.pt")
    fit_probes()
model.fit_probes = record
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.validate(model, datamodule=dm, verbose=False)
torch.save({k: v for k, v in model.state_dict().items() if k.startswith("probes")}, f"{out}/probes{model.global_rank}.pt")
"""


@pytest.mark.slow
def test_ddp_ranks_extract_each_probe_feature_once_and_agree(tmp_path):
    """Under DDP each rank extracts a disjoint shard of the probe features; the gathered shards
    must be the single process's features in the same order, and every rank must fit the same probes."""
    script = tmp_path / "probe_ddp.py"
    script.write_text(PROBE_SCRIPT)
    for name, devices in (("single", 1), ("ddp", 2)):
        (tmp_path / name).mkdir()
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / name), str(devices)], env=subprocess_env(),
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "single" / "rank0.pt")
    assert len(one["sizes"]) == 3 and sum(one["sizes"]) == len(one["labels"])  # the sources' "in" splits
    assert any(n % 2 for n in one["sizes"])  # an odd split: rank 1's shard is padded for the gather
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / f"rank{rank}.pt")
        assert torch.equal(got["labels"], one["labels"])
        assert torch.allclose(got["feats"]["full"], one["feats"]["full"], atol=1e-4)
    p0, p1 = (torch.load(tmp_path / "ddp" / f"probes{r}.pt") for r in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
