"""Model selection after a fit, and the per-run ``results.json``.

Two selections are always reported, each named (DomainBed, Gulrajani & Lopez-Paz 2021):

* ``training-domain validation``: the checkpoint with the best mean source-domain validation
  accuracy (the "out" splits), the default and the only one that never looks at the target;
* ``oracle``: test-domain validation, DomainBed-style: the last checkpoint, reported separately
  (segmentation DG reports the last checkpoint: this row).

Further selections come from callbacks: a :class:`~dg_lightning.core.callbacks.BestCheckpoint` on
another monitor (ISSA's stylised proxy validation), or an
:class:`~dg_lightning.core.callbacks.ExtraSelection` that makes weights of its own (SWAD's average).

Each selection's checkpoint is tested on the held-out domains (``test``) and reports its accuracy on the
source domains' "out" splits (``in_domain``: DomainBed's in-domain accuracy, and the in-domain
linear-probe accuracy of the self-supervised methods): for the best checkpoint the values logged when
it was written (:class:`~dg_lightning.core.callbacks.BestCheckpoint`), for the last one a validation pass.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from dg_lightning.core.callbacks import BestCheckpoint, ExtraSelection, LastCheckpoint

SELECTIONS = ("training-domain validation", "oracle")


def _epoch_of(path: str) -> int | None:
    m = re.search(r"epoch(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def evaluate_selections(trainer: L.Trainer, model: L.LightningModule, datamodule, config_path: Path | None,
                        fit_seconds: float | None = None) -> dict:
    """Test the held-out domains with each selection's checkpoint; write ``results.json``."""
    ckpts = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    ckpt = next((c for c in ckpts if c.monitor == model.selection_metric), None)
    last = next((c for c in ckpts if isinstance(c, LastCheckpoint)), None)
    if ckpt is None or not ckpt.best_model_path:
        raise RuntimeError(f"no checkpoint monitoring {model.selection_metric} was saved during fit: "
                           "training-domain validation selection needs one (is validation running?)")
    run_dir = Path(trainer.default_root_dir)
    record = {
        "method": type(model).__name__,
        "data": type(datamodule).__name__,
        "train_domains": list(datamodule.train_domains),
        "test_domains": list(datamodule.test_domains),
        "test_split": getattr(datamodule, "test_split", "full"),
        "seed": _seed(),
        "run_dir": str(run_dir),
        "config": str(config_path) if config_path else None,
        "fit_seconds": fit_seconds,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "selection_metric": model.selection_metric,
        "selections": {},
    }
    last_path = last.best_model_path if last is not None else ckpt.last_model_path
    if not last_path:
        raise RuntimeError("no last checkpoint was saved during fit: the oracle selection needs one")
    paths = {"training-domain validation": ckpt.best_model_path, "oracle": last_path}
    # the best checkpoint is the last one when the final validation scored best: the same weights, tested once
    # (compared by global step where both callbacks recorded it: validation may run mid-epoch)
    last_epoch = trainer.current_epoch - 1
    best_step, last_step = getattr(ckpt, "best_step", None), getattr(last, "saved_step", None)
    same_weights = (best_step == last_step if best_step is not None and last_step is not None
                    else _epoch_of(paths["training-domain validation"]) == last_epoch)
    same = same_weights and bool(getattr(ckpt, "best_val_metrics", None))
    test = val = {}
    for name in SELECTIONS:
        t0 = time.time()
        if not (name == "oracle" and same):
            trainer.test(model, datamodule=datamodule, ckpt_path=paths[name], verbose=False)
            test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        test_seconds = round(time.time() - t0, 2)
        # in-domain: the same checkpoint on the source domains' held-out ("out") splits; the best
        # checkpoint's were logged when it was written, the last one is validated again
        if name == "training-domain validation":
            val = getattr(ckpt, "best_val_metrics", None)
        if not val or (name == "oracle" and not same):
            trainer.validate(model, datamodule=datamodule, ckpt_path=paths[name], verbose=False)
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        entry = _entry(model, datamodule, paths[name], test, val, test_seconds)
        entry.update({"epoch": _epoch_of(paths[name]) if name != "oracle" else last_epoch,
                      "same_checkpoint_as_best": name == "oracle" and same,
                      "val": float(ckpt.best_model_score) if name != "oracle" and ckpt.best_model_score is not None
                      else None})
        record["selections"][name] = entry
    # further selections (a BestCheckpoint on another monitor, e.g. ISSA's stylised proxy validation)
    for extra in ckpts:
        if not isinstance(extra, BestCheckpoint) or extra is ckpt or not extra.best_model_path:
            continue
        t0 = time.time()
        trainer.test(model, datamodule=datamodule, ckpt_path=extra.best_model_path, verbose=False)
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        entry = _entry(model, datamodule, extra.best_model_path, test, extra.best_val_metrics,
                       round(time.time() - t0, 2))
        entry.update({"epoch": _epoch_of(extra.best_model_path), "monitor": extra.monitor,
                      "val": float(extra.best_model_score) if extra.best_model_score is not None else None})
        record["selections"][extra.selection] = entry
    # weights made by a callback (SWAD): tested and validated like the last checkpoint
    for extra in trainer.callbacks:
        if not isinstance(extra, ExtraSelection) or not extra.checkpoint_path:
            continue
        t0 = time.time()
        trainer.test(model, datamodule=datamodule, ckpt_path=extra.checkpoint_path, verbose=False)
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        test_seconds = round(time.time() - t0, 2)
        trainer.validate(model, datamodule=datamodule, ckpt_path=extra.checkpoint_path, verbose=False)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        entry = _entry(model, datamodule, extra.checkpoint_path, test, val, test_seconds)
        entry.update(extra.info())
        record["selections"][extra.selection] = entry
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(_finite(record), indent=2))
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.WandbLogger):
                logger.experiment.summary.update({
                    f"{sel}/test/{d}": acc for sel, r in record["selections"].items() for d, acc in r["test"].items()
                })
    return record


def _entry(model, datamodule, checkpoint: str, test: dict, val: dict, test_seconds: float) -> dict:
    """One selection's results from the logged ``test/...`` and ``val/...`` metrics of its checkpoint."""
    metric, targets, sources = model.metric_name, datamodule.test_domains, datamodule.val_domains
    entry = {
        "checkpoint": checkpoint,
        "test": {d: test.get(f"test/{d}/{metric}") for d in targets},
        "test_mean": test.get(f"test/{metric}"),
        "in_domain": {d: val.get(f"val/{d}/{metric}") for d in sources},
        "in_domain_mean": val.get(f"val/{metric}"),
        "test_seconds": test_seconds,
    }
    # further metrics of the same model, logged as `<metric>_<part>` (e.g. the linear probe of
    # each part of a self-supervised representation)
    parts = sorted({k.rsplit("/", 1)[1][len(metric) + 1:] for k in test
                    if k.rsplit("/", 1)[1].startswith(metric + "_")})
    if parts:
        entry["parts"] = {
            part: {"test": {d: test.get(f"test/{d}/{metric}_{part}") for d in targets},
                   "in_domain": {d: val.get(f"val/{d}/{metric}_{part}") for d in sources}}
            for part in parts
        }
    # segmentation: the IoU of every class each target labels (None: neither labelled nor predicted)
    per_class = {d: {k.rsplit("/", 1)[1]: v for k, v in test.items() if k.startswith(f"test/{d}/iou/")}
                 for d in targets}
    if any(per_class.values()):
        entry["per_class_iou"] = per_class
    # a benchmark's official metrics (WILDS' dataset.eval), per split
    official = {d: {k.rsplit("/", 1)[1]: v for k, v in test.items() if k.startswith(f"test/{d}/official/")}
                for d in targets}
    if any(official.values()):
        entry["official"] = official
    return entry


def _finite(obj):
    """NaN (a metric with nothing to score) as ``null``: results.json stays valid JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _seed() -> int | None:
    import os

    s = os.environ.get("PL_GLOBAL_SEED")
    return int(s) if s is not None else None
