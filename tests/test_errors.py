"""The CLI's one error path: each bad input gives a short message that names the fix, exit status 2
(3 for a diverged run), no traceback unless --debug; check-data; quiet third-party output.

Errors raised before training are checked in-process through the real entry point
(``dg_lightning.cli.main``: same code, its ``SystemExit`` status, no 8-second interpreter start per
case); the ones raised during training (a corrupt image, a NaN loss) and one parse error run as
subprocesses."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dg_lightning import cli
from dg_lightning.cli_utils import explain_parse_error, quiet_third_party
from dg_lightning.core.errors import ConfigError, CorruptImageError, DataError, find_user_error, user_message
from tests.conftest import ROOT, cli_cmd, subprocess_env, write_fake_pacs
from tests.seg_trees import write_camvid, write_cityscapes

DEMO = str(ROOT / "experiments/demo/erm.yaml")
TINY_MODEL = ["--model.backbone=resnet10t", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
              "--trainer.logger=false"]
NOISE = ("Tip: For seamless cloud logging", "there is no last checkpoint", "anonymous setting has no effect",
         "isinstance(treespec, LeafSpec)")


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """``dg-lightning ARGV`` in this process: (exit status, stdout + stderr)."""
    saved, sys.argv = sys.argv, ["dg-lightning"]  # as from the shell (pytest's own arguments are not ours)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(list(argv))
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def error_block(output: str) -> list[str]:
    """The printed error: from the ``error:`` line to the end."""
    lines = output.rstrip().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("error:"))
    return lines[start:]


def assert_short_error(code: int, output: str, *needles: str, status: int = 2) -> list[str]:
    assert code == status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    block = error_block(output)
    assert len(block) <= 15, "\n".join(block)
    text = "\n".join(block)
    for n in needles:
        assert n in text, text
    return block


def write_folder_yaml(path: Path, root: Path, test_domain: str = "cartoon", **data) -> Path:
    init = {"root": str(root), "test_domains": [test_domain], "batch_size": 4, "image_size": 16,
            "steps_per_epoch": 5, "augment": "none", **data}
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1},
           "model": {"class_path": "dg_lightning.methods.ERM", "init_args": {"backbone": "resnet10t"}},
           "data": {"class_path": "dg_lightning.data.ImageFolderDomains", "init_args": init},
           "wandb": {"mode": "disabled"}}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


# -- bad inputs before training -------------------------------------------------------------------
def test_wrong_root_names_the_path_the_layout_and_the_download(capsys, tmp_path):
    code, out = run_main(capsys, "fit", "--config", str(ROOT / "experiments/cpu/pacs_erm_resnet18.yaml"),
                         f"--data.root={tmp_path / 'nowhere'}", *TINY_MODEL)
    assert_short_error(code, out, str(tmp_path / "nowhere"), "expected layout", "dg-lightning download pacs")
    assert "Union" not in out and "NoneType" not in out


def test_unknown_domain_lists_the_valid_ones(capsys, tmp_path):
    code, out = run_main(capsys, "fit", "--config", DEMO, "--data.test_domains=[sktch]", *TINY_MODEL)
    assert_short_error(code, out, "unknown test domain(s) ['sktch']", "fix: data.test_domains", "sketch")


def test_lodo_unknown_domain_names_the_fix(capsys, tmp_path):
    code, out = run_main(capsys, "lodo", "--config", DEMO, "--domains", "clipart", "--out", str(tmp_path))
    assert_short_error(code, out, "unknown domain(s) ['clipart']", "fix: --domains photo cartoon sketch painting")


def test_sweep_errors_go_through_the_same_path(capsys, tmp_path):
    """``dg-lightning sweep``: an unknown domain, and a method with no registered hyperparameters."""
    code, out = run_main(capsys, "sweep", "--config", DEMO, "--domains", "clipart", "--dry-run", "--out", str(tmp_path))
    assert_short_error(code, out, "unknown domain(s) ['clipart']", "fix: --domains: some of")
    gcisg = ["--model.class_path=dg_lightning.methods.GCISG"]
    code, out = run_main(capsys, "sweep", "--config", DEMO, "--dry-run", "--out", str(tmp_path), "--", *gcisg)
    assert_short_error(code, out, "no hyperparameters registered for 'GCISG'")


@pytest.mark.parametrize("typo, fix", [
    (["--data.init_args.bach_size=3"], "did you mean 'data.init_args.batch_size'?"),
    (["--model.optimizer.init_args.lrr=3"], "did you mean 'model.init_args.optimizer.init_args.lr'?"),
    (["--model=dg_lightning.methods.ERMM"], "did you mean 'dg_lightning.methods.ERM'?"),
    (["--trainer.max_epochs=x"], "config key 'trainer.max_epochs': expected an int, got 'x'"),
])
def test_config_typo_names_the_closest_valid_key(capsys, typo, fix):
    code, out = run_main(capsys, "fit", "--config", DEMO, *typo)
    assert_short_error(code, out, fix, "dg-lightning fit --help")
    assert "Union" not in out and "usage:" not in out


def test_yaml_typo_names_the_closest_valid_key(capsys, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    code, out = run_main(capsys, "fit", "--config", DEMO, "--config", str(typo))
    assert_short_error(code, out, "unknown config key 'trainer.max_epoch'", "did you mean 'trainer.max_epochs'?")


def test_empty_class_in_a_source_domain_stops_fit_before_training(capsys, tmp_path):
    root = write_fake_pacs(tmp_path / "tree", per_class=2, size=8)
    for f in (root / "sketch" / "horse").iterdir():
        f.unlink()  # the folder stays, empty
    cfg = write_folder_yaml(tmp_path / "c.yaml", root)
    code, out = run_main(capsys, "fit", "--config", str(cfg), *TINY_MODEL[1:],
                         f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert_short_error(code, out, "empty class", str(root / "sketch" / "horse"), "source domain 'sketch'",
                       "fix: dg-lightning check-data")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    # an empty class of the held-out domain is no problem (it is only tested on)
    cfg = write_folder_yaml(tmp_path / "c2.yaml", root, test_domain="sketch")
    from dg_lightning.data.check import check
    from dg_lightning.lightning_cli import build_datamodule

    assert not check(build_datamodule(["--config", str(cfg)]), full=False).problems


def test_label_size_mismatch_is_reported_by_path_before_training(capsys, tmp_path):
    city = write_cityscapes(tmp_path / "cityscapes", split="train", n=3, h=32, w=64)
    write_cityscapes(tmp_path / "cityscapes", split="val", n=2, h=32, w=64)
    camvid = write_camvid(tmp_path / "camvid")
    bad = sorted((city / "gtFine" / "train").rglob("*_labelIds.png"))[1]
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(bad)  # half its image's size
    cfg = {"trainer": {"accelerator": "cpu", "max_epochs": 1},
           "model": {"class_path": "dg_lightning.methods.ERM",
                     "init_args": {"backbone": "resnet10t", "decoder_channels": 16}},
           "data": {"class_path": "dg_lightning.data.SegmentationDG", "init_args": {
               "source": {"class_path": "dg_lightning.data.Cityscapes", "init_args": {"root": str(city), "split": "train"}},
               "val": {"class_path": "dg_lightning.data.Cityscapes", "init_args": {"root": str(city), "split": "val"}},
               "targets": [{"class_path": "dg_lightning.data.CamVid", "init_args": {"root": str(camvid), "split": "test"}}],
               "crop_size": 32, "batch_size": 2, "steps_per_epoch": 2}},
           "wandb": {"mode": "disabled"}}
    path = tmp_path / "seg.yaml"
    path.write_text(json.dumps(cfg))
    code, out = run_main(capsys, "fit", "--config", str(path), *TINY_MODEL[1:],
                         f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert_short_error(code, out, "label size", str(bad), "32x16", "64x32", "fix: dg-lightning check-data")
    # the explicit command lists every set and reports the same pair
    code, out = run_main(capsys, "check-data", "--config", str(path))
    assert code == 2 and "image/label pairs" in out and str(bad) in out


def test_check_data_lists_counts_and_decodes_every_image(capsys, tmp_path):
    root = write_fake_pacs(tmp_path / "tree", per_class=2, size=8)
    corrupt = root / "photo" / "dog" / "pic_001.jpg"
    corrupt.write_bytes(b"not a jpeg")
    cfg = write_folder_yaml(tmp_path / "c.yaml", root)
    code, out = run_main(capsys, "check-data", "--config", str(cfg))
    assert code == 2
    assert "art_painting" in out and "(held out)" in out and "decoded 56 files" in out
    assert f"unreadable image: {corrupt}" in out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
    assert rows["dog"] == ["2", "2", "2", "2"] and rows["total"] == ["14"] * 4
    # --quick decodes nothing, so the corrupt file is not found; the counts are the same
    code, out = run_main(capsys, "check-data", "--config", str(cfg), "--quick")
    assert code == 0 and "no problems found" in out and "decoded" not in out


def test_debug_flag_raises_with_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("DG_DEBUG", "0")  # recorded, so the 1 that --debug sets is undone afterwards
    monkeypatch.setattr(sys, "argv", ["dg-lightning"])
    with pytest.raises(ValueError) as e:  # jsonargparse's own error, raised with its whole traceback
        cli.main(["fit", "--config", DEMO, "--data.test_domains=[sktch]", "--debug"])
    assert isinstance(find_user_error(e.value), ConfigError)


def test_errors_are_found_through_wrappers():
    inner = DataError("bad data", fix="do this")
    try:
        try:
            raise inner
        except DataError as e:
            raise ValueError("Does not validate against any of the Union subtypes") from e
    except ValueError as outer:
        assert find_user_error(outer) is inner
    assert str(inner) == "bad data\n  fix: do this"
    # a DataLoader worker re-raises the error with the worker's traceback as its message
    wrapped = CorruptImageError("Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback "
                                "(most recent call last):\n  File ...\ndg_lightning.core.errors.CorruptImageError: "
                                "cannot read image x.jpg\n  fix: check-data\n")
    assert user_message(wrapped) == "cannot read image x.jpg\n  fix: check-data"


def test_explain_parse_error_peels_nested_unions():
    message = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, '
               "<class 'NoneType'>]\n  Errors:\n    - Problem with given class_path 'dg_lightning.methods.ERM':\n"
               '        Parser key "dropout":\n          Expected a <class \'float\'>. Got value: high\n'
               "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: x")
    text = explain_parse_error(message)
    assert text.splitlines()[0] == "config key 'model.init_args.dropout': expected a float, got 'high'"


# -- during training ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_mid_epoch_names_the_file_and_check_data(capsys, tmp_path, workers):
    """In this process without loader workers; in a real process with one worker (whose error comes
    back wrapped in the worker's traceback)."""
    root = write_fake_pacs(tmp_path / "tree", per_class=2, size=8)
    for f in (root / "photo" / "dog").iterdir():
        f.write_bytes(b"not a jpeg")  # every photo dog: met in the first steps or the first validation
    cfg = write_folder_yaml(tmp_path / "c.yaml", root, num_workers=workers)
    args = ["fit", "--config", str(cfg), *TINY_MODEL[1:], f"--trainer.default_root_dir={tmp_path / 'run'}"]
    if workers:
        proc = subprocess.run(cli_cmd(*args), env=subprocess_env(), capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        code, out = proc.returncode, proc.stdout + proc.stderr
    else:
        code, out = run_main(capsys, *args)
    block = assert_short_error(code, out, "cannot read image", str(root / "photo" / "dog"),
                               "dg-lightning check-data --config")
    assert "Original Traceback" not in "\n".join(block)
    assert not (tmp_path / "run" / "results.json").exists()
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["error"] == "CorruptImageError"


def test_nan_loss_stops_the_run_with_step_term_and_hint(capsys, tmp_path):
    run = tmp_path / "run"
    code, out = run_main(capsys, "fit", "--config", DEMO, "--data.per_class=12", "--data.steps_per_epoch=4",
                         "--data.batch_size=4", "--data.image_size=32", "--trainer.max_epochs=2",
                         "--model.optimizer.init_args.lr=1e12", f"--trainer.default_root_dir={run}", *TINY_MODEL)
    block = assert_short_error(code, out, "loss term 'ce' is nan at step", "lower the learning rate", "1e+12",
                               status=3)
    assert "precision" not in "\n".join(block)  # full precision: no precision hint
    assert not (run / "results.json").exists()
    failed = json.loads((run / "failed.json").read_text())
    assert failed["error"] == "NonFiniteLossError" and failed["step"] <= 4


@pytest.mark.slow
def test_lodo_reports_a_diverged_run_as_failed_and_goes_on(tmp_path):
    out = tmp_path / "lodo"
    proc = subprocess.run(
        cli_cmd("lodo", "--config", DEMO, "--domains", "cartoon", "sketch", "--out", str(out), "--",
                "--data.per_class=12", "--data.steps_per_epoch=3", "--data.batch_size=4", "--data.image_size=32",
                "--model.optimizer.init_args.lr=1e12", *TINY_MODEL[:3]),
        env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.count("FAILED: held-out") == 2  # both runs tried: the first failure did not stop lodo
    assert "ETA: 1 run(s) left" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    assert [f["domain"] for f in summary["failed"]] == ["cartoon", "sketch"] and summary["runs"] == []
    assert "Failed runs" in (out / "summary.md").read_text()
    assert {"command", "commit", "machine"} <= set(summary) and summary["command"].startswith("dg-lightning lodo")
    assert "--ckpt_path" not in (out / "cartoon" / "seed0" / "command.txt").read_text()  # nothing to resume


# -- quiet by default -----------------------------------------------------------------------------
def test_quiet_filters_drop_only_their_own_messages(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from torch.utils._pytree import LeafSpec

    quiet_third_party()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party()  # after simplefilter: the filter goes in front again
        LeafSpec()
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["the user's own warning"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("a message about the run")
    assert "litlogger" not in caplog.text and "a message about the run" in caplog.text


def test_wandb_logger_does_not_pass_the_anonymous_setting(tmp_path, monkeypatch):
    from dg_lightning.core.logging import WandbOptions, default_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = default_loggers(tmp_path, WandbOptions(mode="offline"))[0]
    assert "anonymous" not in wandb_logger._wandb_init and wandb_logger._wandb_init["id"]


def test_a_run_prints_none_of_the_third_party_noise(tmp_path):
    """A W&B-offline fit (as ``make demo``'s runs) shows none of the four lines; a user warning shows."""
    proc = subprocess.run(
        cli_cmd("fit", "--config", DEMO, "--data.per_class=12", "--data.steps_per_epoch=2", "--data.batch_size=4",
                "--data.image_size=32", "--trainer.max_epochs=1", "--wandb.mode=offline", *TINY_MODEL[:3],
                "--trainer.callbacks+=tests.helpers.WarnAtStart", f"--trainer.default_root_dir={tmp_path / 'run'}"),
        env=subprocess_env(WANDB_MODE=""), capture_output=True, text=True, cwd=ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "run" / "wandb").is_dir()  # W&B was on
    for line in NOISE:
        assert line not in output, line
    assert "a warning from the user's own callback" in output
