"""The numerical identifiability benchmark of multi-space style disentanglement (no data needed).

    python -m dg_lightning.bench.identifiability [--steps 3000] [--out bench/identifiability.json]

The paper's synthetic setting (Eastwood et al. 2023; after von Kuegelgen et al. 2021):

* latents: content ``c ~ N(0, I)`` and ``M`` style blocks, content-dependent:
  ``s_m = A_m c + sigma * eps_m`` (``A_m`` Gaussian with entries of std ``style_dependence / sqrt(dim c)``);
* observations ``x = g(c, s_1..s_M)``: a frozen invertible MLP (square layers with well-conditioned
  weights: singular values in [0.5, 1.5], LeakyReLU(0.2) in between);
* views: query ``(c, s)``; content key: every style block resampled from ``p(s | c)``; key ``m``:
  ``s_m`` kept, every other style block resampled (the augmentation "resamples all blocks but one");
* an MLP encoder whose output is split into content + ``M`` style spaces, trained with the
  multi-space SimCLR loss of :mod:`dg_lightning.methods.multispace` (the official
  ``SimCLRMultiHead.loss``, the same function as on images: every view of every latent sample is an
  anchor, the other samples' views its negatives);
* evaluation on fresh samples: R² of predicting each latent block from each embedding space, with
  linear regression and kernel ridge (RBF), fitted on one half and scored on the other.

Expected: the content space predicts ``c`` far better than any style block; style space ``m``
predicts ``s_m`` better than the other style blocks. Prints both matrices, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dg_lightning.methods.multispace import multispace_simclr_loss, split_chunks


@dataclass
class Setting:
    content_dim: int = 3
    style_blocks: int = 2
    style_dim: int = 2
    style_dependence: float = 0.5
    style_noise: float = 1.0
    mixing_layers: int = 3
    space_dim: int = 8
    hidden: int = 256
    batch_size: int = 512
    steps: int = 3000
    lr: float = 1e-3
    temperature: float = 0.15
    eval_samples: int = 4000
    seed: int = 0


class LatentModel:
    """Samples latents and their views; ``A`` fixes the content dependence of the styles."""

    def __init__(self, s: Setting, g: torch.Generator):
        self.s = s
        self.A = torch.randn(s.style_blocks, s.style_dim, s.content_dim, generator=g) * s.style_dependence / np.sqrt(s.content_dim)

    def content(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.s.content_dim, generator=g)

    def styles(self, c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(n, M, style_dim) drawn from p(s | c)."""
        noise = torch.randn(len(c), self.s.style_blocks, self.s.style_dim, generator=g)
        return torch.einsum("mdc,nc->nmd", self.A, c) + self.s.style_noise * noise

    def views(self, n: int, g: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """([q, k_0, k_1..k_M] latent vectors), c, s of the query."""
        c = self.content(n, g)
        s = self.styles(c, g)
        out = [self.join(c, s), self.join(c, self.styles(c, g))]
        for m in range(self.s.style_blocks):
            fresh = self.styles(c, g)
            fresh[:, m] = s[:, m]
            out.append(self.join(c, fresh))
        return out, c, s

    @staticmethod
    def join(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([c, s.flatten(1)], dim=1)


def mixing_function(dim: int, layers: int, g: torch.Generator) -> nn.Module:
    """A frozen invertible MLP: square linear layers with singular values in [0.5, 1.5], LeakyReLU(0.2)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        sv = 0.5 + torch.rand(dim, generator=g)
        lin = nn.Linear(dim, dim)
        with torch.no_grad():
            lin.weight.copy_(u @ torch.diag(sv) @ v.T)
            lin.bias.zero_()
        mods.append(lin)
        if i < layers - 1:
            mods.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*mods).requires_grad_(False)


def r2_matrix(spaces: list[np.ndarray], blocks: list[np.ndarray], kernel: bool, seed: int) -> np.ndarray:
    """R²[i, j] of predicting latent block j from embedding space i (fit on the first half of the
    samples, scored on the second; inputs and targets standardised on the fitting half)."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    n = len(blocks[0])
    half = n // 2
    out = np.zeros((len(spaces), len(blocks)))
    for i, z in enumerate(spaces):
        zs = StandardScaler().fit(z[:half])
        ztr, zte = zs.transform(z[:half]), zs.transform(z[half:])
        for j, y in enumerate(blocks):
            ys = StandardScaler().fit(y[:half])
            ytr, yte = ys.transform(y[:half]), ys.transform(y[half:])
            model = KernelRidge(kernel="rbf", alpha=1e-2, gamma=1.0 / z.shape[1]) if kernel else LinearRegression()
            model.fit(ztr, ytr)
            out[i, j] = r2_score(yte, model.predict(zte), multioutput="uniform_average")
    return out


def run(s: Setting, log_every: int = 500) -> dict:
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    latents = LatentModel(s, g)
    dim = s.content_dim + s.style_blocks * s.style_dim
    mix = mixing_function(dim, s.mixing_layers, g)
    n_spaces = 1 + s.style_blocks
    encoder = nn.Sequential(
        nn.Linear(dim, s.hidden), nn.LeakyReLU(0.2), nn.Linear(s.hidden, s.hidden), nn.LeakyReLU(0.2),
        nn.Linear(s.hidden, s.hidden), nn.LeakyReLU(0.2), nn.Linear(s.hidden, n_spaces * s.space_dim),
    )
    sizes = [s.space_dim] * n_spaces
    lambdas = torch.ones(n_spaces)
    opt = torch.optim.Adam(encoder.parameters(), lr=s.lr)
    history = []
    t0 = time.time()
    for step in range(1, s.steps + 1):
        views, _, _ = latents.views(s.batch_size, g)
        loss, _ = multispace_simclr_loss([encoder(mix(v)) for v in views], sizes, lambdas, s.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == s.steps:
            history.append({"step": step, "loss": float(loss.detach())})
            print(f"  step {step}/{s.steps}  loss {float(loss.detach()):.4f}", flush=True)
    train_seconds = time.time() - t0
    with torch.no_grad():
        c = latents.content(s.eval_samples, g)
        st = latents.styles(c, g)
        spaces = [t.numpy() for t in split_chunks(encoder(mix(latents.join(c, st))), sizes, normalize=True)]
    blocks = [c.numpy()] + [st[:, m].numpy() for m in range(s.style_blocks)]
    rows = ["content"] + [f"style {m + 1}" for m in range(s.style_blocks)]
    cols = ["c"] + [f"s{m + 1}" for m in range(s.style_blocks)]
    return {
        "setting": asdict(s), "spaces": rows, "blocks": cols, "history": history,
        "train_seconds": round(train_seconds, 1),
        "r2_linear": r2_matrix(spaces, blocks, kernel=False, seed=s.seed).round(4).tolist(),
        "r2_kernel": r2_matrix(spaces, blocks, kernel=True, seed=s.seed).round(4).tolist(),
    }


def format_matrix(result: dict, key: str) -> str:
    cols = result["blocks"]
    lines = ["| space \\ latent | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in zip(result["spaces"], result[key], strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def provenance(argv: list[str]) -> dict:
    """The command, the commit (``-dirty`` with uncommitted changes to the package) and the machine of this run."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).parents[1])):
        commit += "-dirty"
    return {
        "command": " ".join(["python -m dg_lightning.bench.identifiability", *argv]), "commit": commit,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "system": platform.platform()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, v in asdict(Setting()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--out", default="bench/identifiability.json")
    args = vars(p.parse_args(argv))
    out = Path(args.pop("out"))
    torch.set_num_threads(1)
    result = {**provenance(sys.argv[1:] if argv is None else list(argv)), **run(Setting(**args))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nR² (linear regression), rows: embedding spaces, columns: latent blocks\n{format_matrix(result, 'r2_linear')}")
    print(f"\nR² (kernel ridge, RBF)\n{format_matrix(result, 'r2_kernel')}")
    print(f"\ntrained {result['setting']['steps']} steps in {result['train_seconds']} s; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
