"""DomainBed's digit benchmarks: ColoredMNIST and RotatedMNIST, leave-one-domain-out, several methods.

    python -m dg_lightning.bench.mnist [--methods ERM CORAL GroupDRO] [--datasets cmnist rmnist] [--seeds 0 1]
        [--root DIR] [--scale cpu|paper] [--out bench/mnist] [-- CLI overrides for every run]

Each (benchmark, method) is one ``dg-lightning lodo`` over every held-out environment and seed, with
the benchmark's YAML (``--scale cpu``: ``experiments/cpu/{cmnist,rmnist}_erm.yaml``, a CPU schedule;
``paper``: ``experiments/mnist/{cmnist,rmnist}_erm.yaml``, DomainBed's 5,000 steps, for a GPU) and
the method swapped in by class name (``--model.class_path=dg_lightning.methods.<Name>``, at the
method's default hyperparameters). Writes ``<out>/bench_mnist.json`` (every run, wall times, the
command, commit and machine) and ``<out>/bench_mnist.md``: per benchmark, the held-out accuracy of
each method under training-domain validation and oracle, with DomainBed's published ERM row beside
them. The published numbers come from a 20-trial random hyperparameter search, 5,000 steps, 3 trial
seeds (DomainBed commit 7df6f06); these runs use default hyperparameters, so the comparison is of
the protocol and the implementation, not of a search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.cli_utils import split_overrides
from dg_lightning.eval.report import fmt, per_domain_table

BENCHMARKS = {
    "cmnist": {"name": "ColoredMNIST", "domains": ["+90%", "+80%", "-90%"],
               "cpu": "experiments/cpu/cmnist_erm.yaml", "paper": "experiments/mnist/cmnist_erm.yaml"},
    "rmnist": {"name": "RotatedMNIST", "domains": ["0", "15", "30", "45", "60", "75"],
               "cpu": "experiments/cpu/rmnist_erm.yaml", "paper": "experiments/mnist/rmnist_erm.yaml"},
}
#: DomainBed's published ERM (README / paper tables, commit 7df6f06): training-domain validation,
#: 20-trial random search, mean over 3 trial seeds; per environment in DomainBed's order, then Avg
PUBLISHED_ERM = {
    "cmnist": [71.7, 72.9, 10.0, 51.5],
    "rmnist": [95.9, 98.9, 98.8, 98.9, 98.9, 96.4, 98.0],
}
PUBLISHED_SOURCE = ("DomainBed (Gulrajani & Lopez-Paz 2021), commit 7df6f06, ERM, training-domain validation, "
                    "20-trial random search, 5,000 steps, 3 trial seeds")


def find_mnist_root(root: str | None) -> Path:
    candidates = [root, os.environ.get("MNIST_ROOT"),
                  os.path.join(os.environ["DG_DATA"], "mnist") if os.environ.get("DG_DATA") else None,
                  "../shared/data/mnist"]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return Path(c)
    from dg_lightning.data.mnist import ColoredMNIST

    sys.exit(f"MNIST not found (tried {[c for c in candidates if c]}).\n  expected layout: {ColoredMNIST.layout_hint}\n"
             f"  to get it: {ColoredMNIST.download_hint}")


def check_methods(methods: list[str]) -> None:
    import dg_lightning.methods as m

    missing = [name for name in methods if not hasattr(m, name)]
    if missing:
        sys.exit(f"unknown method(s) {missing}: no dg_lightning.methods.<Name> class (available: "
                 f"{sorted(n for n in dir(m) if n[:1].isupper())})")


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit or None, "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table_markdown(key: str, results: dict[str, list[dict]], scale: str) -> str:
    """One benchmark: published ERM, then each method under each selection (DomainBed's column order)."""
    bench = BENCHMARKS[key]
    cols = bench["domains"] + ["Avg"]
    lines = [f"**{bench['name']}**, held-out accuracy (%) on each environment's 80 % \"in\" split\n",
             "| Method | Selection | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols),
             "| ERM, published | training-domain val. (20-trial search) | "
             + " | ".join(f"{v:.1f}" for v in PUBLISHED_ERM[key]) + " |"]
    for method, rows in results.items():
        for sel, table in per_domain_table(rows).items():
            cells = [fmt(*table[c][:2]) if c in table else "—" for c in cols]
            lines.append(f"| {method}, here ({scale}) | {sel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ERM", "CORAL", "GroupDRO"],
                   help="method class names in dg_lightning.methods (default: ERM CORAL GroupDRO; IRM and VREx "
                        "anneal their penalty over DomainBed's first 500 steps, longer than the CPU schedules)")
    p.add_argument("--datasets", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--root", default=None, help="torchvision's MNIST folder (default: $MNIST_ROOT, $DG_DATA/mnist, "
                   "../shared/data/mnist)")
    p.add_argument("--scale", default="cpu", choices=["cpu", "paper"])
    p.add_argument("--out", default=None, help="default bench/mnist (cpu) or bench/mnist-paper")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_overrides(argv)
    args = p.parse_args(own)
    check_methods(args.methods)
    root = find_mnist_root(args.root)
    out = Path(args.out or ("bench/mnist" if args.scale == "cpu" else "bench/mnist-paper"))
    info = machine()
    report = {"command": " ".join([sys.executable, "-m", "dg_lightning.bench.mnist", *argv]), "commit": info["commit"],
              "machine": info,
              "scale": args.scale, "mnist_root": str(root), "seeds": args.seeds, "published_erm": PUBLISHED_ERM,
              "published_source": PUBLISHED_SOURCE, "tables": {}}
    md = []
    for key in args.datasets:
        bench, results = BENCHMARKS[key], {}
        report["tables"][key] = {}
        for method in args.methods:
            cfg, run_out = bench[args.scale], out / key / method.lower()
            swap = [] if method == "ERM" else [f"--model.class_path=dg_lightning.methods.{method}"]
            cmd = [sys.executable, "-m", "dg_lightning.cli", "lodo", "--config", cfg, "--seeds", *map(str, args.seeds),
                   "--out", str(run_out), "--name", f"bench-mnist-{key}-{method.lower()}",
                   "--", f"--data.root={root}", *swap, *extra]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            summary = json.loads((run_out / "results.json").read_text())
            results[method] = summary["runs"]
            report["tables"][key][method] = {"config": cfg, "command": " ".join(cmd),
                                             "wall_seconds": round(time.time() - t0, 1), "runs": summary["runs"]}
            (out / "bench_mnist.json").write_text(json.dumps(report, indent=2))
        walls = ", ".join(f"{m} {report['tables'][key][m]['wall_seconds'] / 60:.1f} min" for m in results)
        md.append(table_markdown(key, results, args.scale) +
                  f"\n\nHere: default hyperparameters, seeds {args.seeds}, mean ± standard error over seeds "
                  f"({bench[args.scale]}); wall time {walls}. Published: {PUBLISHED_SOURCE}.\n")
        (out / "bench_mnist.md").write_text("\n".join(md))
    print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
