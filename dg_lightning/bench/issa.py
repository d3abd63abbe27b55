"""ISSA on the CPU, tiny configuration: `make bench-issa`.

    python -m dg_lightning.bench.issa [--data DIR] [--seeds 0 1] [--out bench/issa] [--gan-steps N]
        [--encoder-steps N] [--gan-ckpt CKPT] [--encoder-ckpt CKPT] [--segmenter CKPT]
        [--encoder-every K] [--trajectory-only] [-- overrides for the segmentation runs]

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
   (``mixing_grid.png``) with its style/content per-pixel-std ratio;
5. with ``--encoder-every K``: stage 2 also keeps a checkpoint every K batches, and the mechanism is
   measured at each on ``--trajectory-images`` val scenes (``trajectory``: when, in stage 2, the
   encoder's w+ starts to carry the style). ``--trajectory-only`` measures the checkpoints already in
   ``<out>/runs/issa/encoder/checkpoints`` and writes ``<out>/issa_trajectory.json``, nothing else.

Every stage runs in ``<out>`` (the YAMLs' relative run directories line up there). Writes
``<out>/bench_issa.json`` and ``<out>/bench_issa.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def trajectory(ckpt_dir: Path, data: Path, segmenter: Path | None, out: Path, max_images: int) -> list[dict]:
    """The mechanism at every stage-2 checkpoint kept in ``ckpt_dir`` (``last*.ckpt`` aside), by batches."""
    kept = {}
    for ckpt in ckpt_dir.glob("*.ckpt"):
        if not ckpt.name.startswith("last"):
            # Lightning's default name holds the global step ("epoch=0-step=400.ckpt"): no load just for it
            found = re.search(r"step=(\d+)", ckpt.name)
            if found is None:
                raise ValueError(f"{ckpt}: no 'step=N' in the name; keep the stage-2 checkpoints under "
                                 "Lightning's default file names (keep_every does)")
            kept[int(found.group(1)) // 2] = ckpt  # two optimiser steps (encoder, discriminator) per batch
    if not kept:
        raise FileNotFoundError(f"no stage-2 checkpoints in {ckpt_dir}: run stage 2 with --encoder-every K")
    rows = []
    for batches in sorted(kept):
        where = out / f"trajectory-{batches}"
        where.mkdir(parents=True, exist_ok=True)
        m = mechanism(kept[batches], data, segmenter, where, max_images)
        rows.append({"batches": batches, "checkpoint": str(kept[batches]),
                     **{k: m[k] for k in ("images", "psnr_db", "lpips", "style_moved", "style_moved_recon",
                                          "layout_kept", "style_content_ratio") if k in m}})
        print(f"stage 2 after {batches} batches: {rows[-1]}", flush=True)
    return rows


def keep_every(batches: int | None, ckpt_dir: Path) -> list[str]:
    """Stage-2 overrides that keep a checkpoint every ``batches`` batches (and ``last.ckpt``)."""
    if not batches:
        return []
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={ckpt_dir}",
            f"--trainer.callbacks.every_n_train_steps={2 * batches}", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.save_last=true"]


def default_segmenter(erm_dir: Path | str) -> Path:
    """The layout measure's segmenter when ``--segmenter`` is not given: the first seed's ERM run's last.ckpt."""
    return Path(erm_dir) / "checkpoints" / "last.ckpt"


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
    p.add_argument("--encoder-every", type=int, default=None,
                   help="keep a stage-2 checkpoint every K batches and measure the mechanism at each")
    p.add_argument("--trajectory-images", type=int, default=100, help="val scenes per trajectory point")
    p.add_argument("--trajectory-only", action="store_true",
                   help="only measure the stage-2 checkpoints already kept in <out>")
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
    ckpt_dir = out / "runs/issa/encoder/checkpoints"
    if args.trajectory_only:
        segmenter = Path(args.segmenter) if args.segmenter else default_segmenter(
            Path(args.erm_runs) / f"seed{args.seeds[0]}")
        report["trajectory"] = trajectory(ckpt_dir, data, segmenter, out, args.trajectory_images)
        (out / "issa_trajectory.json").write_text(json.dumps(report, indent=2))
        return 0
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
             f"--trainer.max_steps={2 * args.encoder_steps}", quiet, *keep_every(args.encoder_every, ckpt_dir),
             *shlex.split(args.encoder_args)], out, env)
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
    segmenter = Path(args.segmenter) if args.segmenter else default_segmenter(report["erm_dirs"][args.seeds[0]])
    t0 = time.time()
    report["mechanism"] = mechanism(encoder_ckpt, data, segmenter, out, args.eval_images)
    report["wall_seconds"]["mechanism"] = round(time.time() - t0, 1)
    if args.encoder_every and not args.encoder_ckpt:
        report["trajectory"] = trajectory(ckpt_dir, data, segmenter, out, args.trajectory_images)
    mech = report["mechanism"]
    md = [f"Mechanism on {mech['images']} Cityscapes val scenes (generator 64 x 128): reconstruction PSNR "
          f"{mech['psnr_db']:.2f} dB, LPIPS {mech['lpips']:.3f} ({mech['lpips_net']}); layout kept "
          f"{mech['layout_kept']:.3f} (segmenter mIoU {100 * mech['miou_mix']:.1f} on G(w_B, noise_A) vs "
          f"{100 * mech['miou_real']:.1f} on A, {100 * mech['miou_recon']:.1f} on G(w_A, noise_A)); style moved "
          f"{mech['style_moved']:.3f} (between the reconstructions: {mech['style_moved_recon']:.3f}); grid "
          f"style/content per-pixel std {mech['style_effect']:.3f} / {mech['content_effect']:.3f} "
          f"(ratio {mech['style_content_ratio']:.3f}), {mech['grid']}.\n"]
    for row in report.get("trajectory", []):
        shown = [f"{name} {row[k]:.3f}" for k, name in (("psnr_db", "PSNR (dB)"), ("layout_kept", "layout kept"),
                 ("style_moved", "style moved"), ("style_content_ratio", "grid ratio")) if k in row]
        md.append(f"Stage 2 after {row['batches']} batches ({row['images']} scenes): {', '.join(shown)}.\n")
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
