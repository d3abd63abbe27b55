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


def test_every_bench_pacs_table_has_its_yaml():
    from dg_lightning.bench.pacs import DEFAULT_OUT, SUITES

    assert list(SUITES["baselines"].values()) == ["experiments/cpu/pacs_erm_lite0.yaml",
                                                  "experiments/cpu/pacs_coral_lite0.yaml",
                                                  "experiments/cpu/pacs_erm_swad_lite0.yaml"]
    assert set(DEFAULT_OUT) == set(SUITES)
    for tables in SUITES.values():
        for cfg in tables.values():
            assert (ROOT / cfg).is_file(), cfg
