"""Training-step time of methods relative to the first one (ERM), same images, same backbone.

    python -m dg_lightning.bench.steptime --configs experiments/cpu/pacs_erm_lite0.yaml \\
        experiments/cpu/pacs_rise_lite0.yaml experiments/cpu/pacs_gcisg_lite0.yaml [--steps 10] \\
        [--loader-batches 4] [--device cuda --precision bf16] [--data.root=DIR ...]

Builds each method and data module from its YAML (as ``fit`` would, ``bind_data`` included), takes
one training batch from the data module's loader and times ``training_losses`` + backward +
optimiser step on it, on the device. Data loading is excluded from the step for every method
alike: each batch is made before the timing by the loader training uses. Methods that make their
own per-sample views in the loader (GCISG's two RandAugment views, the self-supervised methods'
views) get a batch of their own views, as in training, so GCISG's step receives ``[x1, x2]`` ready
and its RandAugment is not in the step time; the other methods share the first config's batch
(the samplers draw the same images for every config with the same seed). GCISG's EMA teacher
update (official default: inside the training step) is in the step time.

Data loading is measured on its own, per config: ``loader_seconds_per_batch`` is the mean time
the config's training loader (its ``num_workers``) takes per batch over ``--loader-batches``
batches after a first one, so that step + loading can be compared as well (with 0 workers the
loading runs on the training process; with workers it overlaps the step). Prints a table and
writes JSON (default ``bench/steptime.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dg_lightning.bench.speed import seconds_per_step
from dg_lightning.eval.provenance import provenance


def first_batch(dm):
    """The first training batch, finished as on the device (batched augmentation applied)."""
    return dm.finish_batch(next(iter(dm.train_dataloader())))


def loader_seconds_per_batch(dm, batches: int) -> float:
    """Mean seconds the data module's training loader takes per batch, after a first one (workers
    started, caches warm)."""
    it = iter(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            break
        n += 1
    return (time.perf_counter() - t0) / max(n, 1)


def time_steps(configs: list[str], overrides: list[str], steps: int, warmup: int, device: str = "cpu",
               precision: str = "32", loader_batches: int = 4) -> list[dict]:
    from dg_lightning.lightning_cli import DGCLI

    rows = []
    batch = None
    for cfg in configs:
        cli = DGCLI(args=["--config", cfg, *overrides, "--trainer.logger=false"], run=False)
        model, dm = cli.model, cli.datamodule
        dm.setup("fit")
        model.bind_data(dm)  # methods with their own views hand them to the data module, as in fit
        batch_views = getattr(dm, "batch_transform", None) is not getattr(dm, "batch_preset", None)
        if model.train_views(dm.image_size) is not None or batch_views:  # its own views: loader or batch (GCISG)
            own = first_batch(dm)
        else:
            own = batch = batch if batch is not None else first_batch(dm)
        loader_sec = loader_seconds_per_batch(dm, loader_batches) if loader_batches > 0 else None
        model.to(device)
        model.bind_data(dm)  # caches built on the model's device (RISE's text embeddings)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        sec = seconds_per_step(model, own, opt, steps, warmup, precision)
        model.to("cpu")
        x = own[0]
        rows.append({"config": cfg, "method": type(model).__name__, "seconds_per_step": round(sec, 3),
                     "images_per_step": len(own[1]),
                     "views_per_image": len(x) if isinstance(x, list) else 1,
                     "loader_seconds_per_batch": None if loader_sec is None else round(loader_sec, 5),
                     "num_workers": getattr(dm, "num_workers", 0)})
    for r in rows:
        r["relative_to_first"] = round(r["seconds_per_step"] / rows[0]["seconds_per_step"], 2)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench/steptime.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32", choices=["32", "bf16"], help="bf16: autocast, as bf16-mixed")
    p.add_argument("--loader-batches", type=int, default=4,
                   help="batches over which each config's training loader is timed (0: not timed)")
    args, overrides = p.parse_known_args(argv)  # anything else is a CLI override, e.g. --data.root=DIR
    rows = time_steps(args.configs, overrides, args.steps, args.warmup, args.device, args.precision,
                      args.loader_batches)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m dg_lightning.bench.steptime " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps({**provenance(command),
                                "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
                                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                "precision": args.precision, "rows": rows}, indent=2))
    print("| method | config | s / step | x first | views | loader s / batch (workers) |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['config']} | {r['seconds_per_step']} | {r['relative_to_first']} | "
              f"{r['views_per_image']} | {r['loader_seconds_per_batch']} ({r['num_workers']}) |")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
