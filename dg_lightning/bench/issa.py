"""ISSA on the CPU, tiny configuration: `make bench-issa`.

    python -m dg_lightning.bench.issa [--data DIR] [--seeds 0 1] [--out bench/issa] [--gan-steps N]
        [--encoder-steps N] [--gan-ckpt CKPT] [--encoder-ckpt CKPT] [--segmenter CKPT]
        [-- overrides for the segmentation runs]

1. stage 1, ``experiments/issa/cityscapes_tiny_gan.yaml``: StyleGAN2 on the Cityscapes training scenes
   (64 x 128), ``--gan-steps`` batches (``--gan-ckpt``: reuse a stage-1 checkpoint instead);
2. stage 2, ``experiments/issa/cityscapes_tiny_encoder.yaml``: the masked noise encoder, ``--encoder-steps``
   batches (each 16 real + 16 generated images; ``--encoder-ckpt``: reuse a stage-2 checkpoint instead);
3. per seed, ``make bench-seg``'s ERM (its runs in ``--erm-runs`` when they exist, else run here), ERM + ISSA
   (``experiments/cpu/seg_cityscapes_erm_issa.yaml``: intra-source styles) and ERM + ISSA with CamVid
   *train* images as extra-source exemplars (``seg_cityscapes_erm_issa_camvid_styles.yaml``), same data,
   schedule and seeds; the ISSA runs also select by the stylised proxy validation set;
4. the mechanism on the 500 Cityscapes val scenes (``methods.issa.evaluation.evaluate_inverter``):
   reconstruction PSNR / LPIPS (random AlexNet trunk, seed 0: comparable only with itself), layout kept
   (mIoU of the seed-0 ERM segmenter, ``--segmenter``, on G(w_B, noise_A) against A's label, as a
   fraction of its mIoU on A), style moved (colour statistics), and the 4 x 4 mixing grid
   (``mixing_grid.png``) with its style/content per-pixel-std ratio.

Every stage runs in ``<out>`` (the YAMLs' relative run directories line up there). Writes
``<out>/bench_issa.json`` and ``<out>/bench_issa.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dg_lightning.bench.seg import find_data, table
from dg_lightning.cli_utils import split_overrides
from dg_lightning.eval.provenance import provenance

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=cwd, env=env)
    return round(time.time() - t0, 1)


RUNS = {
    "ERM+ISSA": "experiments/cpu/seg_cityscapes_erm_issa.yaml",
    "ERM+ISSA (CamVid-train styles)": "experiments/cpu/seg_cityscapes_erm_issa_camvid_styles.yaml",
}


@torch.no_grad()
def mechanism(encoder_ckpt: Path, data: Path, segmenter: Path | None, out: Path, max_images: int | None = None) -> dict:
    """The evaluation of ``methods.issa.evaluation`` on the Cityscapes val scenes (module docstring)."""
    from dg_lightning.methods.issa import load_inverter
    from dg_lightning.methods.issa.evaluation import (
        cityscapes_val,
        evaluate_inverter,
        segmenter_from_checkpoint,
    )
    from dg_lightning.methods.issa.inversion import make_lpips
    from dg_lightning.methods.issa.mixing import invert, synthesize

    G, E = load_inverter(str(encoder_ckpt))
    images, labels = cityscapes_val(data / "cityscapes-pix2pix", max_images=max_images)
    segment = segmenter_from_checkpoint(segmenter) if segmenter is not None else None
    result = evaluate_inverter(lambda x: invert(G, E, x), lambda w, n: synthesize(G, w, n), G.size, images, labels,
                               segment, lpips=make_lpips("random", "alex"), grid_path=out / "mixing_grid.png")
    result.update({"lpips_net": "alex, random trunk (seed 0)", "segmenter": str(segmenter)})
    return result


def place_checkpoint(given: str, where: Path) -> str:
    """A reused checkpoint copied to where the next stage's YAML looks for it (unless it is that file);
    returns the given file's absolute path, for the report."""
    if Path(given).resolve() != where.resolve():
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(given, where)
    return str(Path(given).resolve())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding cityscapes-pix2pix/ and camvid/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench/issa")
    p.add_argument("--gan-steps", type=int, default=1500, help="stage-1 batches (one D and one G step each)")
    p.add_argument("--gan-ckpt", default=None, help="a stage-1 checkpoint to reuse instead of training stage 1")
    p.add_argument("--encoder-steps", type=int, default=800, help="stage-2 batches")
    p.add_argument("--encoder-ckpt", default=None,
                   help="a stage-2 checkpoint to reuse instead of training stage 2 (its stage 1 is the one it was "
                        "trained against; --gan-ckpt is then only recorded)")
    p.add_argument("--erm-runs", default="bench/seg/erm", help="ERM runs of `make bench-seg` to reuse")
    p.add_argument("--segmenter", default=None,
                   help="segmenter checkpoint for the layout measure (default: the seed-0 ERM run's last.ckpt)")
    p.add_argument("--eval-images", type=int, default=None, help="Cityscapes val scenes to measure (default: all 500)")
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
    report: dict = {**provenance("python -m dg_lightning.bench.issa " + shlex.join(argv)),
                    "data": str(data), "seeds": args.seeds, "wall_seconds": {}, "runs": [],
                    "steps": {"gan": args.gan_steps, "encoder": args.encoder_steps}}
    gan_ckpt = out / "runs/issa/gan/checkpoints/last.ckpt"
    if args.gan_ckpt:
        report["gan_ckpt"] = place_checkpoint(args.gan_ckpt, gan_ckpt)
    elif not args.encoder_ckpt:
        report["wall_seconds"]["gan"] = run(
            [*cli, "issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_gan.yaml"),
             f"--trainer.max_steps={2 * args.gan_steps}", quiet, *shlex.split(args.gan_args)], out, env)
    encoder_ckpt = out / "runs/issa/encoder/checkpoints/last.ckpt"
    if args.encoder_ckpt:
        report["encoder_ckpt"] = place_checkpoint(args.encoder_ckpt, encoder_ckpt)
    else:
        report["wall_seconds"]["encoder"] = run(
            [*cli, "issa", "fit", "--config", str(ROOT / "experiments/issa/cityscapes_tiny_encoder.yaml"),
             f"--trainer.max_steps={2 * args.encoder_steps}", quiet, *shlex.split(args.encoder_args)], out, env)
    for seed in args.seeds:
        for method, config in RUNS.items():
            run_dir = out / "runs" / method.split(" ")[0].lower().replace("+", "_") / \
                ("camvid_styles" if "CamVid" in method else "intra") / f"seed{seed}"
            report["wall_seconds"][f"{method}/seed{seed}"] = run(
                [*cli, "fit", "--config", str(ROOT / config), f"--seed_everything={seed}",
                 f"--trainer.default_root_dir={run_dir}", quiet, *extra], out, env)
            report["runs"].append({**json.loads((run_dir / "results.json").read_text()), "method": method})
        erm_dir = Path(args.erm_runs) / f"seed{seed}"
        if not (erm_dir / "results.json").is_file():
            erm_dir = out / "runs" / "erm" / f"seed{seed}"
            report["wall_seconds"][f"ERM/seed{seed}"] = run(
                [*cli, "fit", "--config", str(ROOT / "experiments/cpu/seg_cityscapes_erm.yaml"),
                 f"--seed_everything={seed}", f"--trainer.default_root_dir={erm_dir}", quiet, *extra], out, env)
        report["runs"].append({**json.loads((erm_dir / "results.json").read_text()), "method": "ERM"})
        report.setdefault("erm_dirs", {})[seed] = str(erm_dir.resolve())
        (out / "bench_issa.json").write_text(json.dumps(report, indent=2))
    segmenter = Path(args.segmenter) if args.segmenter else \
        Path(report["erm_dirs"][args.seeds[0]]) / "checkpoints" / "last.ckpt"
    t0 = time.time()
    report["mechanism"] = mechanism(encoder_ckpt, data, segmenter, out, args.eval_images)
    report["wall_seconds"]["mechanism"] = round(time.time() - t0, 1)
    mech = report["mechanism"]
    md = [f"Mechanism on {mech['images']} Cityscapes val scenes (generator 64 x 128): reconstruction PSNR "
          f"{mech['psnr_db']:.2f} dB, LPIPS {mech['lpips']:.3f} ({mech['lpips_net']}); layout kept "
          f"{mech['layout_kept']:.3f} (segmenter mIoU {100 * mech['miou_mix']:.1f} on G(w_B, noise_A) vs "
          f"{100 * mech['miou_real']:.1f} on A, {100 * mech['miou_recon']:.1f} on G(w_A, noise_A)); style moved "
          f"{mech['style_moved']:.3f} (between the reconstructions: {mech['style_moved_recon']:.3f}); grid "
          f"style/content per-pixel std {mech['style_effect']:.3f} / {mech['content_effect']:.3f} "
          f"(ratio {mech['style_content_ratio']:.3f}), {mech['grid']}.\n"]
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
