"""Per-checkpoint records of every domain's accuracy, for model selection across a sweep.

DomainBed (``domainbed/scripts/train.py``) writes one line to ``results.jsonl`` at every checkpoint
with the accuracy of *every* environment's "in" and "out" split; its sweep-level selections
(``domainbed/model_selection.py``) read those lines: training-domain validation the sources' "out"
splits, the oracle a held-out environment's "out" split, leave-one-domain-out the "in" split of the
second held-out environment of a two-held-out run. :class:`DomainBedRecords` writes the same
information (what the selections use) to ``<run dir>/records.jsonl`` after every validation of a fit::

    {"step": 200, "epoch": 1, "val": {"<source>": acc, ...},
     "test_in": {"<held-out>": acc, ...}, "test_out": {"<held-out>": acc, ...}}

``val`` holds the source domains' validation ("out") accuracies the method base has just logged;
``test_in`` / ``test_out`` are the held-out domains' "in" and "out" splits, evaluated here. The
sources' "in" splits, which DomainBed also scores but no selection reads, are left out (they cost a
pass over 80 % of the training data at every checkpoint). ``dg-lightning sweep`` adds this callback to
every run; it works for any classification data module on the multi-domain base, under DDP too
(each rank scores a shard, the counts are summed).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from dg_lightning.core.data import ShardSampler
from dg_lightning.core.errors import ConfigError, DataError

RECORDS_NAME = "records.jsonl"


class DomainBedRecords(L.Callback):
    """Appends one record per validation of a fit to ``<default_root_dir>/records.jsonl`` (see module docstring)."""

    def __init__(self, filename: str = RECORDS_NAME):
        self.filename = filename

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "segmentation", False):
            raise ConfigError("DomainBedRecords scores classification accuracy; a segmentation run has no "
                              "held-out domains to select on (drop the callback)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        dm = trainer.datamodule
        metric = pl_module.metric_name
        record = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "val": {d: float(trainer.callback_metrics[f"val/{d}/{metric}"]) for d in dm.val_domains},
            "test_in": {},
            "test_out": {},
        }
        for d in dm.test_domains:
            record["test_in"][d] = accuracy(trainer, pl_module, dm.dataset(d, "in"), dm)
            record["test_out"][d] = accuracy(trainer, pl_module, dm.dataset(d, "out"), dm)
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def accuracy(trainer: L.Trainer, model: L.LightningModule, dataset, dm) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (this rank scores its shard; counts summed over ranks)."""
    rank, world = trainer.global_rank, trainer.world_size
    loader = DataLoader(dataset, batch_size=dm.eval_batch_size, sampler=ShardSampler(len(dataset), rank, world),
                        num_workers=dm.num_workers)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=model.device)
    with trainer.precision_plugin.forward_context():
        for x, y, *_ in loader:
            pred = model(x.to(model.device)).argmax(dim=1)
            counts[0] += (pred == y.to(model.device)).sum()
            counts[1] += len(y)
    model.train(was_training)
    counts = trainer.strategy.reduce(counts, reduce_op="sum")
    return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


def read_records(run_dir: str | Path, filename: str = RECORDS_NAME) -> list[dict]:
    """A run's records sorted by step; a step written twice (a run resumed after a crash) keeps its last line."""
    path = Path(run_dir) / filename
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no} is not a JSON record ({e}); delete the line or rerun the run") from e
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]
