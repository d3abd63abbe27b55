"""Leave-one-domain-out experiments: every held-out domain x seed, one table.

    dg-lightning lodo --config experiments/pacs/erm.yaml --seeds 0 1 2 [--domains photo sketch]
                      [--out runs/lodo/NAME] [-- --trainer.max_epochs 5 ...]

Each run is a ``dg-lightning fit`` in its own process (so DDP, W&B and memory behave as in a single
run), in ``<out>/<domain>/seed<seed>``, resumed from its last checkpoint if it was interrupted and
skipped if it already has ``results.json``. At the end: ``<out>/results.json`` (every run, both
selections, raw accuracies, resolved config paths), ``<out>/summary.md`` (the table),
``<out>/per_domain.png`` and a W&B summary run in the experiment's group.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.bench import split_overrides
from dg_lightning.eval.report import bar_chart, markdown_table


def discover_domains(configs: list[str], overrides: list[str]) -> tuple[list[str], str, str]:
    """Domains of the configured data module, and the method's and data module's class names.

    Parses the configs and overrides exactly as ``fit`` will, but builds only the data module
    (no model, so no weights are loaded or downloaded here).
    """
    from jsonargparse import ArgumentParser

    from dg_lightning.cli import DGCLI
    from dg_lightning.core.data import MultiDomainDataModule

    class DataOnly(DGCLI):
        def instantiate_classes(self) -> None:
            import importlib

            path = self.config["data"]["class_path"]
            module, name = path.rsplit(".", 1)
            if not issubclass(getattr(importlib.import_module(module), name), MultiDomainDataModule):
                raise SystemExit(f"lodo holds out each domain of a multi-domain benchmark in turn; {name} is not "
                                 "one (a segmentation benchmark trains on its source and tests every target in "
                                 "one run; WILDS has fixed official splits): use `dg-lightning fit --config ...`, "
                                 "and `dg-lightning report` over several seeds")
            parser = ArgumentParser()
            parser.add_subclass_arguments(MultiDomainDataModule, "data", required=True)
            cfg = parser.parse_object({"data": self.config["data"].as_dict()})
            self.datamodule = parser.instantiate_classes(cfg).data

    args = [a for c in configs for a in ("--config", c)] + overrides
    cli = DataOnly(args=args, run=False)
    method = cli.config["model"]["class_path"].rsplit(".", 1)[-1]
    return list(cli.datamodule.domains), method, type(cli.datamodule).__name__


def resolve_experiment(args, overrides: list[str], parser: argparse.ArgumentParser
                       ) -> tuple[list[str], str, str, Path, str]:
    """(held-out domains, method, benchmark, experiment directory, W&B group) of a LODO command line
    (``--config``, ``--domains``, ``--out``, ``--name``); an unknown domain is a parser error."""
    domains, method, data = discover_domains(args.config, overrides)
    if args.domains:
        unknown = [d for d in args.domains if d not in domains]
        if unknown:
            parser.error(f"unknown domain(s) {unknown}; valid domains: {domains}")
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


def run_one(configs, overrides, domain, seed, run_dir: Path, group: str) -> dict:
    results = run_dir / "results.json"
    if results.exists():
        print(f"  done before: {results}", flush=True)
        return json.loads(results.read_text())
    cmd = fit_command(configs, overrides, domain, seed, run_dir, group) + ["--ckpt_path=last"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0 or not results.exists():
        raise RuntimeError(f"run failed (exit {proc.returncode}): held-out {domain}, seed {seed}; "
                           f"command in {run_dir / 'command.txt'}; rerun `lodo` to resume it")
    return json.loads(results.read_text())


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

    domains, method, data, out, group = resolve_experiment(args, overrides, p)
    overrides = overrides + [f"--wandb.mode={args.wandb_mode}", f"--wandb.project={args.wandb_project}"]
    t0 = time.time()
    records = []
    runs = [(d, s) for s in args.seeds for d in domains]
    for k, (d, s) in enumerate(runs, 1):
        print(f"\n=== [{k}/{len(runs)}] {method} on {data}: held-out {d}, seed {s} ===", flush=True)
        records.append(run_one(args.config, overrides, d, s, out / d / f"seed{s}", group))
    rows = [row for rec in records for row in flatten(rec)]
    title = f"{method} on {data}, leave-one-domain-out ({group})"
    table = markdown_table(rows, title)
    if any(r.get("in_domain") is not None for r in rows):
        table += "\n\n" + markdown_table(
            rows, metric="In-domain accuracy (source domains' validation splits; column = the run's held-out domain)",
            key="in_domain")
    png = bar_chart(rows, out / "per_domain.png", title)
    summary = {
        "experiment": group, "method": method, "data": data, "domains": domains, "seeds": args.seeds,
        "configs": args.config, "overrides": overrides, "wall_seconds": round(time.time() - t0, 1),
        "test_split": records[0].get("test_split") if records else None, "runs": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table + f"\n\nresults: {out / 'results.json'}   plot: {png}", flush=True)
    log_summary_to_wandb(rows, table, png, group, args.wandb_project, args.wandb_mode)
    return 0
