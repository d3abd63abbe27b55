import json
import statistics
import time

import pytest
import torch
import torchvision

from dg_lightning.bench import steptime
from dg_lightning.bench.steptime import main as steptime_main
from dg_lightning.data.folder import ImageFolderDomains
from tests.conftest import ROOT


def test_steptime_compares_methods_on_the_same_batch(tmp_path):
    demo = str(ROOT / "experiments/demo/erm.yaml")
    out = tmp_path / "steptime.json"
    rc = steptime_main(["--configs", demo, demo, "--steps", "1", "--warmup", "0", "--out", str(out),
                        "--data.per_class=4", "--data.batch_size=2", "--model.backbone=resnet10t"])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["method"] for r in rows] == ["ERM", "ERM"]
    assert rows[0]["relative_to_first"] == 1.0 and rows[0]["images_per_step"] == 6
    assert all(r["seconds_per_step"] > 0 for r in rows)


def test_bench_pacs_uses_the_gpu_it_finds(monkeypatch, capsys, fake_pacs):
    """With a GPU (faked here), `make bench-pacs` plans DomainBed's paper-scale protocol; without one,
    the two CPU tables."""
    import torch

    from dg_lightning.bench.pacs import eta_seconds
    from dg_lightning.bench.pacs import main as pacs_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    assert pacs_main(["--dry-run", "--root", str(fake_pacs)]) == 0
    out = capsys.readouterr().out
    assert "on the GPU Fake GPU" in out and "5000 training steps per run x 12 runs" in out
    cmd = next(line for line in out.splitlines() if line.startswith("$ "))
    assert "experiments/pacs/erm.yaml --seeds 0 1 2" in cmd and "--out bench/pacs-gpu/resnet50-imagenet-224px" in cmd
    assert "--trainer.accelerator=gpu" in cmd and "--trainer.precision=bf16-mixed" in cmd and "--data.num_workers=" in cmd
    assert eta_seconds(0.04, 5000, 12) == 2400

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pacs_main(["--dry-run", "--root", str(fake_pacs), "--", "--trainer.max_epochs=1"]) == 0
    out = capsys.readouterr().out
    cmds = [line for line in out.splitlines() if line.startswith("$ ")]
    assert "on the CPU" in out and len(cmds) == 2
    assert "experiments/cpu/pacs_erm_resnet18.yaml --seeds 0 1 " in cmds[0] and "bf16" not in out
    assert cmds[0].endswith("--trainer.max_epochs=1")  # the user's overrides reach every run


def test_bench_pacs_says_how_to_fetch_missing_weights(monkeypatch):
    import pytest
    import timm

    from dg_lightning.bench.pacs import require_weights
    from dg_lightning.core.errors import DataNotFoundError

    def offline(*args, **kwargs):
        raise OSError("We have no connection or you passed local_files_only")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DataNotFoundError, match=r"resnet50.tv_in1k(.|\n)*HF_HUB_OFFLINE=0"):
        require_weights(str(ROOT / "experiments/pacs/erm.yaml"), [])
    require_weights(str(ROOT / "experiments/pacs/erm.yaml"), ["--model.pretrained=/weights.pth"])  # a local file


@pytest.mark.parametrize("memory_format", ["channels-last", "contiguous"])
def test_speed_bench_measures_every_pipeline_in_rounds(tmp_path, monkeypatch, memory_format):
    """Every row in every round; with channels-last (the default) the suite's rows run in that format
    and DomainBed's loop is also measured as DomainBed runs it (contiguous), against its own limit."""
    from dg_lightning.bench import speed

    formats = []  # the memory format each measured model's first convolution had when its step ran
    real = speed.seconds_per_step

    def spy(model, *args, **kw):
        conv = next(w for w in model.backbone.parameters() if w.dim() == 4)
        formats.append(conv.is_contiguous(memory_format=torch.channels_last))
        return real(model, *args, **kw)

    monkeypatch.setattr(speed, "seconds_per_step", spy)
    # --file-side (with contiguous): DomainBed's loop and the per-sample path decode the resized copy's files
    file_side = ["--file-side", "40"] if memory_format == "contiguous" else []
    decoded = []  # the size of every image either path decodes

    def seen(image):
        decoded.append(image.size)
        return image

    pil_loader, load = torchvision.datasets.folder.default_loader, ImageFolderDomains._load
    monkeypatch.setattr(torchvision.datasets.folder, "default_loader", lambda path: seen(pil_loader(path)))
    monkeypatch.setattr(ImageFolderDomains, "_load", lambda self, item: seen(load(self, item)))
    out = tmp_path / "speed.json"
    rc = speed.main(["--root", str(tmp_path / "no-pacs"), "--methods", "erm", "--models", "resnet10t@32",
                     "--workers", "0", "--rounds", "2", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                     "--memory-format", memory_format, "--breakdown", *file_side, "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(decoded) == {(40, 40) if file_side else (96, 96)}  # the embedded shapes are written at 96 px
    assert ("resized to 40 px" in result["data"]) == bool(file_side)
    assert rc == 0 and result["commit"] and result["machine"]["cores"] and "bench.speed" in result["command"]
    assert result["memory_format"] == memory_format
    rows = {r["pipeline"]: r for r in result["results"][0]["rows"]}
    as_is = {"compute-as-is", "domainbed-as-is"} if memory_format == "channels-last" else set()
    assert set(rows) == {"compute", "per-sample", "batched", "domainbed", "loop", "data-path"} | as_is
    for r in rows.values():
        assert len(r["img_per_s"]) == 2 and all(v > 0 for v in r["img_per_s"]) and r["ratio_to_compute"] > 0
        assert r["memory_format"] == ("contiguous" if r["pipeline"] in as_is else memory_format)
    assert rows["compute"]["ratio_to_compute"] == 1.0 and rows["batched"]["ratio_to_domainbed"] > 0
    assert rows["batched"]["compute_over_domainbed"] == pytest.approx(statistics.median(
        c / d for c, d in zip(rows["compute"]["img_per_s"], rows["domainbed"]["img_per_s"])), abs=2e-3)
    assert result["wall_seconds"] > 0
    for name, r in rows.items():  # the Trainer.fit rows: the share of their wall time between steps
        shares = r.get("between_steps_share")
        assert (shares is not None) == (name in ("per-sample", "batched", "loop"))
        assert shares is None or (len(shares) == 2 and all(0 < v < 1 for v in shares))
    # compute rows, 2 rounds: the suite's in its format, the as-is one contiguous
    assert sorted(formats) == sorted([memory_format == "channels-last"] * 2 + [False] * (2 if as_is else 0))
    if as_is:
        assert rows["compute-as-is"]["ratio_to_compute"] == 1.0 and rows["batched"]["ratio_to_domainbed_as_is"] > 0
        assert rows["batched"]["compute_over_domainbed_as_is"] == pytest.approx(statistics.median(  # the ceiling
            c / d for c, d in zip(rows["compute"]["img_per_s"], rows["domainbed-as-is"]["img_per_s"])), abs=2e-3)
        a, c = rows["domainbed-as-is"], rows["compute-as-is"]
        assert a["ratio_to_compute"] == pytest.approx(
            statistics.median(v / w for v, w in zip(a["img_per_s"], c["img_per_s"])), abs=2e-3)
    else:
        assert "ratio_to_domainbed_as_is" not in rows["batched"]
    assert result["results"][0]["batched_augmentation_in_training"] is True


def test_speed_bench_cuda_settings_and_a_bad_file_side(monkeypatch, capsys):
    """``--device cuda`` (no GPU here: its settings only): ResNet-50 at 224 px, batch 32, a worker sweep up to
    the cores, bf16 and channels-last in the suite's rows, neither in DomainBed's loop as it runs."""
    from dg_lightning.bench import speed

    monkeypatch.setattr(speed.os, "cpu_count", lambda: 8)
    args = speed.parse_args(["--device", "cuda"])
    assert (args.models, args.batch_size, args.workers) == (["resnet50@224"], 32, [0, 2, 4, 8])
    s = speed.Setup(args, "erm", "resnet50", 224, False)
    assert s.bf16() and not s.bf16(as_is=True) and s.channels_last and s.images_per_step == 96
    cpu = speed.parse_args([])
    assert (cpu.models[0], cpu.batch_size, cpu.workers) == ("resnet18@64", 24, [0, 1, 2])
    assert not speed.Setup(cpu, "erm", "resnet18", 64, False).bf16()
    with pytest.raises(SystemExit):
        speed.parse_args(["--file-side", "0"])
    assert "--file-side 0: give the side in pixels" in capsys.readouterr().err


@pytest.mark.parametrize("in_memory", [False, True])
def test_speed_bench_loop_row_trains_on_one_batch_augmented_once(tmp_path, monkeypatch, in_memory):
    """``loop`` (``in_memory``): Lightning's loop gets the batch already augmented, every step; the
    pipeline row augments a fresh loader batch every step, and that time (made 0.2 s here, as the step's)
    is counted between steps, the step's not."""
    from types import SimpleNamespace

    from dg_lightning.bench import speed
    from dg_lightning.core.data import MultiDomainDataModule
    from dg_lightning.data.synthetic import write_image_folder
    from dg_lightning.methods import ERM

    write_image_folder(tmp_path / "img", per_class=4, size=32, fmt="jpg")
    augmented = []
    real = MultiDomainDataModule.finish_batch
    monkeypatch.setattr(MultiDomainDataModule, "finish_batch",
                        lambda self, batch: augmented.append(isinstance(batch[0], dict))
                        or (isinstance(batch[0], dict) and time.sleep(0.2)) or real(self, batch))
    step = ERM.training_step
    monkeypatch.setattr(ERM, "training_step", lambda self, *a, **kw: time.sleep(0.2) or step(self, *a, **kw))
    args = SimpleNamespace(device="cpu", memory_format="contiguous", batch_size=2, pacs=False, root=str(tmp_path / "img"))
    s = speed.Setup(args, "erm", "resnet10t", 32, False)
    img_per_s, between = speed.pipeline_throughput(s, 0, True, steps=2, warmup=1, in_memory=in_memory)
    assert img_per_s > 0
    # 2 timed steps of 0.2 s, each after a 0.2 s augmentation (or none): half the time, or almost none
    assert between < 0.2 if in_memory else 0.3 < between < 0.7
    assert sum(augmented) == (1 if in_memory else 4) and len(augmented) >= 4  # 1 + 2 steps + the stopping one


def test_speed_bench_runs_gcisg_with_views_in_the_loader_and_on_the_batch(tmp_path):
    from dg_lightning.bench.speed import main as speed_main

    out = tmp_path / "speed.json"
    rc = speed_main(["--root", str(tmp_path / "no-pacs"), "--methods", "gcisg", "--models", "resnet10t@32",
                     "--workers", "0", "--rounds", "1", "--gcisg-steps", "1", "--warmup", "0", "--batch-size", "2",
                     "--breakdown", "--out", str(out)])
    result = json.loads(out.read_text())["results"][0]
    assert rc == 0 and {r["pipeline"] for r in result["rows"]} == {"compute", "loop", "per-sample", "batched", "data-path"}
    assert all(r["median_img_per_s"] > 0 for r in result["rows"])
    assert result["batched_augmentation_in_training"] is True  # the batched row made its views on the batch
    assert result["views_on"] == {"compute": "batch", "per-sample": "loader", "batched": "batch"}


@pytest.mark.parametrize("views_on", ["loader", "batch"])
def test_steptime_gives_gcisg_the_two_views_its_loader_made(tmp_path, monkeypatch, views_on):
    """GCISG's step is timed on the batch its own loader made (two RandAugment views per image, the
    data module's augmentation replaced; or made on the batch, ``views_on: batch``), ERM's on the
    preset's; both exclude loading, and the loader's time per batch is reported for each."""
    demo = ROOT / "experiments/demo/erm.yaml"
    gcisg = tmp_path / "gcisg.yaml"
    gcisg.write_text(demo.read_text().replace(
        "class_path: dg_lightning.methods.ERM\n  init_args:\n",
        f"class_path: dg_lightning.methods.GCISG\n  init_args:\n    queue_size: 32\n    emb_dim: 8\n"
        f"    views_on: {views_on}\n"))
    batched = ["--data.batch_augment=true", "--data.cache_images=true"] if views_on == "batch" else []
    timed = []
    real = steptime.seconds_per_step
    monkeypatch.setattr(steptime, "seconds_per_step", lambda model, batch, *a: timed.append(batch) or real(model, batch, *a))
    out = tmp_path / "steptime.json"
    rc = steptime_main(["--configs", str(demo), str(gcisg), "--steps", "1", "--warmup", "0", "--out", str(out),
                        "--loader-batches", "1", "--data.per_class=4", "--data.batch_size=2",
                        "--model.backbone=resnet10t", *batched])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["method"] for r in rows] == ["ERM", "GCISG"]
    assert [r["views_per_image"] for r in rows] == [1, 2] and rows[1]["images_per_step"] == 6
    assert all(r["loader_seconds_per_batch"] > 0 for r in rows), rows
    erm_x, gcisg_x = timed[0][0], timed[1][0]
    assert isinstance(erm_x, torch.Tensor) and isinstance(gcisg_x, list) and len(gcisg_x) == 2
    assert gcisg_x[0].shape == erm_x.shape and not torch.equal(gcisg_x[0], gcisg_x[1])


def test_every_bench_pacs_table_has_its_yaml():
    from dg_lightning.bench.pacs import DEFAULT_OUT, SUITES

    assert list(SUITES["baselines"].values()) == ["experiments/cpu/pacs_erm_lite0.yaml",
                                                  "experiments/cpu/pacs_coral_lite0.yaml",
                                                  "experiments/cpu/pacs_erm_swad_lite0.yaml"]
    assert set(DEFAULT_OUT) == set(SUITES)
    for tables in SUITES.values():
        for cfg in tables.values():
            assert (ROOT / cfg).is_file(), cfg


def test_bench_mnist_runs_lodo_per_method_and_puts_published_numbers_beside(tmp_path, monkeypatch):
    """The bench's lodo calls replaced by fake results: commands, method swap, table, published row."""
    import subprocess

    import pytest

    from dg_lightning.bench import mnist
    from tests.mnist_trees import id_images, write_mnist

    root = write_mnist(tmp_path / "m", *id_images(30), 20)
    calls, real_run = [], subprocess.run

    def fake_run(cmd, check=False, **kwargs):
        if "lodo" not in cmd:  # the commit recorded in the JSON, anything else
            return real_run(cmd, check=check, **kwargs)
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        acc = 0.5 if "--model.class_path=dg_lightning.methods.GCISG" in cmd else 0.7
        runs = [{"selection": sel, "domain": d, "seed": s, "acc": acc + 0.1 * s}
                for sel in ("training-domain validation", "oracle") for d in ("+90%", "+80%", "-90%") for s in (0, 1)]
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "results.json").write_text(json.dumps({"runs": runs}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert mnist.main(["--methods", "ERM", "GCISG", "--datasets", "cmnist", "--root", str(root), "--out", "b"]) == 0
    assert [c[c.index("--config") + 1] for c in calls] == ["experiments/cpu/cmnist_erm.yaml"] * 2
    assert not any(a.startswith("--model.class_path") for a in calls[0])  # ERM: the YAML's own method
    assert calls[1][-1] == "--model.class_path=dg_lightning.methods.GCISG" and f"--data.root={root}" in calls[1]
    md = (tmp_path / "b" / "bench_mnist.md").read_text()
    assert "| ERM, published | training-domain val. (20-trial search) | 71.7 | 72.9 | 10.0 | 51.5 |" in md
    # columns in DomainBed's order; mean ± standard error of 0.7 and 0.8
    assert "| ERM, here (cpu) | training-domain validation | 75.0 ± 5.0 | 75.0 ± 5.0 | 75.0 ± 5.0 | 75.0 ± 5.0 |" in md
    assert "| GCISG, here (cpu) | oracle | 55.0 ± 5.0 |" in md
    report = json.loads((tmp_path / "b" / "bench_mnist.json").read_text())
    assert {"commit", "cpus", "torch"} <= set(report["machine"]) and report["published_erm"]["rmnist"][-1] == 98.0
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['NoSuchMethod'\]"):
        mnist.main(["--methods", "ERM", "NoSuchMethod", "--root", str(root)])


def test_paper_scale_yamls_use_the_gpu_settings():
    """Every paper-scale PACS / DomainNet YAML trains in bf16 with channels-last weights, and every one
    with DomainBed's augmentation runs it batched on the accelerator (issue 16: the baselines' YAMLs
    had none of it)."""
    import yaml

    paths = sorted((ROOT / "experiments" / "pacs").glob("*.yaml")) + [ROOT / "experiments/domainnet/erm.yaml"]
    assert len(paths) >= 16
    for path in paths:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["trainer"].get("precision") == "bf16-mixed", path.name
        callbacks = [c["class_path"] for c in cfg["trainer"].get("callbacks", [])]
        assert "dg_lightning.core.callbacks.ChannelsLast" in callbacks, path.name
        data = cfg["data"]["init_args"]
        if data.get("augment") == "domainbed":
            assert data.get("batch_augment") is True, path.name
