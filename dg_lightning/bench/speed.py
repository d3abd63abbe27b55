"""`make bench-speed`: training throughput with the full data pipeline vs. the compute limit.

    python -m dg_lightning.bench.speed [--root PACS_DIR] [--backbone resnet18] [--image-size 64]
                                       [--workers 0 1 2] [--steps 30] [--out bench/speed.json]

* pipeline: ``Trainer.fit`` on the PACS data module (JPEG decode, augmentation, domain-balanced
  batches, Lightning's loop and logging), images/s over the timed steps;
* compute limit: the same method's forward/backward/step on one batch already in memory;
* ratio = pipeline / compute (1.0 = the data pipeline costs nothing).

Without PACS it writes the embedded dataset as JPEGs into a temporary folder so the pipeline
still decodes files. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from dg_lightning.data import PACS, ImageFolderDomains
from dg_lightning.methods import ERM


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.times.append(time.perf_counter())


def pipeline_throughput(dm, backbone: str, steps: int, warmup: int) -> float:
    model = ERM(num_classes=dm.num_classes, backbone=backbone, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup + 1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    t = timer.times[warmup:]
    per_batch = dm.batch_size * len(dm.train_domains)
    return per_batch * (len(t) - 1) / (t[-1] - t[0])


def seconds_per_step(model, batch, opt: torch.optim.Optimizer, steps: int, warmup: int,
                     precision: str = "32") -> float:
    """Mean time of ``training_losses`` + backward + optimiser step on one in-memory batch, on the
    model's device (``precision`` ``bf16``: bf16 autocast on CUDA, as ``bf16-mixed`` training)."""
    device = next(model.parameters()).device
    x, y, d, *_ = batch
    x = [v.to(device) for v in x] if isinstance(x, list) else x.to(device)
    y, d = y.to(device), d.to(device)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(steps + warmup):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with autocast:
            loss = model.training_losses(x, y, d)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def compute_throughput(dm, backbone: str, steps: int, warmup: int) -> float:
    model = ERM(num_classes=dm.num_classes, backbone=backbone)
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return len(batch[0]) / seconds_per_step(model, batch, opt, steps, warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("PACS_ROOT") or "../shared/data/pacs")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=24, help="per source domain")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench/speed.json")
    args = p.parse_args(argv)

    tmp = None
    if (Path(args.root) / "photo").is_dir():
        make = lambda w: PACS(root=args.root, test_domains=["sketch"], batch_size=args.batch_size,  # noqa: E731
                              image_size=args.image_size, num_workers=w, split_seed=0)
        data = f"PACS ({args.root})"
    else:
        from dg_lightning.data.synthetic import write_image_folder

        tmp = tempfile.TemporaryDirectory()
        write_image_folder(tmp.name, per_class=60, size=96, fmt="jpg")
        make = lambda w: ImageFolderDomains(root=tmp.name, test_domains=["sketch"],  # noqa: E731
                                            batch_size=args.batch_size, image_size=args.image_size,
                                            num_workers=w, split_seed=0)
        data = "embedded shapes written as 96 px JPEGs (PACS not found)"
    compute = compute_throughput(make(0), args.backbone, args.steps, args.warmup)
    rows = []
    for w in args.workers:
        pipe = pipeline_throughput(make(w), args.backbone, args.steps, args.warmup)
        rows.append({"num_workers": w, "pipeline_img_per_s": round(pipe, 1), "ratio": round(pipe / compute, 3)})
    result = {
        "data": data, "backbone": args.backbone, "image_size": args.image_size,
        "batch": f"{args.batch_size} x 3 source domains", "steps_timed": args.steps,
        "compute_img_per_s": round(compute, 1), "pipelines": rows,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.backbone} at {args.image_size} px on {data}, batch {result['batch']}")
    print(f"compute limit (in-memory batch): {compute:.1f} img/s")
    print("| num_workers | pipeline img/s | pipeline / compute |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_workers']} | {r['pipeline_img_per_s']} | {r['ratio']:.2f} |")
    print(f"written: {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
