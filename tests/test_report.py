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
