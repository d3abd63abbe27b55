"""``dg-lightning``: LightningCLI for fit/validate/test, plus ``lodo``, ``sweep``, ``check-data`` and ``download``.

    dg-lightning fit --config experiments/pacs/erm.yaml --data.test_domains [sketch]
    dg-lightning fit --config ... --ckpt_path last          # resume a killed run
    dg-lightning lodo --config experiments/pacs/erm.yaml --seeds 0 1 2
    dg-lightning sweep --help                               # DomainBed's hyperparameter sweep, locally
    dg-lightning check-data --config experiments/pacs/erm.yaml   # every domain/class counted, every image decoded
    dg-lightning download pacs --root ~/data/pacs
    dg-lightning issa fit --config experiments/issa/cityscapes_tiny_gan.yaml   # ISSA stages 1 and 2

Every ``fit`` writes into its run directory (``trainer.default_root_dir``; by default
``runs/<method>-<data>-<held-out>-seed<seed>``): ``config.yaml`` (the resolved config),
``checkpoints/`` (best by training-domain validation, and last), ``csv/metrics.csv``, ``wandb/``,
and, after testing the held-out domains with each selection, ``results.json``.

A config or data error prints its message (what is wrong, what was expected, the fix) and exits
with status 2; a run whose loss became NaN exits with 3. ``--debug`` (or ``DG_DEBUG=1``) shows the
traceback instead. The LightningCLI classes live in :mod:`dg_lightning.lightning_cli`, the helpers
in :mod:`dg_lightning.cli_utils`.
"""

from __future__ import annotations

import sys

from dg_lightning.cli_utils import guarded, quiet_third_party, take_debug_flag
from dg_lightning.lightning_cli import CONFIG_NAME, DGCLI, HELP, RunCLI, default_run_dir

__all__ = ["CONFIG_NAME", "DGCLI", "HELP", "RunCLI", "default_run_dir", "main"]


def _dispatch(argv: list[str], from_sys: bool) -> int | None:
    if argv and argv[0] == "lodo":
        from dg_lightning.eval.lodo import main as lodo_main

        return lodo_main(argv[1:])
    if argv and argv[0] == "issa":  # the ISSA generator and encoder stages: any LightningModule, no DG selection
        RunCLI(args=_cli_args(argv[1:], from_sys))
        return 0
    if argv and argv[0] == "check-data":
        from dg_lightning.lightning_cli import check_data_main

        return check_data_main(argv[1:])
    if argv and argv[0] == "report":
        from dg_lightning.eval.report import report_main

        return report_main(argv[1:])
    if argv and argv[0] == "slurm":
        from dg_lightning.cluster import slurm_main

        return slurm_main(argv[1:])
    if argv and argv[0] == "sweep":  # DomainBed's hyperparameter sweep, locally (eval/sweep.py)
        from dg_lightning.eval.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "sweep-trial":
        from dg_lightning.cluster import sweep_trial_main

        return sweep_trial_main(argv[1:])
    if argv and argv[0] == "download":
        from dg_lightning.data.download import main as download_main

        return download_main(argv[1:])
    DGCLI(args=_cli_args(argv, from_sys))
    return 0


def _cli_args(args: list[str], from_sys: bool) -> list[str] | None:
    """LightningCLI reads ``sys.argv`` itself when run from the shell (given both, it warns)."""
    if not from_sys:
        return args
    sys.argv[1:] = args
    return None


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    args = take_debug_flag(list(sys.argv[1:] if from_sys else argv))
    quiet_third_party()
    sys.exit(guarded(lambda: _dispatch(args, from_sys)))


if __name__ == "__main__":
    main()
