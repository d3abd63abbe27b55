"""How much RISE's class text embeddings differ under a teacher: the mean pairwise cosine similarity
of the 7 PACS class embeddings ``T_k`` (7 templates averaged, normalised), for the teacher of
``experiments/cpu/pacs_rise_lite0.yaml`` (a randomly initialised ViT-B-32 offline) built from each
seed as ``fit`` builds it (``seed_everything``, then the model).

    python -m dg_lightning.bench.rise_teacher [--config experiments/cpu/pacs_rise_lite0.yaml] [--seeds 0 1]
        [--out bench/rise_teacher.json]

A mean cosine near 1 means the text side cannot separate the classes (the README's RISE row).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

from dg_lightning.data.folder import PACS
from dg_lightning.eval.provenance import provenance
from dg_lightning.methods import RISE


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows of ``embeddings`` (rows already normalised)."""
    sim = embeddings @ embeddings.T
    k = len(embeddings)
    return float((sim.sum() - sim.diagonal().sum()) / (k * (k - 1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/cpu/pacs_rise_lite0.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench/rise_teacher.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    init = yaml.safe_load(Path(args.config).read_text())["model"]["init_args"]
    init = {k: v for k, v in init.items() if k not in ("optimizer", "scheduler")}
    rows = []
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        model = RISE(num_classes=len(PACS.CLASSES), **init)
        model.cache_text_embeddings(list(PACS.CLASSES), ["art_painting", "cartoon", "photo"])
        rows.append({"seed": seed, "mean_pairwise_cosine": round(mean_pairwise_cosine(model.class_text), 4)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("python -m dg_lightning.bench.rise_teacher " + shlex.join(argv)),
                               "config": args.config, "classes": list(PACS.CLASSES), "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
