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


def test_speed_bench_measures_every_pipeline_in_rounds(tmp_path):
    from dg_lightning.bench.speed import main as speed_main

    out = tmp_path / "speed.json"
    rc = speed_main(["--root", str(tmp_path / "no-pacs"), "--methods", "erm", "--models", "resnet10t@32",
                     "--workers", "0", "--rounds", "2", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                     "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["commit"] and result["machine"]["cores"] and "bench.speed" in result["command"]
    rows = {r["pipeline"]: r for r in result["results"][0]["rows"]}
    assert set(rows) == {"compute", "per-sample", "batched", "domainbed"}
    for r in rows.values():
        assert len(r["img_per_s"]) == 2 and all(v > 0 for v in r["img_per_s"]) and r["ratio_to_compute"] > 0
    assert rows["compute"]["ratio_to_compute"] == 1.0 and rows["batched"]["ratio_to_domainbed"] > 0
    assert result["results"][0]["batched_augmentation_in_training"] is True
