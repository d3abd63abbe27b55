"""Model selection over a hyperparameter sweep: DomainBed's three criteria.

Follows ``domainbed/model_selection.py`` and ``domainbed/lib/reporting.py`` (Gulrajani & Lopez-Paz
2021). The runs of a sweep (``dg-lightning sweep``) differ in hyperparameters (``hparams_seed``),
trial seed and held-out domain(s); each run directory holds ``sweep_run.json`` (those coordinates and
the hyperparameters) and ``records.jsonl`` (every domain's accuracy at every checkpoint, see
:mod:`dg_lightning.core.records`). Runs are grouped by (trial seed, benchmark, method, held-out
domain ``t``), a run with two held-out domains belonging to the groups of both. Within a group, each
criterion scores every hyperparameter setting by a validation accuracy ``val`` and a test accuracy
``test`` (always the accuracy on ``t``'s "in" split, DomainBed's ``env<t>_in_acc``), keeps the setting
with the highest ``val`` and reports its ``test``; the table then averages over trial seeds.

* **training-domain validation set**: the run holding out ``t`` alone; its checkpoint with the best
  mean accuracy over the source domains' "out" splits (``val``) gives ``test``;
* **leave-one-domain-out cross-validation**: at each checkpoint step, ``val`` is the mean over the other
  domains ``v`` of the accuracy on ``v``'s "in" split in the run that holds out both ``t`` and ``v`` (the
  sum divided by the number of domains minus one, as DomainBed does); ``test`` is the single-held-out
  run's at the same step; the best step is chosen, then the best setting. A setting missing a
  two-held-out run (or a step in one) cannot be scored at that step;
* **test-domain validation set (oracle)**: the single-held-out run's *last* checkpoint (no early
  stopping); ``val`` is its accuracy on ``t``'s "out" split.

Ties: DomainBed keeps the first checkpoint among equal ``val`` and an unspecified setting among
equal settings (its order comes from the directory listing); here the lowest ``hparams_seed``
wins. The ± of the tables is this project's (sample standard deviation / sqrt(n)), where DomainBed's
``collect_results.py`` divides the population standard deviation by sqrt(n).

A run counts once it has finished (``results.json`` written, DomainBed's ``done``); unfinished runs
are named in the warnings and left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dg_lightning.core.records import read_records

SWEEP_FILE = "sweep_run.json"
TRAINING_DOMAIN = "training-domain validation set"
LEAVE_ONE_OUT = "leave-one-domain-out cross-validation"
ORACLE = "test-domain validation set (oracle)"
CRITERIA = (TRAINING_DOMAIN, LEAVE_ONE_OUT, ORACLE)


@dataclass
class SweepRun:
    """One run of a sweep: its coordinates, hyperparameters and per-checkpoint records."""

    path: Path
    algorithm: str
    dataset: str
    trial_seed: int
    hparams_seed: int
    test_domains: tuple[str, ...]
    hparams: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    label: str = ""

    def record_at(self, step: int) -> dict | None:
        return next((r for r in self.records if r["step"] == step), None)


def load_sweep_run(run_dir: str | Path, label: str | None = None) -> SweepRun:
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / SWEEP_FILE).read_text())
    return SweepRun(path=run_dir, algorithm=meta["algorithm"], dataset=meta["dataset"],
                    trial_seed=int(meta["trial_seed"]), hparams_seed=int(meta["hparams_seed"]),
                    test_domains=tuple(meta["test_domains"]), hparams=meta.get("hparams", {}),
                    records=read_records(run_dir), label=label or meta["algorithm"])


def is_sweep_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SWEEP_FILE).is_file()


def find_sweep_runs(paths: list[str | Path], label: str = "method") -> tuple[list[SweepRun], list[str]]:
    """Every finished sweep run under ``paths`` (``label='dir'``: rows named by the directory given),
    and warnings for unfinished ones or ones without records."""
    runs, warnings = [], []
    for root in map(Path, paths):
        metas = [root / SWEEP_FILE] if (root / SWEEP_FILE).is_file() else sorted(root.rglob(SWEEP_FILE))
        for meta in metas:
            run_dir = meta.parent
            if not (run_dir / "results.json").is_file():
                warnings.append(f"{run_dir}: not finished (no results.json), left out of the sweep selection")
                continue
            run = load_sweep_run(run_dir, root.name if label == "dir" else None)
            if not run.records:
                warnings.append(f"{run_dir}: no records.jsonl (was it run without the DomainBedRecords callback?), "
                                "left out of the sweep selection")
                continue
            runs.append(run)
    return runs, warnings


# -- per-run and per-setting scores (DomainBed's run_acc) ---------------------------------------------

def _first_max(items: list[dict]) -> dict | None:
    """The item with the highest ``val`` (the first among equals)."""
    best = None
    for item in items:
        if best is None or item["val"] > best["val"]:
            best = item
    return best


def training_domain_acc(run: SweepRun, t: str) -> dict | None:
    """Best checkpoint of a single-held-out run by mean source validation accuracy."""
    if run.test_domains != (t,):
        return None
    return _first_max([{"val": float(np.mean(list(r["val"].values()))), "test": r["test_in"][t], "step": r["step"]}
                       for r in run.records])


def oracle_acc(run: SweepRun, t: str) -> dict | None:
    """Last checkpoint of a single-held-out run, scored on ``t``'s "out" split."""
    if run.test_domains != (t,):
        return None
    last = run.records[-1]
    return {"val": last["test_out"][t], "test": last["test_in"][t], "step": last["step"]}


def leave_one_out_acc(runs: list[SweepRun], t: str) -> dict | None:
    """One setting's runs in the group of ``t``: the single-held-out run and the two-held-out runs."""
    single = [r for r in runs if r.test_domains == (t,)]
    if len(single) != 1:
        return None
    single = single[0]
    domains = sorted(set(single.records[0]["val"]) | set(single.records[0]["test_in"]))
    pairs = {next(d for d in r.test_domains if d != t): r for r in runs if len(r.test_domains) == 2}
    scored = []
    for record in single.records:
        vals = []
        for v in domains:
            if v == t:
                continue
            other = pairs[v].record_at(record["step"]) if v in pairs else None
            if other is None:
                break
            vals.append(other["test_in"][v])
        else:
            scored.append({"val": float(np.sum(vals) / (len(domains) - 1)), "test": record["test_in"][t],
                           "step": record["step"]})
    return _first_max(scored)


def select(runs: list[SweepRun], criterion: str) -> list[dict]:
    """One row per (label, benchmark, held-out domain, trial seed): the chosen setting's test accuracy.

    Rows carry ``method`` (the label), ``data``, ``selection`` (the criterion), ``domain``, ``seed``
    (the trial seed), ``acc``, ``val``, ``hparams_seed``, ``hparams``, ``step``, ``n_hparams`` (settings
    scored) and ``file`` (the chosen run's directory).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")
    groups: dict[tuple, dict[int, list[SweepRun]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for t in run.test_domains:
            groups[(run.label, run.dataset, t, run.trial_seed)][run.hparams_seed].append(run)
    rows = []
    for (label, dataset, t, trial), by_hparams in sorted(groups.items()):
        scored = []
        for h in sorted(by_hparams):
            setting = by_hparams[h]
            if criterion == LEAVE_ONE_OUT:
                acc = leave_one_out_acc(setting, t)
            else:
                fn = training_domain_acc if criterion == TRAINING_DOMAIN else oracle_acc
                acc = next((a for a in (fn(r, t) for r in setting) if a is not None), None)
            if acc is not None:
                single = next(r for r in setting if r.test_domains == (t,))
                scored.append({**acc, "hparams_seed": h, "hparams": single.hparams, "file": str(single.path)})
        best = _first_max(scored)
        if best is not None:
            rows.append({"method": label, "data": dataset, "selection": criterion, "domain": t, "seed": trial,
                         "acc": best["test"], "val": best["val"], "step": best["step"],
                         "hparams_seed": best["hparams_seed"], "hparams": best["hparams"],
                         "n_hparams": len(scored), "file": best["file"], "metric": "accuracy"})
    return rows


def sweep_rows(runs: list[SweepRun], criteria: tuple[str, ...] = CRITERIA) -> list[dict]:
    return [row for c in criteria for row in select(runs, c)]


def sweep_note(rows: list[dict]) -> str:
    """The footnote of a sweep table: what was averaged and over how many settings."""
    trials = sorted({r["seed"] for r in rows})
    n = sorted({r["n_hparams"] for r in rows})
    settings = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
    return (f"hyperparameters chosen per held-out domain and trial among {settings} setting(s) by the criterion; "
            f"mean ± standard error over {len(trials)} trial seed(s) {trials}; test = the held-out domain's "
            "\"in\" split (DomainBed); Avg = mean over domains per trial, then over trials.")
