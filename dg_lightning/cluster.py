"""Running at cluster scale: SLURM job arrays and W&B sweep trials.

    dg-lightning slurm lodo --config experiments/pacs/erm.yaml --seeds 0 1 2 --gpus 1 --time 12:00:00 \\
        [--partition P] [--account A] [--out runs/lodo/erm-pacs] [--submit] [-- --data.root ~/data/pacs]
    dg-lightning slurm sweep ENTITY/PROJECT/SWEEP_ID --agents 8 --count 5 --gpus 1 [--submit]
    dg-lightning sweep-trial experiments/sweeps/pacs_erm.yaml [--seed 0] [--dry-run] [-- extra CLI args]

``slurm lodo`` writes ``<out>/slurm/lodo.sbatch``: a job array, one task per (held-out domain, seed),
each a ``dg-lightning fit`` in ``<out>/<domain>/seed<seed>``, the directory ``dg-lightning lodo``
uses, so ``dg-lightning lodo`` with the same ``--out`` (or ``dg-lightning report <out>``) prints the
table once the array is done. Preemption: SLURM sends SIGUSR1 120 s before the end
(``--signal``); Lightning's SLURM environment then saves ``hpc_ckpt_<n>.ckpt`` in the run directory
and requeues the task (``--requeue``); the requeued task finds that checkpoint and Lightning resumes
from it. A task without one resumes from ``checkpoints/last.ckpt`` (``--ckpt_path=last``) when there is one, and a task
whose run has ``results.json`` exits at once. Multi-GPU tasks run one process per GPU through
``srun`` (``--ntasks-per-node = --gpus``), Lightning's DDP under SLURM.

``slurm sweep`` writes an array of ``wandb agent`` tasks for a sweep created with ``wandb sweep``.
``sweep-trial`` runs one trial of a sweep YAML without the W&B controller: the parameters are
sampled from the YAML (seeded: ``--seed 0`` is "the first sample"), and the ``command`` is expanded
as ``wandb agent`` expands it (``${env}``, ``${interpreter}``, ``${program}``, ``${args}``), with the
environment an agent gives its trial (``WANDB_SWEEP_ID``, ``WANDB_RUN_ID``; offline unless logged in).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import yaml

from dg_lightning.cli_utils import split_overrides
from dg_lightning.core.errors import ConfigError
from dg_lightning.eval.lodo import fit_command, resolve_experiment


# -- SLURM --------------------------------------------------------------------------------------------
def sbatch_header(name: str, n_tasks: int, out: Path, gpus: int, cpus: int, mem: str, time: str,
                  partition: str | None, account: str | None, max_parallel: int | None, extra: list[str],
                  ntasks: int) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}",
             f"#SBATCH --array=0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else ""),
             "#SBATCH --nodes=1", f"#SBATCH --ntasks-per-node={ntasks}", f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --mem={mem}", f"#SBATCH --time={time}",
             "#SBATCH --signal=SIGUSR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
             f"#SBATCH --output={out}/%x_%A_%a.out"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += [f"#SBATCH {e}" for e in extra]
    return lines


def lodo_sbatch(configs: list[str], overrides: list[str], domains: list[str], seeds: list[int], out: Path,
                group: str, gpus: int = 1, cpus: int = 8, mem: str = "64G", time: str = "24:00:00",
                partition: str | None = None, account: str | None = None, max_parallel: int | None = None,
                setup: str = "", extra: list[str] = (), python: str = sys.executable) -> str:
    """The job-array script of a leave-one-domain-out experiment (module docstring)."""
    tasks = [(d, s) for s in seeds for d in domains]
    slurm_dir = out / "slurm"
    lines = sbatch_header(f"lodo-{group}", len(tasks), slurm_dir, gpus, cpus, mem, time, partition, account,
                          max_parallel, list(extra), ntasks=max(1, gpus))  # one process per GPU
    devices = [f"--trainer.devices={max(1, gpus)}", "--trainer.num_nodes=1"] + (
        ["--trainer.accelerator=gpu"] if gpus else ["--trainer.accelerator=cpu"])
    cmd = fit_command(configs, overrides + devices, "$DOMAIN", "$SEED", "$RUN", group, python=python)
    quoted = " ".join(shlex.quote(a) if "$" not in a else f'"{a}"' for a in cmd)
    lines += [
        "", "# one task per (held-out domain, seed)",
        "DOMAINS=(" + " ".join(shlex.quote(d) for d, _ in tasks) + ")",
        "SEEDS=(" + " ".join(str(s) for _, s in tasks) + ")",
        "DOMAIN=${DOMAINS[$SLURM_ARRAY_TASK_ID]}", "SEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}",
        f'RUN={shlex.quote(str(out))}/"$DOMAIN"/seed"$SEED"',
        f"cd {shlex.quote(os.getcwd())}",
        setup,
        'if [ -f "$RUN/results.json" ]; then echo "done before: $RUN/results.json"; exit 0; fi',
        'mkdir -p "$RUN"',
        "# requeued after SIGUSR1: Lightning resumes its own hpc_ckpt_<n>.ckpt; otherwise the last epoch, if any",
        'RESUME=""',
        'if [ -f "$RUN/checkpoints/last.ckpt" ]; then RESUME="--ckpt_path=last"; fi',
        'if compgen -G "$RUN/hpc_ckpt_*.ckpt" > /dev/null; then RESUME=""; fi',
        f"srun {quoted} $RESUME",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def sweep_sbatch(sweep_id: str, agents: int, count: int | None, out: Path, gpus: int = 1, cpus: int = 8,
                 mem: str = "64G", time: str = "24:00:00", partition: str | None = None, account: str | None = None,
                 setup: str = "", extra: list[str] = ()) -> str:
    """An array of ``agents`` tasks, each a ``wandb agent`` running up to ``count`` trials."""
    # one agent process per task; it starts each trial, and a multi-GPU trial uses Lightning's own launcher
    lines = sbatch_header("sweep-" + sweep_id.rsplit("/", 1)[-1], agents, out, gpus, cpus, mem, time, partition,
                          account, None, list(extra), ntasks=1)
    lines += ["", f"cd {shlex.quote(os.getcwd())}", setup,
              f"wandb agent {'--count ' + str(count) + ' ' if count else ''}{shlex.quote(sweep_id)}"]
    return "\n".join(lines) + "\n"


def slurm_main(argv: list[str]) -> int:
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="dg-lightning slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("lodo", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--gpus", type=int, default=1, help="GPUs per task (0: CPU)")
        s.add_argument("--cpus", type=int, default=8, help="CPUs per process")
        s.add_argument("--mem", default="64G")
        s.add_argument("--time", default="24:00:00")
        s.add_argument("--partition")
        s.add_argument("--account")
        s.add_argument("--setup", default="", help='shell line run first, e.g. "source ~/venvs/dg/bin/activate"')
        s.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option, e.g. --constraint=a100")
        s.add_argument("--submit", action="store_true", help="run sbatch on the script (else only write it)")
    lodo = sub.choices["lodo"]
    lodo.add_argument("--config", action="append", required=True)
    lodo.add_argument("--seeds", type=int, nargs="+", default=[0])
    lodo.add_argument("--domains", nargs="+", default=None)
    lodo.add_argument("--out", default=None)
    lodo.add_argument("--name", default=None)
    lodo.add_argument("--max-parallel", type=int, default=None)
    sweep = sub.choices["sweep"]
    sweep.add_argument("sweep_id", help="ENTITY/PROJECT/ID as printed by `wandb sweep`")
    sweep.add_argument("--agents", type=int, default=4)
    sweep.add_argument("--count", type=int, default=None, help="trials per agent (default: until the sweep ends)")
    sweep.add_argument("--out", default="runs/sweeps/slurm")
    args = p.parse_args(argv)
    if args.what == "lodo":
        domains, _, _, out, group = resolve_experiment(args, overrides)
        out = out.absolute()
        text = lodo_sbatch(args.config, overrides, domains, args.seeds, out, group, args.gpus, args.cpus, args.mem,
                           args.time, args.partition, args.account, args.max_parallel, args.setup, args.sbatch)
        script = out / "slurm" / "lodo.sbatch"
        n = len(domains) * len(args.seeds)
        after = f"when it is done: dg-lightning lodo {' '.join('--config ' + c for c in args.config)} " \
                f"--seeds {' '.join(map(str, args.seeds))} --out {out}  (prints the table)"
    else:
        out = Path(args.out).absolute()
        text = sweep_sbatch(args.sweep_id, args.agents, args.count, out, args.gpus, args.cpus, args.mem, args.time,
                            args.partition, args.account, args.setup, args.sbatch)
        script = out / f"sweep_{args.sweep_id.rsplit('/', 1)[-1]}.sbatch"
        n, after = args.agents, "results: the sweep's W&B page; locally: dg-lightning report runs/sweeps/<id>"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    print(f"wrote {script} ({n} array tasks)")
    if args.submit:
        proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        print(proc.stdout.strip())
    else:
        print(f"submit with: sbatch {script}")
    print(after)
    return 0


# -- W&B sweep trial without the controller --------------------------------------------------------
def sample_parameter(name: str, spec: dict, rng: np.random.RandomState):
    """One value of a W&B sweep parameter (the distributions W&B's random search draws from)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        values = spec["values"]
        return values[rng.randint(len(values))]
    dist = spec.get("distribution", "uniform" if isinstance(spec.get("min"), float) else "int_uniform")
    lo, hi = spec["min"], spec["max"]
    if dist == "uniform":
        return float(rng.uniform(lo, hi))
    if dist == "int_uniform":
        return int(rng.randint(lo, hi + 1))
    if dist == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if dist == "log_uniform":  # min/max are exponents of e
        return float(math.exp(rng.uniform(lo, hi)))
    if dist == "q_log_uniform_values":
        q = spec.get("q", 1)
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / q) * q)
    raise ConfigError(f"sweep parameter {name}: distribution {dist!r} is not supported by sweep-trial")


def sample_sweep(config: dict, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    return {name: sample_parameter(name, spec, rng) for name, spec in config["parameters"].items()}


def expand_command(config: dict, params: dict, python: str = sys.executable) -> list[str]:
    """``command`` with W&B's macros expanded (default: ``${env} ${interpreter} ${program} ${args}``)."""
    command = config.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    args = [f"--{k}={v}" for k, v in params.items()]
    out: list[str] = []
    for token in command:
        if token == "${env}":
            continue  # /usr/bin/env: the trial inherits this environment
        if token == "${interpreter}":
            out.append(python)
        elif token == "${program}":
            out.append(config["program"])
        elif token == "${args}":
            out += args
        elif token == "${args_no_hyphens}":
            out += [a[2:] for a in args]
        else:
            out.append(token)
    return out


def sweep_trial_main(argv: list[str]) -> int:
    argv, extra = split_overrides(argv)
    p = argparse.ArgumentParser(prog="dg-lightning sweep-trial", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a W&B sweep YAML (experiments/sweeps/...)")
    p.add_argument("--seed", type=int, default=0, help="which sample of the search space (0: the first)")
    p.add_argument("--dry-run", action="store_true", help="print the trial's command and stop")
    args = p.parse_args(argv)
    config = yaml.safe_load(Path(args.sweep).read_text())
    params = sample_sweep(config, args.seed)
    cmd = expand_command(config, params) + extra
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    name = Path(args.sweep).stem
    env = {**os.environ, "WANDB_SWEEP_ID": os.environ.get("WANDB_SWEEP_ID", f"local-{name}"),
           "WANDB_RUN_ID": os.environ.get("WANDB_RUN_ID", uuid.uuid4().hex[:8])}
    return subprocess.run(cmd, env=env).returncode
