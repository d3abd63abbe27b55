"""Per-domain tables from run records: mean ± standard error over seeds, selection named."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np


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


def bar_chart(rows: list[dict], path: Path, title: str = "") -> Path:
    """Per-domain bars (mean ± se) for each selection, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = per_domain_table(rows)
    cols = sorted({r["domain"] for r in rows}) + ["Avg"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.6))
    width = 0.8 / max(1, len(tables))
    for i, (sel, t) in enumerate(tables.items()):
        xs = [j + i * width for j, c in enumerate(cols) if c in t]
        ms = [100 * t[c][0] for c in cols if c in t]
        es = [100 * (t[c][1] or 0) for c in cols if c in t]
        ax.bar(xs, ms, width, yerr=es, capsize=3, label=sel)
    ax.set_xticks([j + width * (len(tables) - 1) / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
