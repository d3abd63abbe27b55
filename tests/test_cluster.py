"""Cluster scale: W&B sweep YAMLs and one offline trial, SLURM job arrays and requeue-resume."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dg_lightning.cli import DGCLI
from dg_lightning.cluster import expand_command, lodo_sbatch, sample_parameter, sample_sweep
from tests.conftest import ROOT, cli_cmd, subprocess_env

SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
TINY = ["--data.per_class=12", "--data.steps_per_epoch=3", "--data.batch_size=4", "--data.image_size=32",
        "--model.backbone=resnet10t", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def test_sweep_distributions_by_hand():
    rng = np.random.RandomState(0)
    u = np.random.RandomState(0).uniform(np.log(1e-5), np.log(1e-3))
    assert sample_parameter("lr", {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}, rng) == \
        pytest.approx(np.exp(u))
    assert sample_parameter("x", {"value": 3}, rng) == 3
    assert sample_parameter("b", {"distribution": "q_log_uniform_values", "min": 8, "max": 8, "q": 1}, rng) == 8
    with pytest.raises(ValueError, match="not supported"):
        sample_parameter("z", {"distribution": "beta", "min": 0, "max": 1}, rng)


def test_one_sweep_yaml_per_pacs_method():
    assert {p.stem for p in SWEEPS} >= {"pacs_erm", "pacs_gcisg", "pacs_rise", "pacs_ddm", "pacs_multispace"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_samples_into_a_valid_lightningcli_command(path, capsys):
    """The first sample of every sweep, expanded as `wandb agent` does, is accepted by the
    LightningCLI parser: every swept name is a real argument of the method or benchmark."""
    config = yaml.safe_load(path.read_text())
    assert config["metric"]["name"] == "val/acc" and config["method"] in ("random", "grid", "bayes")
    cmd = expand_command(config, sample_sweep(config, 0), python="python")
    assert cmd[:4] == ["python", "-m", "dg_lightning.cli", "fit"]
    assert (ROOT / cmd[cmd.index("--config") + 1]).is_file()
    with pytest.raises(SystemExit) as e:
        DGCLI(args=[a.replace("experiments/", f"{ROOT}/experiments/", 1) for a in cmd[3:]] + ["--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in sample_sweep(config, 0).items():  # each sampled value reached the resolved config
        node = printed
        for k in name.split("."):  # `model.split` is model.init_args.split in the resolved config
            node = node[k] if k in node else node["init_args"][k]
        got = node
        assert got == value or got == [value] or str(got) == str(value), (name, got, value)


@pytest.mark.slow
def test_sweep_trial_runs_one_agent_trial_offline(tmp_path):
    sweep = tmp_path / "tiny_sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "program": "dg_lightning/cli.py", "method": "random", "metric": {"name": "val/acc", "goal": "maximize"},
        "command": ["${env}", "${interpreter}", "-m", "dg_lightning.cli", "fit", "--config",
                    str(ROOT / "experiments/demo/erm.yaml"), *TINY, "${args}"],
        "parameters": {"model.optimizer.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                       "data.test_domains": {"values": ["sketch", "cartoon"]}},
    }))
    env = subprocess_env(WANDB_MODE="offline", WANDB_RUN_ID="trial0001")
    env.pop("WANDB_SWEEP_ID", None)
    proc = subprocess.run(cli_cmd("sweep-trial", str(sweep)), env=env, capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "sweeps" / "local-tiny_sweep" / "trial0001"  # one directory per trial
    sample = sample_sweep(yaml.safe_load(sweep.read_text()), 0)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(sample["model.optimizer.init_args.lr"])
    result = json.loads((run / "results.json").read_text())
    assert result["test_domains"] == [sample["data.test_domains"]]
    assert (run / "wandb_id").read_text() == "trial0001"  # the W&B run is the agent's
    assert list((run / "wandb").glob("offline-run-*-trial0001"))


def _fake_srun(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_slurm_lodo_array_maps_tasks_to_domain_and_seed_and_resumes(tmp_path):
    out = tmp_path / "exp"
    text = lodo_sbatch(["experiments/demo/erm.yaml"], ["--data.per_class=12"], ["cartoon", "sketch", "photo"],
                       [0, 1], out, "demo", gpus=2, partition="gpu", setup="echo setup")
    assert "#SBATCH --array=0-5" in text and "#SBATCH --ntasks-per-node=2" in text
    assert "#SBATCH --gpus-per-node=2" in text and "#SBATCH --signal=SIGUSR1@120" in text and "#SBATCH --requeue" in text
    script = tmp_path / "lodo.sbatch"
    script.write_text(text)
    bin_dir = _fake_srun(tmp_path)

    def task(i):
        log = tmp_path / f"srun{i}.log"
        log.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(i),
               "SRUN_LOG": str(log)}
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return (log.read_text().splitlines() if log.exists() else None), proc.stdout

    args, _ = task(4)  # seeds outer, domains inner: task 4 = (sketch, seed 1)
    assert args[1:4] == ["-m", "dg_lightning.cli", "fit"]
    assert "--data.test_domains=['sketch']" in args and "--seed_everything=1" in args
    assert f"--trainer.default_root_dir={out}/sketch/seed1" in args and "--trainer.devices=2" in args
    assert not any(a.startswith("--ckpt_path") for a in args) and "--data.per_class=12" in args  # a first start
    # interrupted after an epoch: resumes from the last checkpoint
    (out / "sketch" / "seed1" / "checkpoints").mkdir(parents=True)
    (out / "sketch" / "seed1" / "checkpoints" / "last.ckpt").write_text("")
    args, _ = task(4)
    assert args[-1] == "--ckpt_path=last"
    # requeued after SIGUSR1: Lightning's own checkpoint is there, Lightning picks it (no ckpt_path)
    (out / "sketch" / "seed1" / "hpc_ckpt_1.ckpt").write_text("")
    args, _ = task(4)
    assert not any(a.startswith("--ckpt_path") for a in args)
    # finished: nothing runs
    (out / "sketch" / "seed1" / "results.json").write_text("{}")
    args, stdout = task(4)
    assert args is None and "done before" in stdout


@pytest.mark.slow
def test_requeued_run_resumes_from_lightnings_slurm_checkpoint(tmp_path):
    """A run preempted on SLURM leaves hpc_ckpt_<n>.ckpt; the requeued task (same command, no
    ckpt_path) continues from it: the second attempt trains only the remaining epoch."""
    run = tmp_path / "run"
    first = subprocess.run(cli_cmd("fit", "--config", str(ROOT / "experiments/demo/erm.yaml"), *TINY,
                                   f"--trainer.default_root_dir={run}", "--wandb.mode=disabled"),
                           env=subprocess_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt")  # as Lightning's SIGUSR1 handler saves
    (run / "results.json").unlink()
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dg", "SLURM_JOB_ID": "77", "SLURM_NODELIST": "localhost",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1"}
    second = subprocess.run(cli_cmd("fit", "--config", str(ROOT / "experiments/demo/erm.yaml"), *TINY,
                                    "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}",
                                    "--wandb.mode=disabled"),
                            env=subprocess_env(**slurm), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in second.stderr + second.stdout
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * 3
    epochs = [line.split(",") for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    # the second attempt's log (the first is kept as metrics.attempt1.csv) starts at epoch 1
    assert min(int(float(r[header.index("epoch")])) for r in epochs if r[header.index("epoch")]) == 1
    assert (run / "csv" / "metrics.attempt1.csv").exists()
    assert json.loads((run / "results.json").read_text())["epochs"] == 2


def test_slurm_command_writes_the_script(tmp_path):
    proc = subprocess.run(cli_cmd("slurm", "lodo", "--config", str(ROOT / "experiments/demo/erm.yaml"), "--seeds", "0",
                                  "1", "--gpus", "0", "--out", str(tmp_path / "exp"), "--", "--data.per_class=12"),
                          env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "exp" / "slurm" / "lodo.sbatch").read_text()
    assert "#SBATCH --array=0-7" in text  # 4 drawing styles x 2 seeds
    assert "--trainer.accelerator=cpu" in text and "sbatch" in proc.stdout and "dg-lightning lodo" in proc.stdout
    assert sys.executable in text
