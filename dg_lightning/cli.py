"""``dg-lightning``: LightningCLI for fit/validate/test, plus ``lodo`` and ``download``.

    dg-lightning fit --config experiments/pacs/erm.yaml --data.test_domains [sketch]
    dg-lightning fit --config ... --ckpt_path last          # resume a killed run
    dg-lightning lodo --config experiments/pacs/erm.yaml --seeds 0 1 2
    dg-lightning download pacs --root ~/data/pacs
    dg-lightning issa fit --config experiments/issa/cityscapes_tiny_gan.yaml   # ISSA stages 1 and 2

Every ``fit`` writes into its run directory (``trainer.default_root_dir``; by default
``runs/<method>-<data>-<held-out>-seed<seed>``): ``config.yaml`` (the resolved config),
``checkpoints/`` (best by training-domain validation, and last), ``csv/metrics.csv``, ``wandb/``,
and, after testing the held-out domains with each selection, ``results.json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dg_lightning.core.callbacks import (
    BestCheckpoint,
    LastCheckpoint,
    RunConfigSaver,
    SegmentationOverlays,
    StepSeed,
)
from dg_lightning.core.logging import WandbOptions, default_loggers
from dg_lightning.core.method import DGMethod

CONFIG_NAME = "config.yaml"
HELP = (
    "dg-lightning: domain generalization experiments. Subcommands fit/validate/test take "
    "--config experiments/...yaml; also: `dg-lightning lodo --help` (every held-out domain x seed, "
    "then the table), `dg-lightning report --help` (many runs -> markdown/LaTeX tables and a chart), "
    "`dg-lightning slurm --help` (LODO or sweep as a SLURM job array), `dg-lightning sweep --help` "
    "(DomainBed's hyperparameter sweep, locally) and `dg-lightning download --help` "
    "(datasets, checksum-verified)."
)


def default_run_dir(cfg) -> str:
    """``runs/<method>-<data>-<held-out>-seed<seed>``: the same command resumes the same run. A W&B sweep
    trial (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set by ``wandb agent``): ``runs/sweeps/<sweep>/<run>``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run:
        return str(Path("runs") / "sweeps" / sweep.replace("/", "_") / run)
    method = cfg.model.class_path.rsplit(".", 1)[-1].lower()
    data = cfg.data.class_path.rsplit(".", 1)[-1].lower()
    held = cfg.data.init_args.get("test_domains") or "none"
    held = "+".join([held] if isinstance(held, str) else held)
    return str(Path("runs") / f"{method}-{data}-{held}-seed{cfg.seed_everything}")


class RunCLI(LightningCLI):
    """What every run of the project shares: a run directory (``config.yaml``, ``checkpoints/last.ckpt``,
    CSV and W&B logs), seed 0 by default, per-step reseeding. Its model is any LightningModule
    (the ISSA GAN and encoder stages: ``dg-lightning issa fit ...``); :class:`DGCLI` adds the DG
    methods' links, model selection and ``results.json``."""

    model_base: type = L.LightningModule

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"config_filename": CONFIG_NAME, "overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": HELP})
        defaults = {"use_distributed_sampler": False, "max_epochs": 10}
        defaults.update(kwargs.pop("trainer_defaults", {}) or {})
        super().__init__(self.model_base, L.LightningDataModule, *args, trainer_defaults=defaults, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(WandbOptions, "wandb")

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if not cfg.trainer.default_root_dir:
            cfg.trainer.default_root_dir = default_run_dir(cfg)

    def run_callbacks(self, run_dir: Path, given: list) -> list:
        """Callbacks added to every run unless the config gives its own of the same kind."""
        out = []
        if not any(isinstance(c, ModelCheckpoint) for c in given):
            out.append(LastCheckpoint(run_dir / "checkpoints"))
        if not any(isinstance(c, StepSeed) for c in given):
            out.append(StepSeed())
        return out

    def _instantiate_trainer(self, config, callbacks):
        cfg = self._cfg()
        run_dir = Path(config.get("default_root_dir") or cfg.trainer.default_root_dir)
        given = list(config.get("callbacks") or []) + list(callbacks)
        callbacks.extend(self.run_callbacks(run_dir, given))
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(run_dir, cfg.wandb, self.subcommand or "fit")
        return super()._instantiate_trainer(config, callbacks)


class DGCLI(RunCLI):
    model_base = DGMethod

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # classification or segmentation: the benchmark decides, the method builds its head for it
        parser.link_arguments("data.task", "model.init_args.task", apply_on="instantiate")
        super().add_arguments_to_parser(parser)
        parser.add_argument("--evaluate_after_fit", type=bool, default=True,
                            help="after fit, test the held-out domains with each model selection and "
                                 "write results.json")

    def run_callbacks(self, run_dir: Path, given: list) -> list:
        out = []
        for c in given:  # extra selections given in the config (no dirpath): beside the others
            if isinstance(c, BestCheckpoint) and c.dirpath is None:
                c.dirpath = str(run_dir / "checkpoints")
        # the benchmark's own selection metric and evaluation (WILDS: official metrics per split)
        self.model.benchmark_selection_metric = getattr(self.datamodule, "selection_metric", None)
        if hasattr(self.datamodule, "callbacks"):
            out += [c for c in self.datamodule.callbacks() if not any(type(g) is type(c) for g in given)]
        checkpoints = [c for c in given if isinstance(c, ModelCheckpoint)]
        if not any(c.monitor == self.model.selection_metric for c in checkpoints):
            out.append(BestCheckpoint(run_dir / "checkpoints", monitor=self.model.selection_metric))
        if not any(isinstance(c, LastCheckpoint) for c in checkpoints):
            out.append(LastCheckpoint(run_dir / "checkpoints"))
        out += [c for c in super().run_callbacks(run_dir, given) if not isinstance(c, ModelCheckpoint)]
        if getattr(self.model, "segmentation", False) and not any(isinstance(c, SegmentationOverlays) for c in given):
            out.append(SegmentationOverlays())
        return out

    def before_fit(self) -> None:
        self._fit_start = time.time()
        if self.trainer.is_global_zero and hasattr(self.datamodule, "describe"):
            print(self.datamodule.describe(), flush=True)

    def after_fit(self) -> None:
        if not self._cfg().evaluate_after_fit or self.trainer.interrupted:
            return
        from dg_lightning.core.selection import evaluate_selections

        fit_seconds = round(time.time() - self._fit_start, 2)
        config_path = Path(self.trainer.default_root_dir) / CONFIG_NAME
        record = evaluate_selections(self.trainer, self.model, self.datamodule, config_path, fit_seconds)
        if self.trainer.is_global_zero:
            for name, r in record["selections"].items():
                accs = ", ".join(f"{d} {v:.4f}" for d, v in r["test"].items())
                print(f"[{name}] held-out {accs}", flush=True)
            print(f"results: {Path(self.trainer.default_root_dir) / 'results.json'}", flush=True)


def _set_quiet_env() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _set_quiet_env()
    if argv and argv[0] == "lodo":
        from dg_lightning.eval.lodo import main as lodo_main

        sys.exit(lodo_main(argv[1:]))
    if argv and argv[0] == "issa":  # the ISSA generator and encoder stages: any LightningModule, no DG selection
        RunCLI(args=argv[1:])
        return
    if argv and argv[0] == "report":
        from dg_lightning.eval.report import report_main

        sys.exit(report_main(argv[1:]))
    if argv and argv[0] == "slurm":
        from dg_lightning.cluster import slurm_main

        sys.exit(slurm_main(argv[1:]))
    if argv and argv[0] == "sweep":  # DomainBed's hyperparameter sweep, locally (eval/sweep.py)
        from dg_lightning.eval.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))
    if argv and argv[0] == "sweep-trial":
        from dg_lightning.cluster import sweep_trial_main

        sys.exit(sweep_trial_main(argv[1:]))
    if argv and argv[0] == "download":
        from dg_lightning.data.download import main as download_main

        sys.exit(download_main(argv[1:]))
    DGCLI(args=None if from_sys else argv)


if __name__ == "__main__":
    main()
