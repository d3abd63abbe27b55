"""ISSA on the CPU, tiny configuration: `make bench-issa`.

    python -m dg_lightning.bench.issa [--data DIR] [--seeds 0 1] [--out bench/issa] [--gan-steps N]
        [--encoder-steps N] [-- overrides for the segmentation runs]

1. stage 1, ``experiments/issa/cityscapes_tiny_gan.yaml``: StyleGAN2 on the Cityscapes training scenes
   (64 x 128), ``--gan-steps`` batches;
2. stage 2, ``experiments/issa/cityscapes_tiny_encoder.yaml``: the masked noise encoder, ``--encoder-steps``;
3. reconstruction quality of the encoder on the Cityscapes val scenes (PSNR; LPIPS with a random
   AlexNet trunk, since no ImageNet AlexNet exists offline: comparable only with itself) and a PNG
   grid of style-mixed samples (``mixing_grid.png``: content rows x style columns);
4. ``experiments/cpu/seg_cityscapes_erm_issa.yaml`` (ERM + ISSA, same data, schedule and seeds as
   ``make bench-seg``) per seed, next to ERM: ``bench/seg``'s ERM runs when they exist, else run here.

Every stage runs in ``<out>`` (the YAMLs' relative run directories line up there). Writes
``<out>/bench_issa.json`` and ``<out>/bench_issa.md``.
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

import numpy as np
import torch

from dg_lightning.bench.seg import find_data, table
from dg_lightning.cli_utils import split_overrides

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=cwd, env=env)
    return round(time.time() - t0, 1)


@torch.no_grad()
def quality_and_grid(encoder_ckpt: Path, val_images: list[Path], out: Path, n_grid: int = 4) -> dict:
    """PSNR / LPIPS of the encoder's reconstructions of ``val_images``, and the style-mixing grid."""
    from PIL import Image

    from dg_lightning.methods.issa import load_inverter, style_mix
    from dg_lightning.methods.issa.inversion import make_lpips, psnr
    from dg_lightning.methods.issa.mixing import invert

    G, E = load_inverter(str(encoder_ckpt))
    h, w = G.size
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)))
                     for p in val_images]).permute(0, 3, 1, 2).float() / 255
    recon = []
    for chunk in x.split(16):
        wp, noise = invert(G, E, chunk)
        recon.append((G.synthesis(wp, noise) + 1) / 2)
    recon = torch.cat(recon).clamp(0, 1)
    lp = make_lpips("random")
    result = {"images": len(x), "psnr_db": float(psnr(recon * 2 - 1, x * 2 - 1).mean()),
              "lpips_random_trunk": float(torch.cat([lp(a * 2 - 1, b * 2 - 1).flatten()
                                                     for a, b in zip(recon.split(16), x.split(16))]).mean())}
    # grid: top row = style images, left column = content images, cell = G(w_style, noise_content)
    content, style = x[:n_grid], x[n_grid:2 * n_grid]
    w_style, _ = invert(G, E, style)
    rows = [torch.cat([torch.ones(3, h, w), *style], dim=2)]
    mixes = []
    for c in content:
        cells = style_mix(G, E, c.expand(n_grid, -1, -1, -1), w_style)
        mixes.append(cells)
        rows.append(torch.cat([c, *cells], dim=2))
    # how much each factor changes a mixed image: per-pixel std across the style columns (same
    # content) and across the content rows (same style), averaged; ISSA wants both well above 0
    mixes = torch.stack(mixes)  # (content, style, 3, h, w)
    result["style_effect"] = float(mixes.std(dim=1).mean())
    result["content_effect"] = float(mixes.std(dim=0).mean())
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(out / "mixing_grid.png")
    result["grid"] = str(out / "mixing_grid.png")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding cityscapes-pix2pix/ and camvid/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench/issa")
    p.add_argument("--gan-steps", type=int, default=1500, help="stage-1 batches (one D and one G step each)")
    p.add_argument("--encoder-steps", type=int, default=800, help="stage-2 batches")
    p.add_argument("--erm-runs", default="bench/seg/erm", help="ERM runs of `make bench-seg` to reuse")
    p.add_argument("--gan-args", default="", help='extra overrides for stage 1, one string: "--a=1 --b=2"')
    p.add_argument("--encoder-args", default="", help="extra overrides for stage 2, one string")
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_overrides(argv)  # overrides after -- reach every run, e.g. --trainer.accelerator=gpu
    args = p.parse_args(own)
    data = find_data(args.data).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DG_DATA": str(data), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cli = [sys.executable, "-m", "dg_lightning.cli"]
    quiet = "--trainer.enable_progress_bar=false"
    report: dict = {"data": str(data), "seeds": args.seeds, "wall_seconds": {}, "runs": []}
    report["wall_seconds"]["gan"] = run(
        [*cli, "issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_gan.yaml"),
         f"--trainer.max_steps={2 * args.gan_steps}", quiet, *shlex.split(args.gan_args)], out, env)
    report["wall_seconds"]["encoder"] = run(
        [*cli, "issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_encoder.yaml"),
         f"--trainer.max_steps={2 * args.encoder_steps}", quiet, *shlex.split(args.encoder_args)], out, env)
    from dg_lightning.data.segmentation import Cityscapes

    val = Cityscapes(str(data / "cityscapes-pix2pix"), split="val", image_suffix="_leftImg8bit.jpg")
    report["reconstruction"] = quality_and_grid(out / "runs/issa/encoder/checkpoints/last.ckpt",
                                                [pair[0] for pair in val.pairs], out)
    for seed in args.seeds:
        run_dir = out / "runs" / "erm_issa" / f"seed{seed}"
        report["wall_seconds"][f"ERM+ISSA/seed{seed}"] = run(
            [*cli, "fit", "--config", str(ROOT / "experiments/cpu/seg_cityscapes_erm_issa.yaml"),
             f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}", quiet, *extra], out, env)
        report["runs"].append({**json.loads((run_dir / "results.json").read_text()), "method": "ERM+ISSA"})
        erm_dir = Path(args.erm_runs) / f"seed{seed}"
        if not (erm_dir / "results.json").is_file():
            erm_dir = out / "runs" / "erm" / f"seed{seed}"
            report["wall_seconds"][f"ERM/seed{seed}"] = run(
                [*cli, "fit", "--config", str(ROOT / "experiments/cpu/seg_cityscapes_erm.yaml"),
                 f"--seed_everything={seed}", f"--trainer.default_root_dir={erm_dir}", quiet, *extra], out, env)
        report["runs"].append({**json.loads((erm_dir / "results.json").read_text()), "method": "ERM"})
        (out / "bench_issa.json").write_text(json.dumps(report, indent=2))
    rec = report["reconstruction"]
    md = [f"Encoder reconstructions of {rec['images']} Cityscapes val scenes (64 x 128): PSNR {rec['psnr_db']:.2f} dB, "
          f"LPIPS {rec['lpips_random_trunk']:.3f} (random AlexNet trunk). Style-mixing grid: {rec['grid']}.\n"]
    for sel in ("oracle", "training-domain validation", "stylised proxy validation"):
        runs = [r for r in report["runs"] if sel in r["selections"]]
        md.append(f"**Selection: {sel}**\n\n{table(runs, sel)}\n")
    md.append("Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["wall_seconds"].items()))
    (out / "bench_issa.json").write_text(json.dumps(report, indent=2))
    (out / "bench_issa.md").write_text("\n".join(md))
    print("\n" + "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
