"""Training-step time of methods relative to the first one (ERM), same batch, same backbone.

Self-supervised methods make their own views of the same images (``views_per_image``).

    python -m dg_lightning.bench.steptime --configs experiments/cpu/pacs_erm_lite0.yaml \\
        experiments/cpu/pacs_rise_lite0.yaml experiments/cpu/pacs_gcisg_lite0.yaml [--steps 10] [--data.root=DIR ...]

Builds each method and data module from its YAML (as ``fit`` would), takes one training batch,
and times ``training_losses`` + backward + optimiser step on it (data loading excluded).
Prints a table and writes JSON (default ``bench/steptime.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dg_lightning.bench.speed import seconds_per_step


def time_steps(configs: list[str], overrides: list[str], steps: int, warmup: int, device: str = "cpu",
               precision: str = "32") -> list[dict]:
    from dg_lightning.lightning_cli import DGCLI

    rows = []
    batch = None
    for cfg in configs:
        cli = DGCLI(args=["--config", cfg, *overrides, "--trainer.logger=false"], run=False)
        model, dm = cli.model, cli.datamodule
        dm.setup("fit")
        model.bind_data(dm)
        if model.train_views(dm.image_size) is not None:  # self-supervised methods: their own views
            own = next(iter(dm.train_dataloader()))
        else:
            own = batch = batch if batch is not None else next(iter(dm.train_dataloader()))
        model.to(device)
        model.bind_data(dm)  # caches built on the model's device (RISE's text embeddings)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        sec = seconds_per_step(model, own, opt, steps, warmup, precision)
        model.to("cpu")
        x = own[0]
        rows.append({"config": cfg, "method": type(model).__name__, "seconds_per_step": round(sec, 3),
                     "images_per_step": len(own[1]),
                     "views_per_image": len(x) if isinstance(x, list) else 1})
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
    args, overrides = p.parse_known_args(argv)  # anything else is a CLI override, e.g. --data.root=DIR
    rows = time_steps(args.configs, overrides, args.steps, args.warmup, args.device, args.precision)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
                                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                "precision": args.precision, "rows": rows}, indent=2))
    print("| method | config | s / step | x first |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['config']} | {r['seconds_per_step']} | {r['relative_to_first']} |")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
