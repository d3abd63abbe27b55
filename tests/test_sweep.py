"""`dg-lightning sweep`: DomainBed's grid (held-out sets x hparams x trials), seeds, resumability, end to end."""

import hashlib
import json
import subprocess

import pytest

from dg_lightning.eval import sweep
from dg_lightning.eval.report import report_main
from dg_lightning.eval.sweep import trial_hparams
from dg_lightning.methods.hparams import as_overrides, default_hparams, random_hparams
from tests.conftest import ROOT, cli_cmd, subprocess_env
from tests.mnist_trees import id_images, write_mnist

CMNIST = str(ROOT / "experiments/cpu/cmnist_erm.yaml")


def md5_seed(*args) -> int:
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), *id_images(150), 100)


def test_held_out_sets_as_domainbed():
    assert sweep.held_out_sets(3, single=False) == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
    assert sweep.held_out_sets(4, single=True) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="at least 3 domains"):
        sweep.held_out_sets(2, single=False)


def test_trial_hparams_as_domainbeds_train_script():
    assert trial_hparams("ERM", "ColoredMNIST", 0, 4) == default_hparams("ERM", "ColoredMNIST")
    assert trial_hparams("CORAL", "PACS", 3, 1) == random_hparams("CORAL", "PACS", md5_seed(3, 1))
    drawn = trial_hparams("ERM", "ColoredMNIST", 1, 0)  # resnet_dropout 0.5 for this draw
    assert drawn["model.dropout"] == 0.5 and "model.dropout" not in sweep.applied("ColoredMNIST", drawn)
    assert sweep.applied("PACS", drawn) == drawn


def test_plan_covers_the_grid_with_domainbeds_seeds(tiny_mnist, tmp_path):
    out, jobs = sweep.plan([CMNIST], [f"--data.root={tiny_mnist}"], n_hparams=3, n_trials=2, hparams_from=1,
                           out=tmp_path / "sw")
    assert len(jobs) == 2 * 6 * 2  # trials x (3 single + 3 pairs) x hparams seeds 1, 2
    job = next(j for j in jobs if j["meta"]["test_domains"] == ["+90%", "-90%"] and j["meta"]["trial_seed"] == 1
               and j["meta"]["hparams_seed"] == 2)
    assert job["run_dir"] == out / "+90%+-90%" / "trial1" / "hp2"
    hparams = trial_hparams("ERM", "ColoredMNIST", 2, 1)
    assert job["meta"]["hparams"] == hparams and job["meta"]["test_envs"] == [0, 2]
    cmd = job["command"]
    for arg in [*as_overrides(sweep.applied("ColoredMNIST", hparams)), "--data.test_domains=['+90%', '-90%']",
                "--data.split_seed=1", f"--seed_everything={md5_seed('ColoredMNIST', 'ERM', [0, 2], 2, 1)}",
                "--trainer.callbacks+=dg_lightning.core.records.DomainBedRecords"]:
        assert arg in cmd, arg
    assert not any(a.startswith("--model.dropout") for a in cmd)  # DomainBed's MNIST CNN has no dropout
    with pytest.raises(ValueError, match="no hyperparameters registered for 'GCISG'"):
        sweep.plan([CMNIST], [f"--data.root={tiny_mnist}", "--model.class_path=dg_lightning.methods.GCISG"], 2, 1)


@pytest.mark.slow
def test_sweep_runs_resumes_and_tabulates(tiny_mnist, tmp_path):
    """Two hparams settings x one held-out environment, tiny; then the same command again finds them done."""
    out = tmp_path / "sw"
    own = ["sweep", "--config", CMNIST, "--n-hparams", "2", "--n-trials", "1", "--single-test-envs",
           "--domains=-90%", "--out", str(out), "--wandb-mode", "disabled"]
    overrides = ["--", f"--data.root={tiny_mnist}", "--trainer.max_epochs=2", "--data.steps_per_epoch=2",
                 "--data.batch_size=4", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    proc = subprocess.run(cli_cmd(*own, *overrides), env=subprocess_env(), capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for h in (0, 1):
        run = out / "-90%" / "trial0" / f"hp{h}"
        meta = json.loads((run / "sweep_run.json").read_text())
        assert meta["hparams"] == trial_hparams("ERM", "ColoredMNIST", h, 0) and meta["test_domains"] == ["-90%"]
        records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [2, 4]  # one record per validation
        assert set(records[0]["val"]) == {"+90%", "+80%"} and set(records[0]["test_out"]) == {"-90%"}
    md = (out / "sweep.md").read_text()
    assert "model selection: training-domain validation set" in md and "(oracle)" in md
    assert "leave-one-domain-out" not in md  # single held-out runs only
    choices = json.loads((out / "sweep.json").read_text())["choices"]
    assert {c["selection"] for c in choices} == {"training-domain validation set", "test-domain validation set (oracle)"}
    # `dg-lightning report` on the sweep directory (its own sweep.json beside the runs) gives the same tables
    assert report_main([str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").read_text().strip() == md.strip()
    again = subprocess.run(cli_cmd(*own, "--dry-run", *overrides), env=subprocess_env(),
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "2 jobs: 2 done, 0 incomplete, 0 not launched." in again.stdout
