"""Loggers: W&B (offline unless credentials exist; never prompts) beside a local CSV log."""

from __future__ import annotations

import netrc
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


@dataclass
class WandbOptions:
    """W&B settings of a run.

    Args:
        mode: ``auto`` = online when credentials exist (``WANDB_API_KEY`` or ``wandb login``), else
            offline; ``online``, ``offline``, or ``disabled`` (no W&B at all). ``WANDB_MODE`` wins.
        project: W&B project.
        group: W&B group (``dg-lightning lodo`` puts all runs of one experiment in one group).
        name: run name (default: the run directory's name).
        tags: run tags.
    """

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "dg-lightning"
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env in {"online", "offline", "disabled"}:
        return env
    if env == "dryrun":
        return "offline"
    if mode != "auto":
        return mode
    return "online" if has_wandb_credentials() else "offline"


def default_loggers(run_dir: Path, wandb: WandbOptions, stage: str = "fit") -> list[Logger]:
    """CSV log in ``run_dir/csv`` (``csv-<stage>`` for validate/test; an earlier attempt's log is kept as ``metrics.attemptN.csv``) and, unless disabled, a W&B run stored under ``run_dir/wandb``.

    The W&B run id is kept in ``run_dir/wandb_id`` so a resumed run continues the same W&B run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    version = "csv" if stage == "fit" else f"csv-{stage}"
    csv = run_dir / version / "metrics.csv"
    if csv.exists():  # a resumed run: keep the interrupted attempt's log beside the new one
        n = len(list(csv.parent.glob("metrics.attempt*.csv"))) + 1
        csv.rename(csv.with_name(f"metrics.attempt{n}.csv"))
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version=version)]
    mode = resolve_wandb_mode(wandb.mode)
    if mode != "disabled":
        id_file = run_dir / "wandb_id"
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            run_id = os.environ["WANDB_RUN_ID"]  # a sweep trial: the run the agent created
            id_file.write_text(run_id)
        elif id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
        logger = WandbLogger(
            project=wandb.project, group=wandb.group, name=wandb.name or run_dir.name, tags=wandb.tags,
            save_dir=str(run_dir), offline=mode == "offline", id=run_id, resume="allow", job_type="train",
        )
        # Lightning passes ``anonymous=None`` to wandb.init, and wandb >= 0.22 warns that the setting
        # "has no effect" whenever it is passed at all: leave it out
        logger._wandb_init.pop("anonymous", None)
        loggers.insert(0, logger)
    return loggers
