import math

import pytest

from dg_lightning.core.logging import resolve_wandb_mode
from dg_lightning.eval.report import markdown_table, mean_se, per_domain_table


def test_mean_se_by_hand():
    m, se = mean_se([0.80, 0.84, 0.86])
    assert m == pytest.approx(0.8333333)
    # sample std = sqrt(((-.0333)^2 + (.00667)^2 + (.02667)^2) / 2) = 0.030551; / sqrt(3) = 0.017638
    assert se == pytest.approx(0.0305505 / math.sqrt(3), rel=1e-4)
    assert mean_se([0.5]) == (0.5, None)


ROWS = [
    {"selection": "training-domain validation", "domain": "A", "seed": 0, "acc": 0.80},
    {"selection": "training-domain validation", "domain": "A", "seed": 1, "acc": 0.84},
    {"selection": "training-domain validation", "domain": "B", "seed": 0, "acc": 0.60},
    {"selection": "training-domain validation", "domain": "B", "seed": 1, "acc": 0.70},
    {"selection": "oracle", "domain": "A", "seed": 0, "acc": 0.90},
    {"selection": "oracle", "domain": "B", "seed": 0, "acc": 0.50},
]


def test_per_domain_table_averages_domains_within_seed_first():
    t = per_domain_table(ROWS)
    tv = t["training-domain validation"]
    assert tv["A"][:2] == pytest.approx((0.82, 0.02))  # std of (0.80, 0.84) = 0.028284 / sqrt 2
    assert tv["B"][:2] == pytest.approx((0.65, 0.05))
    # seed 0 avg 0.70, seed 1 avg 0.77 -> mean 0.735, se 0.035
    assert tv["Avg"][:2] == pytest.approx((0.735, 0.035))
    assert t["oracle"]["Avg"] == pytest.approx((0.70, None, 1))


def test_markdown_table_names_selection_and_error():
    md = markdown_table(ROWS, "ERM on X")
    assert "| training-domain validation | 82.0 ± 2.0 | 65.0 ± 5.0 | 73.5 ± 3.5 |" in md
    assert "| oracle | 90.0 | 50.0 | 70.0 |" in md
    assert "standard error over 2 seed(s)" in md


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"


def _result(root, method, data, domain, seed, tdv, oracle, mtime=None):
    """A results.json as `fit` writes it (only the keys the report reads)."""
    import json
    import os

    run = root / f"{method}-{domain}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    f = run / "results.json"
    f.write_text(json.dumps({"method": method, "data": data, "test_domains": [domain], "seed": seed,
                             "selections": {"training-domain validation": {"test": {domain: tdv}},
                                            "oracle": {"test": {domain: oracle}}}}))
    if mtime:
        os.utime(f, (mtime, mtime))
    return f


def test_report_command_tables_by_hand(tmp_path, capsys):
    from dg_lightning.eval.report import report_main

    runs = tmp_path / "runs"
    # ERM: photo 0.90 / 0.80, sketch 0.60 / 0.70 (65.0 ± 5.0)
    for seed, (p, s) in enumerate([(0.90, 0.60), (0.80, 0.70)]):
        _result(runs / "erm", "ERM", "PACS", "photo", seed, p, p + 0.01)
        _result(runs / "erm", "ERM", "PACS", "sketch", seed, s, s + 0.01)
    # GCISG: one seed, photo only: 95.0, no error bar, no Avg over a missing domain
    _result(runs / "gcisg", "GCISG", "PACS", "photo", 0, 0.95, 0.96)
    # a rerun of ERM photo seed 0 (newer file) replaces the first one: 0.90 -> 0.70, photo 75.0 ± 5.0
    _result(runs / "erm-rerun", "ERM", "PACS", "photo", 0, 0.70, 0.71, mtime=4e9)
    # a LODO summary next to the runs is not counted twice
    (runs / "erm" / "results.json").write_text('{"runs": []}')
    assert report_main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**PACS**, held-out accuracy (%), model selection: training-domain validation" in md
    assert "| Method | photo | sketch | Avg |" in md
    # per seed Avg: (0.70 + 0.60) / 2 = 0.65, (0.80 + 0.70) / 2 = 0.75 -> 70.0, se 0.0707 / sqrt 2 = 5.0
    assert "| ERM | 75.0 ± 5.0 | 65.0 ± 5.0 | 70.0 ± 5.0 |" in md
    assert "| GCISG | 95.0 | — | — |" in md
    assert "| ERM | 76.0 ± 5.0 | 66.0 ± 5.0 | 71.0 ± 5.0 |" in md  # oracle
    tex = (tmp_path / "rep" / "report.tex").read_text()
    assert r"ERM & 75.0 $\pm$ 5.0 & 65.0 $\pm$ 5.0 & 70.0 $\pm$ 5.0 \\" in tex and r"\begin{tabular}{lccc}" in tex
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert "repeats" in capsys.readouterr().err  # the duplicate is reported, not silently dropped


def test_report_label_by_directory_and_errors(tmp_path, capsys):
    from dg_lightning.eval.report import report_main

    _result(tmp_path / "erm_lite0", "ERM", "PACS", "photo", 0, 0.5, 0.5)
    _result(tmp_path / "erm_r18", "ERM", "PACS", "photo", 0, 0.7, 0.7)
    assert report_main([str(tmp_path / "erm_lite0"), str(tmp_path / "erm_r18"), "--label", "dir",
                        "--selection", "oracle", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| erm_lite0 | 50.0 | 50.0 |" in md and "| erm_r18 | 70.0 | 70.0 |" in md
    assert "training-domain validation" not in md
    # through the CLI's one error path: the message, no traceback, exit status 2
    from dg_lightning.cli import main as cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_report_names_each_benchmarks_metric(tmp_path):
    import json

    from dg_lightning.eval.report import report_main

    f = _result(tmp_path / "seg", "ERM", "SegmentationDG", "camvid", 0, 0.285, 0.285)
    f.write_text(json.dumps({**json.loads(f.read_text()), "selection_metric": "val/miou"}))
    _result(tmp_path / "pacs", "ERM", "PACS", "photo", 0, 0.9, 0.9)
    assert report_main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**SegmentationDG**, held-out mIoU (%)" in md and "**PACS**, held-out accuracy (%)" in md
    assert "| ERM | 28.5 | 28.5 |" in md
