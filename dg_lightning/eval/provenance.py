"""Where a number comes from: the command, the commit and the machine, recorded in every results file
(``lodo``'s ``results.json``, the bench scripts' JSON) so that the README can quote it
(``make readme-numbers``, ``results/README.md``)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The short commit hash of the checkout (``-dirty`` when tracked files differ from it), or ``None``
    outside a git checkout."""
    cwd = Path(cwd or Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def machine() -> str:
    """e.g. ``2 CPU cores (x86_64), no GPU, torch 2.14.1`` or ``1 x NVIDIA H100 80GB HBM3, 16 CPU cores
    (x86_64), torch 2.11.0+cu130``."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{cores} CPU cores ({platform.machine()})"
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, {cpu}, torch {torch.__version__}"
    return f"{cpu}, no GPU, torch {torch.__version__}"


def provenance(command: str) -> dict:
    """``{"command", "commit", "machine", "date"}`` of a run made now."""
    return {"command": command, "commit": git_commit(), "machine": machine(),
            "date": datetime.date.today().isoformat()}
