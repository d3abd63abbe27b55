"""The project's LightningCLI: what ``fit``/``validate``/``test`` build, and what ``lodo`` and the
benchmarks parse a config with (so they accept exactly the keys ``fit`` accepts).

:class:`RunCLI` gives every run its directory (``config.yaml``, ``checkpoints/last.ckpt``, CSV and
W&B logs), seed 0 by default and per-step reseeding; :class:`DGCLI` adds the DG methods' links
(classes and task from the data module), model selection and ``results.json``. Both turn a parse
error into a :class:`~dg_lightning.core.errors.ConfigError` that names the closest valid key
(:func:`dg_lightning.cli_utils.explain_parse_error`). The command line itself is ``dg_lightning.cli``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from dg_lightning.core.callbacks import (
    BestCheckpoint,
    FailureRecord,
    LastCheckpoint,
    RunConfigSaver,
    SegmentationOverlays,
    StepSeed,
)
from dg_lightning.core.errors import ConfigError
from dg_lightning.core.logging import WandbOptions, default_loggers
from dg_lightning.core.method import DGMethod

CONFIG_NAME = "config.yaml"
HELP = (
    "dg-lightning: domain generalization experiments. Subcommands fit/validate/test take "
    "--config experiments/...yaml; also: `dg-lightning lodo --help` (every held-out domain x seed, "
    "then the table), `dg-lightning report --help` (many runs -> markdown/LaTeX tables and a chart), "
    "`dg-lightning slurm --help` (LODO or sweep as a SLURM job array), `dg-lightning sweep --help` "
    "(DomainBed's hyperparameter sweep, locally), `dg-lightning check-data --help` "
    "(every domain and class counted, every image decoded) and `dg-lightning download --help` "
    "(datasets, checksum-verified). Errors print their fix and exit 2; --debug shows the traceback."
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

    def parse_arguments(self, parser, args) -> None:
        """jsonargparse's parse error (usage, then the message, buried in Union noise for a class's
        argument) becomes a short :class:`ConfigError` naming the key and the closest valid one."""
        from jsonargparse import ArgumentError

        from dg_lightning.cli_utils import explain_parse_error

        parsers = [parser, *getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {}).values()]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise ConfigError(explain_parse_error(str(e), parser, self.subcommand_of(args))) from e

    @staticmethod
    def subcommand_of(args) -> str | None:
        args = sys.argv[1:] if args is None else args
        return next((a for a in args if a in ("fit", "validate", "test", "predict")), None) \
            if isinstance(args, (list, tuple)) else None

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
        if not any(isinstance(c, FailureRecord) for c in given):
            out.append(FailureRecord())
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
        from dg_lightning.data.check import require_clean

        self._fit_start = time.time()
        require_clean(self.datamodule)  # listing, empty classes, label sizes: by path, before training
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


def build_datamodule(args: list[str], check_class: Callable[[type], None] | None = None, with_config: bool = False):
    """The data module of a ``fit`` command line (``--config ...`` and overrides), parsed exactly as
    ``fit`` parses it but built alone: no model, so no weights are loaded. ``check_class`` may reject
    the data module's class before it is built (``lodo`` needs a multi-domain benchmark).
    Returns the data module, or ``(data module, parsed config)`` with ``with_config``."""
    import importlib

    from jsonargparse import ArgumentParser

    class DataOnly(DGCLI):
        def instantiate_classes(self) -> None:
            module, name = self.config["data"]["class_path"].rsplit(".", 1)
            if check_class is not None:
                check_class(getattr(importlib.import_module(module), name))
            parser = ArgumentParser()
            parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
            cfg = parser.parse_object({"data": self.config["data"].as_dict()})
            self.datamodule = parser.instantiate_classes(cfg).data

    argv, sys.argv = sys.argv, sys.argv[:1]  # parse ``args`` only (LightningCLI warns when sys.argv has more)
    try:
        cli = DataOnly(args=args, run=False)
    finally:
        sys.argv = argv
    return (cli.datamodule, cli.config) if with_config else cli.datamodule


CHECK_DATA_HELP = """Check a benchmark's data before training (dg_lightning.data.check): every domain and class
with its image count; empty classes of source domains, unreadable images, segmentation labels whose
size differs from their image's, each by path. Exit status 2 when something is wrong.

    dg-lightning check-data --config experiments/pacs/erm.yaml [--quick] [fit overrides: --data.root DIR ...]
"""


def check_data_main(argv: list[str]) -> int:
    """``dg-lightning check-data``: the data module of a fit command line, checked in full."""
    import argparse

    from dg_lightning.data.check import check, print_report

    p = argparse.ArgumentParser(prog="dg-lightning check-data", description=CHECK_DATA_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable)")
    p.add_argument("--quick", action="store_true", help="count and check sizes from headers; decode nothing")
    args, overrides = p.parse_known_args(argv)  # everything else: fit's overrides (--data.root DIR, ...)
    dm = build_datamodule([a for c in args.config for a in ("--config", c)] + overrides)
    return print_report(check(dm, full=not args.quick, progress=lambda m: print(m, flush=True)))
