"""Per-domain tables from run records: mean ± standard error over seeds, selection named."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dg_lightning.core.errors import DataNotFoundError


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)); ``None`` error for a single value."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), None
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def fmt(mean: float, se: float | None, scale: float = 100.0) -> str:
    return f"{scale * mean:.1f}" if se is None else f"{scale * mean:.1f} ± {scale * se:.1f}"


def per_domain_table(rows: list[dict], key: str = "acc") -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """``rows``: flat records with ``selection``, ``domain``, ``seed`` and the value ``key``
    (default ``acc``; rows whose value is missing are left out).

    Returns {selection: {domain or "Avg": (mean, se, n_seeds)}}. "Avg" averages the domains within
    each seed first (seeds missing a domain are left out of it), then takes mean ± se over seeds.
    """
    out: dict[str, dict] = {}
    by_sel: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            by_sel[r["selection"]].append({**r, "acc": r[key]})
    for sel, rs in by_sel.items():
        domains = sorted({r["domain"] for r in rs})
        table = {}
        for d in domains:
            vals = [r["acc"] for r in rs if r["domain"] == d]
            table[d] = (*mean_se(vals), len(vals))
        per_seed: dict[int, dict[str, float]] = defaultdict(dict)
        for r in rs:
            per_seed[r["seed"]][r["domain"]] = r["acc"]
        avgs = [np.mean(list(v.values())) for v in per_seed.values() if set(v) == set(domains)]
        if avgs:
            table["Avg"] = (*mean_se(avgs), len(avgs))
        out[sel] = table
    return out


def markdown_table(rows: list[dict], title: str | None = None, metric: str = "Held-out accuracy",
                   key: str = "acc") -> str:
    tables = per_domain_table(rows, key)
    domains = sorted({r["domain"] for r in rows})
    cols = domains + ["Avg"]
    lines = []
    if title:
        lines.append(f"**{title}**\n")
    lines.append("| Selection | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for sel, t in tables.items():
        cells = [fmt(*t[c][:2]) if c in t else "—" for c in cols]
        lines.append(f"| {sel} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append("")
    lines.append(f"{metric} (%), mean ± standard error over {len(seeds)} seed(s) {seeds}; "
                 "Avg = mean over domains per seed, then over seeds.")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_bars(ax, series: dict[str, dict], cols: list[str], ylabel: str, title: str, title_size=None) -> None:
    """Grouped bars on ``ax``: one group per column, one bar (mean ± se, in %) per series
    ``{label: {column: (mean, se, n)}}``; a series without a column leaves its bar out."""
    width = 0.8 / max(1, len(series))
    for i, (label, t) in enumerate(series.items()):
        xs = [j + i * width for j, c in enumerate(cols) if c in t]
        ax.bar(xs, [100 * t[c][0] for c in cols if c in t], width,
               yerr=[100 * (t[c][1] or 0) for c in cols if c in t], capsize=3, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(cols))], cols)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=title_size)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def bar_chart(rows: list[dict], path: Path, title: str = "") -> Path:
    """Per-domain bars (mean ± se) for each selection, as a PNG."""
    cols = sorted({r["domain"] for r in rows}) + ["Avg"]
    fig, ax = _pyplot().subplots(figsize=(1.6 * len(cols) + 2, 3.6))
    _draw_bars(ax, per_domain_table(rows), cols, "held-out accuracy (%)", title)
    return _save(fig, path)


# -- `dg-lightning report RUNS_DIR...`: many runs -> methods x domains tables ---------------------------

REPORT_HELP = """Collect results.json files into DomainBed-style tables (methods x held-out domains, mean ±
standard error over seeds, one table per benchmark and model selection), as markdown and LaTeX, and a
per-domain bar chart PNG. Works from local results only (no W&B). Runs of a `dg-lightning sweep` are
tabulated under DomainBed's three sweep criteria instead (training-domain validation set,
leave-one-domain-out cross-validation, test-domain validation set (oracle)): hyperparameters chosen
per held-out domain and trial seed, then averaged over trial seeds.

    dg-lightning report runs/lodo/erm-pacs runs/lodo/gcisg-pacs [--out reports/pacs]
        [--selection "training-domain validation"] [--label method|dir] [--metric official/acc_avg]
"""


def find_results(paths: list[str | Path]) -> list[Path]:
    """Every per-run ``results.json`` under ``paths`` (a LODO summary, which lists runs, is skipped:
    its runs have their own files)."""
    import json

    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataNotFoundError(f"{p} does not exist: give run directories (or results.json files)")
        for f in ([p] if p.is_file() else sorted(p.rglob("results.json"))):
            if "selections" in json.loads(f.read_text()):
                found.append(f)
    if not found:
        raise DataNotFoundError(f"no results.json with selections under {[str(p) for p in paths]}: "
                                "a run writes one after `dg-lightning fit` (or `lodo`) finishes")
    return found


def report_rows(files: list[Path], label: str = "method", metric: str | None = None,
                roots: list[str | Path] | None = None) -> tuple[list[dict], list[str]]:
    """One row per (run, selection, held-out domain): ``method`` (the label), ``data``, ``selection``,
    ``domain``, ``seed``, ``acc`` (the test metric, or ``official/<name>`` of ``official``), ``file``.
    Returns the rows and warnings (a run repeated with the same label, benchmark, domain and seed keeps
    the newest file, and says so)."""
    import json

    rows, seen, warnings = [], {}, []
    for f in sorted(files, key=lambda f: f.stat().st_mtime):
        r = json.loads(f.read_text())
        name = r["method"]
        if label == "dir" and roots:
            name = next((Path(root).name for root in roots if Path(root) in f.parents or Path(root) == f), name)
        key = (name, r["data"], tuple(r["test_domains"]), r.get("seed"))
        if key in seen:
            warnings.append(f"{f} repeats {seen[key]} ({name}, {r['data']}, held out {r['test_domains']}, "
                            f"seed {r.get('seed')}): the newer file is used")
            rows = [row for row in rows if row["file"] != str(seen[key])]
        seen[key] = f
        for sel, s in r["selections"].items():
            for d in r["test_domains"]:
                if metric and metric.startswith("official/"):
                    value = (s.get("official") or {}).get(d, {}).get(metric.split("/", 1)[1])
                else:
                    value = s["test"].get(d)
                metric_name = metric.split("/", 1)[1] if metric else \
                    {"acc": "accuracy", "miou": "mIoU"}.get(r.get("selection_metric", "val/acc").rsplit("/", 1)[-1],
                                                          "accuracy")
                rows.append({"method": name, "data": r["data"], "selection": sel, "domain": d,
                             "seed": r.get("seed"), "acc": value, "file": str(f), "metric": metric_name})
    return rows, warnings


def method_tables(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """{(benchmark, selection): {method: {domain or "Avg": (mean, se, n_seeds)}}}."""
    out: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for data in sorted({r["data"] for r in rows}):
        for method in sorted({r["method"] for r in rows if r["data"] == data}):
            sub = [r for r in rows if r["data"] == data and r["method"] == method]
            for sel, table in per_domain_table(sub).items():
                out[(data, sel)][method] = table
    for table in out.values():  # an average over fewer domains than the others' is no average: left blank
        domains = {d for t in table.values() for d in t if d != "Avg"}
        for t in table.values():
            if set(t) - {"Avg"} != domains:
                t.pop("Avg", None)
    return dict(out)


def _columns(table: dict[str, dict]) -> list[str]:
    return sorted({d for t in table.values() for d in t if d != "Avg"}) + ["Avg"]


def report_markdown(tables: dict, metric_names: dict[str, str] | None = None,
                    notes: dict[tuple[str, str], str] | None = None) -> str:
    """Markdown tables; ``notes[(benchmark, selection)]`` replaces a table's footnote (sweep selections)."""
    parts = []
    for (data, sel), table in tables.items():
        metric_name = (metric_names or {}).get(data, "accuracy")
        cols = _columns(table)
        seeds = max((t[c][2] for t in table.values() for c in t), default=0)
        parts.append(f"**{data}**, held-out {metric_name} (%), model selection: {sel}\n")
        parts.append("| Method | " + " | ".join(cols) + " |")
        parts.append("|---|" + "---:|" * len(cols))
        for method, t in table.items():
            parts.append(f"| {method} | " + " | ".join(fmt(*t[c][:2]) if c in t else "—" for c in cols) + " |")
        parts.append("\n" + ((notes or {}).get((data, sel)) or
                              f"mean ± standard error over seeds (up to {seeds}); Avg = mean over domains per seed, "
                              "then over seeds (seeds missing a domain are left out of it).") + "\n")
    return "\n".join(parts)


def report_latex(tables: dict, metric_names: dict[str, str] | None = None) -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")

    parts = []
    for (data, sel), table in tables.items():
        metric_name = (metric_names or {}).get(data, "accuracy")
        cols = _columns(table)
        parts += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
                  "Method & " + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
        for method, t in table.items():
            cells = [(f"{100 * t[c][0]:.1f}" + (f" $\\pm$ {100 * t[c][1]:.1f}" if t[c][1] is not None else ""))
                     if c in t else "--" for c in cols]
            parts.append(esc(method) + " & " + " & ".join(cells) + r" \\")
        parts += [r"\bottomrule", r"\end{tabular}",
                  rf"\caption{{{esc(data)}: held-out {metric_name} (\%), mean $\pm$ standard error over seeds; "
                  rf"model selection: {esc(sel)}.}}", r"\end{table}", ""]
    return "\n".join(parts)


def report_chart(tables: dict, path: Path, metric_names: dict[str, str] | None = None) -> Path:
    """One panel per (benchmark, selection): bars per domain, one colour per method, ± standard error."""
    widest = max(len(_columns(t)) for t in tables.values())
    fig, axes = _pyplot().subplots(len(tables), 1, figsize=(1.4 * widest + 2.5, 3.4 * len(tables)), squeeze=False)
    for ax, ((data, sel), table) in zip(axes[:, 0], tables.items()):
        _draw_bars(ax, table, _columns(table), f"held-out {(metric_names or {}).get(data, 'accuracy')} (%)",
                   f"{data} — {sel}", title_size=10)
    return _save(fig, path)


def report_main(argv: list[str]) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="dg-lightning report", description=REPORT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (searched recursively) or results.json files")
    p.add_argument("--out", default="reports", help="where report.md, report.tex, report.png, report.json go")
    p.add_argument("--selection", action="append", default=None,
                   help="model selection(s) to tabulate (default: every one found)")
    p.add_argument("--label", choices=["method", "dir"], default="method",
                   help="table rows: the method's class name, or the name of the RUNS directory given")
    p.add_argument("--metric", default=None, help="default: the test metric (accuracy / mIoU); "
                   "official/<name>: a benchmark's official metric (WILDS), e.g. official/F1-macro_all")
    args = p.parse_args(argv)
    files = find_results(args.runs)  # DataNotFoundError: the CLI prints it and exits 2, as every subcommand
    # runs of a `dg-lightning sweep`: hyperparameters chosen per held-out domain by DomainBed's criteria
    from dg_lightning.eval import model_selection as ms

    sweep_files = [f for f in files if ms.is_sweep_run(f.parent)]
    files = [f for f in files if f not in sweep_files]
    rows, warnings = report_rows(files, args.label, args.metric, args.runs) if files else ([], [])
    notes = {}
    if sweep_files:
        runs, sweep_warnings = ms.find_sweep_runs(args.runs, args.label)
        warnings += sweep_warnings
        if args.metric:
            warnings.append(f"--metric {args.metric} does not apply to sweep runs: their selection uses accuracy")
        sweep = ms.sweep_rows(runs)
        for key in {(r["data"], r["selection"]) for r in sweep}:
            notes[key] = ms.sweep_note([r for r in sweep if (r["data"], r["selection"]) == key])
        rows += sweep
        files += sweep_files
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not rows:
        print(f"error: no finished run to tabulate under {args.runs} (see the warnings above)", file=sys.stderr)
        return 1
    if args.selection:
        known = sorted({r["selection"] for r in rows})
        unknown = [s for s in args.selection if s not in known]
        if unknown:
            p.error(f"unknown selection(s) {unknown}; found: {known}")
        rows = [r for r in rows if r["selection"] in args.selection]
    missing = [r for r in rows if r["acc"] is None]
    if missing:
        print(f"warning: {len(missing)} (run, domain) value(s) missing {args.metric or 'test metric'}, left out: "
              f"e.g. {missing[0]['file']}", file=sys.stderr)
    tables = method_tables(rows)
    names = {r["data"]: r["metric"] for r in rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report_markdown(tables, names, notes)
    (out / "report.md").write_text(md)
    (out / "report.tex").write_text(report_latex(tables, names))
    report_chart(tables, out / "report.png", names)
    (out / "report.json").write_text(json.dumps({
        "files": [str(f) for f in files], "warnings": warnings,
        "sweep_choices": [{k: r[k] for k in ("method", "data", "selection", "domain", "seed", "acc", "val", "step",
                                             "hparams_seed", "hparams", "file")} for r in rows if "hparams_seed" in r],
        "tables": {f"{d} | {s}": {m: {c: {"mean": v[0], "se": v[1], "n": v[2]} for c, v in t.items()}
                                  for m, t in table.items()} for (d, s), table in tables.items()},
    }, indent=2))
    print(md)
    print(f"{len(files)} runs -> {out / 'report.md'}, {out / 'report.tex'}, {out / 'report.png'}")
    return 0
