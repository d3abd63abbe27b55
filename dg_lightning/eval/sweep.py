"""``dg-lightning sweep``: DomainBed's hyperparameter sweep, run locally, resumable.

    dg-lightning sweep --config experiments/cpu/cmnist_erm.yaml --n-hparams 20 --n-trials 3 \\
        [--hparams-from 0] [--single-test-envs] [--out runs/sweep/erm-coloredmnist] [--dry-run] [-- overrides]

Follows ``domainbed/scripts/sweep.py`` (Gulrajani & Lopez-Paz 2021): for every trial seed ``t`` in
``0..n_trials-1``, every held-out set (each domain alone and, for leave-one-domain-out selection,
each pair of domains; ``--single-test-envs``: alone only) and every ``hparams_seed`` in
``hparams_from..n_hparams-1``, one ``dg-lightning fit`` with

* the hyperparameters of the registry (:mod:`dg_lightning.methods.hparams`): the defaults for
  ``hparams_seed`` 0, else DomainBed's draw seeded by ``seed_hash(hparams_seed, t)``, as overrides
  (overrides given after ``--`` come later and win, like DomainBed's ``--hparams``);
* ``--data.split_seed=t`` (DomainBed's split is seeded by the trial seed);
* ``--seed_everything=seed_hash(benchmark, method, held-out indices, hparams_seed, t)``, DomainBed's
  run seed (it also builds ColoredMNIST / RotatedMNIST, whose ``shuffle_seed`` defaults to it);
* the :class:`~dg_lightning.core.records.DomainBedRecords` callback, which scores the held-out domains'
  "in" and "out" splits at every validation (the criteria's inputs).

Runs go to ``<out>/<held-out>/trial<t>/hp<h>/`` with ``sweep_run.json`` (coordinates, hyperparameters,
command). A run with ``results.json`` is done and skipped; an interrupted one resumes from its last
checkpoint; a failed one is reported at the end and the others go on. Rerun the same command to finish
a sweep. At the end, ``<out>/sweep.md`` and ``<out>/sweep.json`` hold the tables of DomainBed's three
criteria (:mod:`dg_lightning.eval.model_selection`) and the chosen hyperparameters;
``dg-lightning report <out>`` makes the same tables (with LaTeX and a chart).

Every run must validate at the same steps (the leave-one-domain-out criterion compares runs step by
step): fix ``data.steps_per_epoch`` in the YAML (DomainBed's ``checkpoint_freq``), as the shipped
MNIST YAMLs do. A W&B sweep (``experiments/sweeps/``, ``dg-lightning slurm sweep``) remains the way to
search on a cluster; this command is DomainBed's grid on one machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.cli_utils import split_overrides
from dg_lightning.core.errors import ConfigError
from dg_lightning.core.seeding import seed_hash
from dg_lightning.eval import model_selection as ms
from dg_lightning.eval.lodo import discover_domains
from dg_lightning.eval.report import method_tables, report_markdown
from dg_lightning.methods.hparams import SMALL_IMAGES, as_overrides, default_hparams, random_hparams, registry

RECORDS_CALLBACK = "dg_lightning.core.records.DomainBedRecords"


def trial_hparams(method: str, dataset: str, hparams_seed: int, trial_seed: int) -> dict:
    """A sweep run's hyperparameters (config key -> value), as ``domainbed/scripts/train.py`` picks them:
    the defaults for ``hparams_seed`` 0, else ``random_hparams(method, dataset, seed_hash(hparams_seed, trial_seed))``."""
    if hparams_seed == 0:
        return default_hparams(method, dataset)
    return random_hparams(method, dataset, seed_hash(hparams_seed, trial_seed))


def applied(dataset: str, hparams: dict) -> dict:
    """The hyperparameters a run applies: DomainBed draws ``resnet_dropout`` for its 28 x 28 benchmarks too,
    but their MNIST CNN has no dropout, so there it is recorded and not applied."""
    return {k: v for k, v in hparams.items() if not (dataset in SMALL_IMAGES and k == "model.dropout")}


def held_out_sets(n: int, single: bool) -> list[list[int]]:
    """DomainBed's held-out sets: each index alone and, unless ``single``, each pair (needs >= 3 domains)."""
    if single:
        return [[i] for i in range(n)]
    if n < 3:
        raise ConfigError(f"leave-one-domain-out selection needs at least 3 domains (this benchmark has {n})",
                          fix="use --single-test-envs")
    out = []
    for i in range(n):
        out.append([i])
        out += [[i, j] for j in range(i + 1, n)]
    return out


def plan(configs: list[str], overrides: list[str], n_hparams: int, n_trials: int, hparams_from: int = 0,
         single_test_envs: bool = False, out: str | Path | None = None, domains: list[str] | None = None,
         python: str = sys.executable) -> tuple[Path, list[dict]]:
    """The sweep's output directory and its jobs: ``{"run_dir", "command", "meta"}`` each."""
    all_domains, method, data = discover_domains(configs, overrides)
    registry(method, data)  # an unregistered method fails here, before anything runs
    chosen = domains or all_domains
    unknown = [d for d in chosen if d not in all_domains]
    if unknown:
        raise ConfigError(f"unknown domain(s) {unknown}; valid domains: {all_domains}",
                          fix=f"--domains: some of {all_domains}")
    out = Path(out or Path("runs") / "sweep" / f"{method.lower()}-{data.lower()}")
    jobs = []
    for trial, env_set, h in itertools.product(range(n_trials), held_out_sets(len(chosen), single_test_envs),
                                               range(hparams_from, n_hparams)):
        held = [chosen[i] for i in env_set]
        indices = [all_domains.index(d) for d in held]
        hparams = trial_hparams(method, data, h, trial)
        seed = seed_hash(data, method, indices, h, trial)
        run_dir = out / "+".join(held) / f"trial{trial}" / f"hp{h}"
        quoted = ", ".join(f"'{d}'" for d in held)
        # the registry's values, then the user's overrides (which win, as DomainBed's --hparams does)
        cmd = [python, "-m", "dg_lightning.cli", "fit", *[a for c in configs for a in ("--config", c)],
               *as_overrides(applied(data, hparams)), *overrides, f"--data.test_domains=[{quoted}]",
               f"--data.split_seed={trial}",
               f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}",
               f"--trainer.callbacks+={RECORDS_CALLBACK}", f"--wandb.group={out.name}",
               f"--wandb.name={out.name}-{'+'.join(held)}-trial{trial}-hp{h}"]
        meta = {"algorithm": method, "dataset": data, "test_domains": held, "test_envs": indices,
                "trial_seed": trial, "hparams_seed": h, "hparams": hparams, "seed": seed, "configs": configs,
                "overrides": overrides, "domains": all_domains}
        jobs.append({"run_dir": run_dir, "command": cmd, "meta": meta})
    return out, jobs


def job_state(run_dir: Path) -> str:
    if (run_dir / "results.json").is_file():
        return "done"
    return "incomplete" if run_dir.exists() else "not launched"


def run_job(job: dict) -> int:
    run_dir: Path = job["run_dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = job["command"] + ["--ckpt_path=last"]
    (run_dir / ms.SWEEP_FILE).write_text(json.dumps({**job["meta"], "command": cmd}, indent=2))
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    return subprocess.run(cmd, env=os.environ.copy()).returncode


def sweep_tables(out: Path) -> tuple[str, list[dict], list[str]]:
    """Markdown tables of the three criteria over the finished runs under ``out``, the rows, warnings."""
    runs, warnings = ms.find_sweep_runs([out])
    rows = ms.sweep_rows(runs)
    if not rows:
        return "", rows, warnings
    tables = method_tables(rows)
    notes = {key: ms.sweep_note([r for r in rows if (r["data"], r["selection"]) == key]) for key in tables}
    return report_markdown(tables, notes=notes), rows, warnings


def main(argv: list[str]) -> int:
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="dg-lightning sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
    p.add_argument("--n-hparams", type=int, default=20, help="hparams seeds hparams_from..n-1 (0 = defaults)")
    p.add_argument("--hparams-from", type=int, default=0)
    p.add_argument("--n-trials", type=int, default=3, help="trial seeds 0..n-1")
    p.add_argument("--single-test-envs", action="store_true",
                   help="hold out one domain at a time only (no leave-one-domain-out selection)")
    p.add_argument("--domains", nargs="+", default=None,
                   help="use only these domains (default: all); a name starting with - as --domains=-90%%")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweep/<method>-<data>)")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their states, run nothing")
    p.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--wandb-project", default="dg-lightning")
    args = p.parse_args(argv)
    if args.n_hparams <= args.hparams_from or args.n_trials < 1:
        p.error("need --n-hparams > --hparams-from and --n-trials >= 1")
    overrides = overrides + [f"--wandb.mode={args.wandb_mode}", f"--wandb.project={args.wandb_project}"]
    # a config or data error (unknown domain, unregistered method, wrong data root) is a DGError: the
    # CLI's error path (cli_utils.guarded) prints it and exits with status 2
    out, jobs = plan(args.config, overrides, args.n_hparams, args.n_trials, args.hparams_from,
                     args.single_test_envs, args.out, args.domains)
    states = [job_state(j["run_dir"]) for j in jobs]
    for job, state in zip(jobs, states):
        m = job["meta"]
        print(f"{state:>12}: {job['run_dir']}  (held out {m['test_domains']}, trial {m['trial_seed']}, "
              f"hparams {m['hparams_seed']}: {m['hparams']})")
    print(f"{len(jobs)} jobs: {states.count('done')} done, {states.count('incomplete')} incomplete, "
          f"{states.count('not launched')} not launched.", flush=True)
    if args.dry_run:
        return 0
    t0, failed = time.time(), []
    todo = [j for j, s in zip(jobs, states) if s != "done"]
    for k, job in enumerate(todo, 1):
        m = job["meta"]
        print(f"\n=== [{k}/{len(todo)}] {m['algorithm']} on {m['dataset']}: held out {m['test_domains']}, "
              f"trial {m['trial_seed']}, hparams {m['hparams_seed']} ===", flush=True)
        if run_job(job) != 0 or not (job["run_dir"] / "results.json").is_file():
            failed.append(job["run_dir"])
            print(f"run failed: {job['run_dir']} (command in command.txt); rerun the sweep to retry it", flush=True)
    md, rows, warnings = sweep_tables(out)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(md + "\n")
    (out / "sweep.json").write_text(json.dumps({
        "configs": args.config, "overrides": overrides, "n_hparams": args.n_hparams,
        "hparams_from": args.hparams_from, "n_trials": args.n_trials, "single_test_envs": args.single_test_envs,
        "jobs": len(jobs), "failed": [str(f) for f in failed], "wall_seconds": round(time.time() - t0, 1),
        "choices": [{k: r[k] for k in ("method", "data", "selection", "domain", "seed", "acc", "val", "step",
                                        "hparams_seed", "hparams", "file")} for r in rows],
    }, indent=2))
    print("\n" + md + f"\nsweep: {out / 'sweep.md'}, {out / 'sweep.json'}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {[str(f) for f in failed]}", file=sys.stderr)
        return 1
    return 0
