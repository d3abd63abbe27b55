import json

from dg_lightning.bench.steptime import main as steptime_main
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
