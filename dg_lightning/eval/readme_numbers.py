"""The README's measured tables, rendered from ``results/``: ``make readme-numbers``.

    python -m dg_lightning.eval.readme_numbers [--check] [--readme README.md] [--results results]

Every measured table in the README sits between ``<!-- results:NAME -->`` and ``<!-- /results -->``;
``NAME`` is a renderer registered here (:data:`TABLES`) that reads its results file(s) and returns
the markdown. ``make readme-numbers`` rewrites those blocks; ``--check`` only says whether they are
up to date (exit status 1 if not).

:func:`unsourced_numbers` is the other half (``tests/test_readme_numbers.py``): every number with a
decimal point in the README's *Measured results* section, and in any ``<!-- measured -->`` ...
``<!-- /measured -->`` region elsewhere, must be held by a results file: a value of a results JSON
(also as a percentage, in minutes or in hours, at the precision shown), a number of a results
markdown file, a number of a rendered block, or a number of an experiment config (a setting, not a
measurement). A number computed from others is declared where it is used, and checked:
``<!-- derived: 29.5 = 62.8 - 33.3 -->`` (each operand must be held, the arithmetic must give it);
a number that is not measured at all (chance level) likewise: ``<!-- constant: 14.3 = 100 / 7 -->``.

A table whose run has not been made yet sits between ``<!-- pending -->`` and ``<!-- /pending -->``:
its cells say ``pending`` or ``TODO``, and the results files it names (:func:`named_results_files`)
need not exist yet. A pending region is checked like a measured one (wherever it is), so a number
typed into a pending table fails the check until its results file lands and the table becomes a
rendered block (results/README.md: "When a pending table's results land").

Adding a table: write one renderer (a few lines; the helpers below cover LODO tables, method x
selection rows and plain rows), register it with ``@table("name")``, put the two markers in the
README, run ``make readme-numbers``. results/README.md says the same.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from dg_lightning.eval.report import fmt, mean_se, per_domain_table

ROOT = Path(__file__).resolve().parents[2]
TABLES: dict[str, Callable[[Path], str]] = {}
BLOCK = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def table(name: str):
    """Register a renderer: ``fn(results_dir) -> markdown``."""
    def register(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        TABLES[name] = fn
        return fn
    return register


def load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


# -- helpers ----------------------------------------------------------------------------------------
def md_table(header: list[str], rows: Iterable[list], align: str | None = None) -> str:
    """A markdown table; ``align``: one letter per column, ``l`` or ``r`` (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lodo_table(runs: list[dict], key: str = "acc") -> str:
    """Selection x held-out domains + Avg (mean ± standard error over seeds), as ``lodo`` prints it."""
    tables = per_domain_table(runs, key)
    cols = sorted({r["domain"] for r in runs}) + ["Avg"]
    return md_table(["Selection", *cols], ([sel, *(fmt(*t[c][:2]) if c in t else "—" for c in cols)]
                                           for sel, t in tables.items()))


SHORT = {"training-domain validation": "training-domain val."}


def method_rows(tables: dict[str, list[dict]], first: str = "Method", domains: list[str] | None = None,
                head: Iterable[list] = ()) -> str:
    """One row per (method, selection): ``tables`` maps a row label to its LODO runs; columns in
    ``domains``' order (default: sorted), after the ready-made ``head`` rows."""
    rows, cols = [list(r) for r in head], None if domains is None else [*domains, "Avg"]
    for label, runs in tables.items():
        t = per_domain_table(runs)
        cols = cols or sorted({r["domain"] for r in runs}) + ["Avg"]
        rows += [[label, SHORT.get(sel, sel), *(fmt(*v[c][:2]) if c in v else "—" for c in cols)]
                 for sel, v in t.items()]
    return md_table([first, "Selection", *cols], rows, "ll" + "r" * len(cols))


def fmt_signed(v: float, digits: int = 2) -> str:
    """``-0.24`` as ``−0.24`` (a minus sign); a value that rounds to zero without a sign."""
    s = f"{v:.{digits}f}"
    if float(s) == 0:
        return f"{0:.{digits}f}"
    return s.replace("-", "−")


def seed_mean(runs: list[dict], value: Callable[[dict], float]) -> str:
    return fmt(*mean_se([value(r) for r in runs]))


# -- the README's tables ----------------------------------------------------------------------------
def provenance_line(d: dict, name: str) -> str:
    """``Wall time ... min; machine; commit; file``: where a table's numbers come from."""
    wall = f"Wall time {d['wall_seconds'] / 60:.1f} min" if d.get("wall_seconds") else "Measured"
    return f"{wall} on {d['machine']}, commit `{d['commit']}` (`results/{name}`)."


@table("demo")
def demo(results: Path) -> str:
    d = load(results, "cpu/demo_results.json")
    return lodo_table(d["runs"]) + "\n\n" + provenance_line(d, "cpu/demo_results.json")


@table("bench-pacs-resnet18")
def bench_pacs_resnet18(results: Path) -> str:
    return lodo_table(load(results, "cpu/bench_pacs.json")["tables"]["resnet18-scratch-64px"]["runs"])


@table("bench-pacs-lite0")
def bench_pacs_lite0(results: Path) -> str:
    return lodo_table(load(results, "cpu/bench_pacs.json")["tables"]["lite0-imagenet-96px"]["runs"])


@table("bench-pacs-methods")
def bench_pacs_methods(results: Path) -> str:
    t = load(results, "cpu/bench_pacs_methods.json")["tables"]
    return method_rows({"ERM": t["erm-lite0-96px"]["runs"], "RISE (random CLIP teacher)": t["rise-lite0-96px"]["runs"],
                        "GCISG": t["gcisg-lite0-96px"]["runs"]})


@table("bench-speed-previous")
def bench_speed_previous(results: Path) -> str:
    """The first version of ``make bench-speed`` (full pipeline against the compute limit, no rounds)."""
    d = load(results, "cpu/bench_speed_previous.json")
    return md_table(["num_workers", "pipeline img/s", "pipeline / compute"],
                    ([p["num_workers"], f"{p['pipeline_img_per_s']:.1f}", f"{p['ratio']:.2f}"] for p in d["pipelines"]),
                    "rrr") + f"\n\nCompute limit: {d['compute_img_per_s']:.1f} img/s."


@table("bench-steptime")
def bench_steptime(results: Path) -> str:
    d = load(results, "cpu/bench_steptime.json")
    return md_table(["method", "s / step", "× ERM"],
                    ([r["method"], f"{r['seconds_per_step']:.3f}", f"{r['relative_to_first']:.2f}"] for r in d["rows"]))


#: the segmentation benches' targets (results key -> column), bench-seg's and bench-issa's tables
SEG_TARGETS = {"cityscapes": "Cityscapes val", "camvid": "CamVid", "camvid_dusk": "CamVid dusk"}


@table("bench-seg")
def bench_seg(results: Path) -> str:
    """mIoU per target, last checkpoint (the ``oracle`` row: segmentation DG's convention)."""
    runs = load(results, "cpu/bench_seg.json")["runs"]
    targets = SEG_TARGETS
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        rows.append([method, *(seed_mean(mine, lambda r, t=t: r["selections"]["oracle"]["test"][t]) for t in targets)])
    return md_table(["Method", *targets.values()], rows)


def _probe(runs: list[dict], part: str | None) -> list[str]:
    """Held-out accuracy per domain, their average and the average in-domain accuracy (each averaged
    over the domains within a seed, then mean ± standard error over seeds) of one probed part
    (``None``: the method's primary part) under training-domain validation."""
    runs = [r for r in runs if r["selection"] == "training-domain validation"]
    domains = sorted({r["domain"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})

    def test(r):
        return r["acc"] if part is None else r["parts"][part]["test"][r["domain"]]

    def in_domain(r):
        return r["in_domain"] if part is None else float(np.mean(list(r["parts"][part]["in_domain"].values())))

    def over_seeds(value):
        return fmt(*mean_se([np.mean([value(r) for r in runs if r["seed"] == s]) for s in seeds]))

    held = [seed_mean([r for r in runs if r["domain"] == d], test) for d in domains]
    return [*held, over_seeds(test), over_seeds(in_domain)]


@table("bench-pacs-ssl")
def bench_pacs_ssl(results: Path) -> str:
    t = load(results, "h100/bench_pacs_ssl.json")["tables"]
    simclr, ddm, ms = (t[k]["runs"] for k in ("simclr-resnet18-64px", "simclr-ddm-resnet18-64px",
                                              "multispace-resnet18-64px"))
    rows = [["SimCLR, h", *_probe(simclr, None)], ["SimCLR + DDM, h_inv", *_probe(ddm, None)],
            ["SimCLR + DDM, h_var", *_probe(ddm, "var")], ["SimCLR + DDM, h (full)", *_probe(ddm, "full")],
            ["Multi-space, content space", *_probe(ms, None)], ["Multi-space, backbone h", *_probe(ms, "full")]]
    domains = sorted({r["domain"] for r in simclr})
    return md_table(["probe on", *domains, "Avg held-out", "Avg in-domain"], rows)


@table("identifiability")
def identifiability(results: Path) -> str:
    """R² matrices of the official multi-space loss (``identifiability.json``) beside the earlier loss's
    (``identifiability_old_loss.json``): kernel ridge, then linear regression; the diagonal in bold."""
    new, old = load(results, "cpu/identifiability.json"), load(results, "cpu/identifiability_old_loss.json")
    if new["spaces"] != old["spaces"] or new["blocks"] != old["blocks"]:
        raise ValueError("identifiability.json and identifiability_old_loss.json have different spaces or blocks")
    blocks = new["blocks"]
    tables = []
    for key, title in (("r2_kernel", "kernel ridge (RBF)"), ("r2_linear", "linear regression")):
        rows = []
        for i, space in enumerate(new["spaces"]):
            cells = [f"**{fmt_signed(v)}**" if i == j else fmt_signed(v)
                     for d in (new, old) for j, v in enumerate(d[key][i])]
            rows.append([space, *cells])
        header = [title, f"new: {blocks[0]}", *blocks[1:], f"old: {blocks[0]}", *blocks[1:]]
        tables.append(md_table(header, rows))
    return "\n\n".join(tables)


#: a ``make bench-speed`` row's optional columns (key, header, format), shown when a row of the run has the key:
#: DomainBed's loop as it runs (contiguous fp32, when the suite's rows ran in other settings); the ceiling of
#: that ratio (compute limit over the loop, recorded from bbeca05 on); the ``Trainer.fit`` rows' share of wall
#: time between steps (from d8ac73f on)
_SPEED_OPTIONAL = [("ratio_to_domainbed_as_is", "batched / DomainBed as is", "{:.2f}"),
                   ("compute_over_domainbed_as_is", "ceiling: compute / DomainBed as is", "{:.2f}"),
                   ("median_between_steps_share", "share of wall between steps", "{:.3f}")]


def _speed(results: Path, name: str) -> str:
    """A ``make bench-speed`` JSON: per method and backbone, each pipeline's median images/s, its median ratio
    to the same round's compute limit and, for ``batched``, to DomainBed's loop at the same workers, then the
    optional columns (``_SPEED_OPTIONAL``) the run records."""
    d = load(results, name)
    every_row = [r for res in d["results"] for r in res["rows"]]
    columns = [("ratio_to_domainbed", "batched / DomainBed", "{:.2f}")] + \
        [c for c in _SPEED_OPTIONAL if any(c[0] in r for r in every_row)]
    rows = []
    for res in d["results"]:
        label = f"{res['method'].upper()}, {res['backbone']} {res['image_size']} px"
        for r in res["rows"]:
            rows.append([label, r["pipeline"], "" if r["num_workers"] is None else r["num_workers"],
                         f"{r['median_img_per_s']:.1f}", f"{r['ratio_to_compute']:.2f}",
                         *("—" if r.get(key) is None else f.format(r[key]) for key, _, f in columns)])
    head = ["method, backbone", "pipeline", "workers", "img/s (median)", "/ compute", *(h for _, h, _ in columns)]
    fmt = d.get("memory_format", "contiguous") + (", " + d["precision"] if d.get("precision") not in (None, "32") else "")
    wall = f", {d['wall_seconds'] / 60:.0f} min wall" if "wall_seconds" in d else ""
    return md_table(head, rows, "llrrr" + "r" * len(columns)) + f"\n\n{d['rounds']} rounds, {d['date']}{wall}, " \
        f"{d['data']}; suite rows {fmt}; commit `{d['commit']}` (`results/{name}`)."


#: ``make bench-speed`` runs in the README: table name -> results file
SPEED_RUNS = {"bench-speed": "cpu/bench_speed.json", "bench-speed-workers": "cpu/bench_speed_workers.json",
              "bench-speed-channels-last": "cpu/bench_speed_channels_last.json",
              "bench-speed-breakdown": "cpu/bench_speed_breakdown.json",
              "bench-speed-gcisg-channels-last": "cpu/bench_speed_gcisg_channels_last.json",
              "bench-speed-erm-gcisg": "cpu/bench_speed_erm_gcisg.json",
              "bench-speed-erm-gcisg-ceiling": "cpu/bench_speed_erm_gcisg_ceiling.json",
              "bench-speed-erm-between-steps": "cpu/bench_speed_erm_between_steps.json",
              "bench-speed-erm-file-side-227": "cpu/bench_speed_erm_file_side_227.json",
              "bench-speed-resnet18-file-side-227": "cpu/bench_speed_resnet18_file_side_227.json",
              "bench-speed-all": "cpu/bench_speed_all.json"}
for _name, _file in SPEED_RUNS.items():
    table(_name)(lambda results, file=_file: _speed(results, file))


@table("bench-pacs-baselines")
def bench_pacs_baselines(results: Path) -> str:
    t = load(results, "cpu/bench_pacs_baselines.json")["tables"]
    return method_rows({"ERM": t["erm-lite0-96px"]["runs"], "CORAL": t["coral-lite0-96px"]["runs"],
                        "ERM + SWAD run": t["erm-swad-lite0-96px"]["runs"]})


#: table 2's ERM trained channels-last (seeds 0 1), and each CPU lite0 YAML of ``make bench-pacs-methods``
#: and ``-baselines`` re-run with it (``lodo``'s summaries)
LITE0_CHANNELS_LAST = {"ERM": "cpu/bench_pacs_lite0_channels_last.json",
                       "RISE (random CLIP teacher)": "cpu/bench_pacs_rise_lite0_channels_last.json",
                       "GCISG": "cpu/bench_pacs_gcisg_lite0_channels_last.json",
                       "CORAL": "cpu/bench_pacs_coral_lite0_channels_last.json",
                       "ERM + SWAD run": "cpu/bench_pacs_erm_swad_lite0_channels_last.json"}


def _channels_last_rows(results: Path, methods: list[str], seeds: set[int]) -> str:
    """``methods``' channels-last LODO runs on ``seeds``, each labelled by its commit."""
    rows = {}
    for method in methods:
        d = load(results, LITE0_CHANNELS_LAST[method])
        rows[f"{method}, `{d['commit']}`"] = [r for r in d["runs"] if r["seed"] in seeds]
    return method_rows(rows)


@table("bench-pacs-methods-channels-last")
def bench_pacs_methods_channels_last(results: Path) -> str:
    """``make bench-pacs-methods``'s YAMLs, channels-last, seeds 0 1."""
    return _channels_last_rows(results, ["ERM", "RISE (random CLIP teacher)", "GCISG"], {0, 1})


@table("bench-pacs-baselines-channels-last")
def bench_pacs_baselines_channels_last(results: Path) -> str:
    """``make bench-pacs-baselines``'s YAMLs, channels-last, seed 0 (ERM: its seed-0 runs of table 2's re-run)."""
    return _channels_last_rows(results, ["ERM", "CORAL", "ERM + SWAD run"], {0})


def _mnist(results: Path, key: str) -> str:
    """One ``make bench-mnist`` benchmark: DomainBed's published ERM row, then each method x selection."""
    d = load(results, "cpu/bench_mnist.json")
    tables = d["tables"][key]
    first = next(iter(tables.values()))["runs"]
    domains = list(dict.fromkeys(r["domain"] for r in first))  # lodo's order = DomainBed's = the published row's
    published = ["ERM, published (DomainBed, 5,000 steps)", "training-domain val.",
                 *(f"{v:.1f}" for v in d["published_erm"][key])]
    return method_rows({f"{method}, here": m["runs"] for method, m in tables.items()}, domains=domains,
                       head=[published])


@table("bench-mnist-cmnist")
def bench_mnist_cmnist(results: Path) -> str:
    return _mnist(results, "cmnist")


@table("bench-mnist-rmnist")
def bench_mnist_rmnist(results: Path) -> str:
    return _mnist(results, "rmnist")


ISSA_MECHANISM = [("psnr_db", "PSNR (dB)", "{:.2f}"), ("lpips", "LPIPS", "{:.3f}"), ("miou_real", "mIoU on A", "pct"),
                  ("miou_recon", "mIoU on G(w_A, n_A)", "pct"), ("miou_mix", "mIoU on G(w_B, n_A)", "pct"),
                  ("layout_kept", "layout kept", "{:.3f}"), ("style_moved", "style moved", "signed"),
                  ("style_moved_recon", "style moved (recon)", "signed"),
                  ("style_content_ratio", "grid style/content std", "{:.3f}")]


@table("issa-mechanism")
def issa_mechanism(results: Path) -> str:
    """The old (single-channel noise) and new stage 2, same stage 1 and CPU budget, scored alike: the old
    checkpoint by the new ``evaluation.py`` (``issa_mechanism_old.json``), the new one by ``make bench-issa``
    (its ``mechanism``, the same function)."""
    rows = []
    for label, d in (("old code", load(results, "cpu/issa_mechanism_old.json")),
                     ("new code", load(results, "cpu/bench_issa.json")["mechanism"])):
        rows.append([label, *(f"{100 * d[k]:.1f}" if f == "pct" else fmt_signed(d[k], 3) if f == "signed" else f.format(d[k])
                              for k, _, f in ISSA_MECHANISM)])
    return md_table(["", *(h for _, h, _ in ISSA_MECHANISM)], rows)


def _issa_runs(*runs_of: tuple[str, dict]) -> str:
    """``make bench-issa`` JSONs' runs: mIoU per target, mean ± standard error over seeds, per method and
    selection; each JSON's ISSA methods get its label (``"label": d``; ``""``: none), ERM (the same
    ``make bench-seg`` runs in each) is taken from the first."""
    rows = []
    for sel in ("training-domain validation", "stylised proxy validation"):  # 2 epochs: oracle = the last
        for i, (label, d) in enumerate(runs_of):
            for method in dict.fromkeys(r["method"] for r in d["runs"]):
                runs = [r for r in d["runs"] if r["method"] == method and sel in r["selections"]]
                if not runs or (method == "ERM" and i > 0):
                    continue
                cells = [seed_mean(runs, lambda r, t=t, s=sel: r["selections"][s]["test"][t]) for t in SEG_TARGETS]
                name = f"{method}, {label}" if label and method != "ERM" else method
                rows.append([name, SHORT.get(sel, sel), *cells])
    return md_table(["Method", "Selection", *SEG_TARGETS.values()], rows, "llrrr")


@table("bench-issa")
def bench_issa(results: Path) -> str:
    """``make bench-issa`` with the budgeted stages (seed 0)."""
    return _issa_runs(("", load(results, "cpu/bench_issa.json")))


#: ``make bench-issa`` at its defaults: today's, then ``f0ae047``'s (signed noise maps, noise L1 weight 0.1)
ISSA_DEFAULTS_RUNS = ("cpu/bench_issa_defaults.json", "cpu/bench_issa_defaults_f0ae047.json")


@table("bench-issa-defaults")
def bench_issa_defaults(results: Path) -> str:
    """``make bench-issa`` with its default stages and seeds, each run labelled by its commit."""
    runs = [load(results, name) for name in ISSA_DEFAULTS_RUNS]
    return _issa_runs(*((f"defaults of `{d['commit']}`", d) for d in runs))


#: the mechanism's columns: (key, header, format; "signed": with a minus sign)
ISSA_COLUMNS = [("psnr_db", "PSNR (dB)", "{:.2f}"), ("layout_kept", "layout kept", "{:.3f}"),
                ("style_moved", "style moved", "signed"), ("style_moved_recon", "style moved (recon)", "signed"),
                ("style_content_ratio", "grid style/content std", "{:.3f}")]


def _mechanism_cells(m: dict) -> list[str]:
    return [fmt_signed(m[k], 3) if f == "signed" else f.format(m[k]) if k in m else "—" for k, _, f in ISSA_COLUMNS]


@table("issa-trajectory")
def issa_trajectory(results: Path) -> str:
    """The mechanism along the default stage 2 (every kept checkpoint, on the first val scenes), then the
    final encoder on all 500: today's defaults, then ``f0ae047``'s."""
    rows = []
    for name in ISSA_DEFAULTS_RUNS:
        d = load(results, name)
        points = [(f"{t['batches']}", t) for t in d["trajectory"]]
        points.append((f"{d['steps']['encoder']}, all scenes", d["mechanism"]))
        rows += [[f"`{d['commit']}`", label, m["images"], *_mechanism_cells(m)] for label, m in points]
    return md_table(["defaults of", "stage-2 batches", "scenes", *(h for _, h, _ in ISSA_COLUMNS)], rows,
                    "ll" + "r" * (1 + len(ISSA_COLUMNS)))


@table("issa-probes")
def issa_probes(results: Path) -> str:
    """Stage-2 variants from the same stage 1 and seed, each scored at 200 and 400 batches (and any later kept point) on the first
    100 val scenes: the defaults (the first two points of the default trajectory), lambda_w held, and
    the single changes of ``cpu/issa_stage2_probes.json``."""
    variants = [("defaults", [t for t in load(results, "cpu/bench_issa_defaults_f0ae047.json")["trajectory"]
                              if t["batches"] <= 400]),
                ("λ_w held at 0.1", load(results, "cpu/issa_trajectory_latent_held.json")["trajectory"])]
    variants += [(v["label"], v["trajectory"]) for v in load(results, "cpu/issa_stage2_probes.json")["probes"]]
    rows = [[label, t["batches"], *_mechanism_cells(t)] for label, points in variants for t in points]
    return md_table(["stage 2 (change from the tiny YAML at `f0ae047`)", "batches", *(h for _, h, _ in ISSA_COLUMNS)], rows)


@table("bench-pacs-lite0-paths")
def bench_pacs_lite0_paths(results: Path) -> str:
    """Table 2's YAML and seeds on both data paths at one commit (the cache that never enlarges a file),
    then the batched path with the model channels-last, then the earlier batched + cached runs (the copy
    enlarged to 110 px)."""
    d = load(results, "cpu/bench_pacs_lite0_paths.json")
    cl = load(results, LITE0_CHANNELS_LAST["ERM"])
    old = load(results, "cpu/bench_pacs_lite0_batched.json")
    sel = "training-domain validation"
    return method_rows({f"per-sample PIL path, `{d['commit']}`": [r for r in d["paths"]["per-sample"] if r["selection"] == sel],
                        f"batched + cached, `{d['commit']}`": [r for r in d["paths"]["batched"] if r["selection"] == sel],
                        f"batched + cached, channels-last, `{cl['commit']}`": [r for r in cl["runs"]
                                                                               if r["selection"] == sel],
                        f"batched + cached (110 px copy), `{old['commit']}`": [r for r in old["runs"]
                                                                                if r["selection"] == sel]},
                       "Data path")


# -- rendering --------------------------------------------------------------------------------------
def render(readme: str, results: Path) -> str:
    """``readme`` with every ``<!-- results:NAME -->`` block re-rendered; an unknown NAME is an error."""
    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"README block results:{name} has no renderer; known: {sorted(TABLES)}")
        return f"{m.group(1)}{TABLES[name](results).rstrip()}\n{m.group(4)}"

    return BLOCK.sub(block, readme)


# -- every number held by a results file ------------------------------------------------------------
PENDING = re.compile(r"<!-- pending -->(.*?)<!-- /pending -->", re.S)
NUMBER = re.compile(r"(?<![\w.])[−-]?\d[\d,]*\.\d+(?![\w.]*\.\d)")  # a decimal; not x.y.z versions
DECLARED = re.compile(r"<!-- (derived|constant): ([^=]+?) = ([^>]+?) -->")


def _values(obj, key: str = "") -> Iterable[tuple[str, float]]:
    """(key, value) of every number in a JSON document (the key of the innermost mapping)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield key, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _values(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v, key)


def _forms(key: str, v: float) -> list[float]:
    """The ways a value may be quoted: as it is; a fraction in [0, 1] as a percentage; a duration
    (a key naming seconds or a wall time) in minutes and hours."""
    forms = [v]
    if 0 <= v <= 1:
        forms.append(100 * v)
    if "second" in key or "wall" in key:
        forms += [v / 60, v / 3600]
    return forms


def _numbers(text: str) -> list[str]:
    return [n.replace("−", "-").replace(",", "").lstrip("-") for n in NUMBER.findall(text)]


def held_numbers(results: Path, extra_texts: Iterable[str] = ()) -> set[str]:
    """Every way a number held by the results (and the configs) may be written: JSON values at 1-4
    decimals (:func:`_forms`: as they are, fractions as percentages, durations in minutes and hours);
    numbers of the results' markdown files, of ``extra_texts`` (rendered blocks) and of the experiment
    configs."""
    held: set[str] = set()
    for path in sorted(results.rglob("*.json")):
        for key, v in _values(json.loads(path.read_text())):
            for x in _forms(key, v):
                if math.isfinite(x):
                    held.update(f"{abs(x):.{d}f}" for d in range(1, 5))
    texts = [p.read_text() for p in sorted(results.rglob("*.md"))] + list(extra_texts)
    texts += [p.read_text() for p in sorted((results.parent / "experiments").rglob("*.yaml"))]
    for text in texts:
        held.update(_numbers(text))
    return held


def measured_regions(readme: str) -> str:
    """The text the number check covers: the Measured results section and ``<!-- measured -->`` regions,
    without code spans and fenced code (commands, paths) and without HTML comments."""
    parts = re.findall(r"^## Measured results\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    parts += re.findall(r"<!-- measured -->(.*?)<!-- /measured -->", readme, re.S)
    parts += [p for p in PENDING.findall(readme) if p not in "\n".join(parts)]  # pending ones elsewhere
    text = "\n".join(parts)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def named_results_files(readme: str) -> list[str]:
    """Every ``results/...`` file the README names in a code span (``{a,b}`` alternatives expanded),
    except in ``<!-- pending -->`` regions (files of runs not made yet)."""
    names: set[str] = set()
    for rel in re.findall(r"`(results/[\w./{},-]+)`", PENDING.sub("", readme)):
        names.update(_expand(rel))
    return sorted(names)


def _expand(rel: str) -> list[str]:
    """``results/cpu/bench_seg.{json,md}`` -> both names."""
    m = re.search(r"\{([^}]*)\}", rel)
    if not m:
        return [rel]
    return [n for alt in m.group(1).split(",") for n in _expand(rel[:m.start()] + alt + rel[m.end():])]


def _declared(readme: str, held: set[str]) -> tuple[set[str], list[str]]:
    """Numbers declared in ``<!-- derived|constant: X = EXPR -->`` comments, and what is wrong with
    any declaration (an operand not held, arithmetic that does not give X)."""
    ok, problems = set(), []
    for kind, number, expr in DECLARED.findall(readme):
        number = number.strip().replace("−", "-").lstrip("+-")
        if not re.fullmatch(r"[\d.+\-*/() ]+", expr):
            problems.append(f"{number}: cannot evaluate {expr!r}")
            continue
        if kind == "derived":
            missing = [n for n in re.findall(r"\d+(?:\.\d+)?", expr) if "." in n and n not in held]
            if missing:
                problems.append(f"{number} = {expr}: operand(s) {missing} held by no results file")
                continue
        digits = len(number.split(".")[1]) if "." in number else 0
        value = eval(expr, {"__builtins__": {}})  # digits and + - * / ( ) only (checked above)
        if f"{abs(value):.{digits}f}" != number:
            problems.append(f"{number} = {expr}: the expression gives {value:.{digits + 2}f}")
            continue
        ok.add(number)
    return ok, problems


def unsourced_numbers(readme: str, results: Path) -> list[str]:
    """Numbers of the README's measured regions that no results file holds (with their line), and
    declarations that do not check out. Empty: every number is sourced."""
    rendered = [TABLES[m.group(2)](results) for m in BLOCK.finditer(readme) if m.group(2) in TABLES]
    held = held_numbers(results, rendered)
    declared, problems = _declared(readme, held)
    out = [f"declaration {p}" for p in problems]
    for line in measured_regions(readme).splitlines():
        for n in _numbers(line):
            if n not in held and n not in declared:
                out.append(f"{n}: {line.strip()[:120]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dg_lightning.eval.readme_numbers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--check", action="store_true", help="only check: exit 1 if a block is out of date")
    args = p.parse_args(argv)
    path, results = Path(args.readme), Path(args.results)
    text = path.read_text()
    new = render(text, results)
    names = [m.group(2) for m in BLOCK.finditer(text)]
    if args.check:
        stale = [n for n, a, b in zip(names, BLOCK.finditer(text), BLOCK.finditer(new)) if a.group(3) != b.group(3)]
        print(f"out of date: {stale}; run `make readme-numbers`" if stale else f"up to date: {len(names)} tables")
        return 1 if stale else 0
    path.write_text(new)
    print(f"rendered {len(names)} tables into {path}: {', '.join(names)}")
    unsourced = unsourced_numbers(new, results)
    if unsourced:
        print("numbers held by no results file:\n  " + "\n  ".join(unsourced), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
