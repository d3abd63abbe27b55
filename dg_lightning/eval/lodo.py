"""Leave-one-domain-out experiments: every held-out domain x seed, one table.

    dg-lightning lodo --config experiments/pacs/erm.yaml --seeds 0 1 2 [--domains photo sketch]
                      [--out runs/lodo/NAME] [-- --trainer.max_epochs 5 ...]

Each run is a ``dg-lightning fit`` in its own process (so DDP, W&B and memory behave as in a single
run), in ``<out>/<domain>/seed<seed>``, resumed from its last checkpoint if it was interrupted and
skipped if it already has ``results.json``. After the first run it trains, it prints an ETA for the
rest. A run whose loss became non-finite (exit status 3) is reported as failed and the next run
starts; any other failure stops the experiment (rerunning the command resumes it). At the end:
``<out>/results.json`` (every run, both selections, raw accuracies, resolved config paths, the
failed runs, and the command, commit and machine), ``<out>/summary.md`` (the table),
``<out>/per_domain.png`` and a W&B summary run in the experiment's group. Exit status 3 when a run
failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.cli_utils import split_overrides
from dg_lightning.core.callbacks import FailureRecord
from dg_lightning.core.errors import ConfigError, DGError, NonFiniteLossError
from dg_lightning.eval.provenance import provenance
from dg_lightning.eval.report import bar_chart, markdown_table


def discover_domains(configs: list[str], overrides: list[str]) -> tuple[list[str], str, str]:
    """Domains of the configured data module, and the method's and data module's class names.

    Parses the configs and overrides exactly as ``fit`` will, but builds only the data module
    (no model, so no weights are loaded or downloaded here).
    """
    from dg_lightning.core.data import MultiDomainDataModule
    from dg_lightning.lightning_cli import build_datamodule

    def multi_domain(cls: type) -> None:
        if not issubclass(cls, MultiDomainDataModule):
            raise ConfigError(f"lodo holds out each domain of a multi-domain benchmark in turn; {cls.__name__} is "
                              "not one (a segmentation benchmark trains on its source and tests every target in "
                              "one run; WILDS has fixed official splits)",
                              fix="use `dg-lightning fit --config ...`, and `dg-lightning report` over several seeds")

    args = [a for c in configs for a in ("--config", c)] + overrides
    dm, config = build_datamodule(args, check_class=multi_domain, with_config=True)
    method = config["model"]["class_path"].rsplit(".", 1)[-1]
    return list(dm.domains), method, type(dm).__name__


def resolve_experiment(args, overrides: list[str]) -> tuple[list[str], str, str, Path, str]:
    """(held-out domains, method, benchmark, experiment directory, W&B group) of a LODO command line
    (``--config``, ``--domains``, ``--out``, ``--name``); an unknown domain is a ``ConfigError``."""
    domains, method, data = discover_domains(args.config, overrides)
    if args.domains:
        unknown = [d for d in args.domains if d not in domains]
        if unknown:
            raise ConfigError(f"unknown domain(s) {unknown} in --domains; valid domains: {domains}",
                              fix=f"--domains {' '.join(d for d in domains)} (or a subset)")
        domains = args.domains
    out = Path(args.out or Path("runs") / "lodo" / f"{method.lower()}-{data.lower()}")
    return domains, method, data, out, args.name or out.name


def fit_command(configs: list[str], overrides: list[str], domain: str, seed: int, run_dir: Path | str, group: str,
                python: str = sys.executable) -> list[str]:
    """The ``fit`` of one held-out domain and seed, in ``run_dir`` (``lodo`` and ``slurm lodo`` share it).
    The domain is quoted so that a name YAML would read as a number (RotatedMNIST's ``15``) stays a name."""
    return [python, "-m", "dg_lightning.cli", "fit", *[a for c in configs for a in ("--config", c)], *overrides,
            f"--data.test_domains=['{domain}']", f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}",
            f"--wandb.group={group}", f"--wandb.name={group}-{domain}-seed{seed}"]


class RunFailed(DGError):
    """A run of the experiment ended with an error that is not a diverged loss: ``lodo`` stops (the
    next runs would meet it too); the run's own message is printed above."""


def run_one(configs, overrides, domain, seed, run_dir: Path, group: str) -> dict:
    """One held-out domain and seed: its ``results.json`` record, or ``{"failed": ...}`` when its loss
    became non-finite (exit status 3; ``lodo`` goes on with the next run)."""
    results = run_dir / "results.json"
    if results.exists():
        print(f"  done before: {results}", flush=True)
        return json.loads(results.read_text())
    cmd = fit_command(configs, overrides, domain, seed, run_dir, group)
    if (run_dir / "checkpoints" / "last.ckpt").is_file():  # interrupted before: resume
        cmd.append("--ckpt_path=last")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode == NonFiniteLossError.exit_code:
        failed = run_dir / FailureRecord.FILE
        reason = json.loads(failed.read_text())["message"].splitlines()[0] if failed.is_file() else "non-finite loss"
        return {"failed": {"domain": domain, "seed": seed, "run_dir": str(run_dir), "reason": reason}}
    if proc.returncode != 0 or not results.exists():
        err = RunFailed(f"run failed (exit {proc.returncode}): held-out {domain}, seed {seed}; its error is above",
                        fix=f"fix it, then rerun the same lodo command (finished runs are kept; the command of "
                            f"this run is in {run_dir / 'command.txt'})")
        err.exit_code = proc.returncode if proc.returncode > 0 else 1
        raise err
    return json.loads(results.read_text())


def eta_line(done_seconds: list[float], remaining: int) -> str:
    """``ETA ...`` from the runs trained so far (runs found done are not counted)."""
    per_run = sum(done_seconds) / len(done_seconds)
    finish = datetime.datetime.now() + datetime.timedelta(seconds=per_run * remaining)
    left = per_run * remaining / 60
    return (f"ETA: {remaining} run(s) left at {per_run / 60:.1f} min each -> about {left:.{1 if left < 10 else 0}f} "
            f"min more (done around {finish:%H:%M})")


def flatten(record: dict) -> list[dict]:
    """One row per (selection, held-out domain) of a run's results.json."""
    rows = []
    for sel, r in record["selections"].items():
        for d, acc in r["test"].items():
            rows.append({
                "domain": d, "seed": record["seed"], "selection": sel, "acc": acc,
                "val": r.get("val"), "epoch": r.get("epoch"), "checkpoint": r.get("checkpoint"),
                "method": record["method"], "data": record["data"], "config": record["config"],
                "run_dir": record["run_dir"], "fit_seconds": record.get("fit_seconds"),
                "in_domain": r.get("in_domain_mean"), "parts": r.get("parts"),
            })
    return rows


def log_summary_to_wandb(rows: list[dict], table_md: str, png: Path, group: str, project: str, mode: str) -> None:
    from dg_lightning.core.logging import resolve_wandb_mode

    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb

    cols = ["selection", "domain", "seed", "acc", "val", "epoch", "config"]
    with wandb.init(project=project, group=group, name=f"{group}-summary", job_type="summary", mode=mode,
                    dir=str(png.parent), reinit="finish_previous") as run:
        run.log({"lodo/table": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows]),
                 "lodo/per_domain": wandb.Image(str(png)), "lodo/summary_md": wandb.Html(f"<pre>{table_md}</pre>")})


def main(argv: list[str]) -> int:
    command = "dg-lightning lodo " + shlex.join(argv)
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="dg-lightning lodo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--domains", nargs="+", default=None, help="held-out domains (default: every domain)")
    p.add_argument("--out", default=None, help="experiment directory (default runs/lodo/<method>-<data>)")
    p.add_argument("--name", default=None, help="experiment name = W&B group (default: out's name)")
    p.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--wandb-project", default="dg-lightning")
    args = p.parse_args(argv)

    domains, method, data, out, group = resolve_experiment(args, overrides)
    overrides = overrides + [f"--wandb.mode={args.wandb_mode}", f"--wandb.project={args.wandb_project}"]
    t0 = time.time()
    records, failed, seconds = [], [], []
    runs = [(d, s) for s in args.seeds for d in domains]
    todo = sum(not (out / d / f"seed{s}" / "results.json").exists() for d, s in runs)
    for k, (d, s) in enumerate(runs, 1):
        print(f"\n=== [{k}/{len(runs)}] {method} on {data}: held-out {d}, seed {s} ===", flush=True)
        fresh, start = not (out / d / f"seed{s}" / "results.json").exists(), time.time()
        record = run_one(args.config, overrides, d, s, out / d / f"seed{s}", group)
        if "failed" in record:
            failed.append(record["failed"])
            print(f"  FAILED: held-out {d}, seed {s}: {record['failed']['reason']}; going on with the next run",
                  flush=True)
        else:
            records.append(record)
        if fresh:
            seconds.append(time.time() - start)
            todo -= 1
            if todo:
                print(eta_line(seconds, todo), flush=True)
    rows = [row for rec in records for row in flatten(rec)]
    title = f"{method} on {data}, leave-one-domain-out ({group})"
    table = markdown_table(rows, title) if rows else f"**{title}**\n\nno run finished"
    if any(r.get("in_domain") is not None for r in rows):
        table += "\n\n" + markdown_table(
            rows, metric="In-domain accuracy (source domains' validation splits; column = the run's held-out domain)",
            key="in_domain")
    if failed:
        table += "\n\nFailed runs (left out of the table above):\n" + "\n".join(
            f"- held-out {f['domain']}, seed {f['seed']}: {f['reason']} ({f['run_dir']})" for f in failed)
    png = bar_chart(rows, out / "per_domain.png", title) if rows else None
    summary = {
        "experiment": group, "method": method, "data": data, "domains": domains, "seeds": args.seeds,
        "configs": args.config, "overrides": overrides, "wall_seconds": round(time.time() - t0, 1),
        "test_split": records[0].get("test_split") if records else None, **provenance(command),
        "runs": rows, "failed": failed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {out / 'results.json'}" + (f"   plot: {png}" if png else ""), flush=True)
    if png:
        log_summary_to_wandb(rows, table, png, group, args.wandb_project, args.wandb_mode)
    return NonFiniteLossError.exit_code if failed else 0
