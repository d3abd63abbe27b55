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
