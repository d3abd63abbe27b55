"""SWAD: dense stochastic weight averaging over the validation-loss valley (Cha et al., NeurIPS 2021),
as a callback any method can use (classification and segmentation).

Training is cut into segments by the validations (``trainer.val_check_interval``); within a segment
the weights after every step are averaged. After each validation the segment is closed with the
live model's validation loss ``val/loss`` (the base logs the task loss on every source validation
split, averaged over domains: SWAD's ``tr_outloss``), and the official ``LossValley`` rules decide
which segments enter the final average:

* **start** (convergence): once the first of the last ``n_converge`` segments has the lowest loss of
  them, the model has converged; the threshold is ``(1 + tolerance_ratio)`` x their mean loss, and
  the average starts from the segments just before convergence whose losses stay under it;
* **end** (overfitting): every later validation adds the oldest segment of the last
  ``n_tolerance`` ones as long as the lowest loss among those stays under the threshold; the first
  time it does not, the valley is dead and nothing more is added; at the end of training the
  segments still waiting in the window are added while the minimum of the rest stays under it.

The averaged weights get their BatchNorm statistics recomputed on ``bn_steps`` training batches
(official: 500, and only when BatchNorm trains; with ``freeze_bn`` the statistics never change) and
are saved as ``checkpoints/swad.ckpt``, which then goes through the same test and in-domain
validation as every other selection and appears in ``results.json`` as ``swad`` with its segment
range (``start_step``, ``end_step``: training batches, 0-based), ``n_averaged`` and ``converged``.

Follows ``LossValley`` (``domainbed/swad.py``) and ``AveragedModel``/``update_bn``
(``domainbed/lib/swa_utils.py``) of the official code (khanrc/swad), defaults
``n_converge=3, n_tolerance=6, tolerance_ratio=0.3`` (its ``config.yaml``), including two of its
quirks: the segment just after the last above-threshold one before convergence is left out of the
start, and the segment at the convergence point enters the average twice (once at convergence,
once when it reaches the front of the tolerance window). :class:`LossValley` is that logic alone.

Differences: the official trainer validates at step 0 and every ``checkpoint_freq`` steps
(PACS: 200 of 5,001) and stops training when the valley dies; here the segments are the training
steps between Lightning's validations (none at step 0) and training continues unless
``stop_on_dead_valley`` (the average is the same either way: nothing is added after the valley
dies), so the run's other selections stay comparable with a run without SWAD. Only the trainable
parameters are averaged (the official averages all parameters; frozen ones are constant); buffers
other than BatchNorm statistics are the live model's at the end of training. Under DDP the
statistics are recomputed on each rank's share of the batches and rank 0's are saved. The
callback's state (the segments in the window, the average) is saved in every checkpoint, so a
resumed run continues the same detection; it costs up to ``max(n_converge, n_tolerance) + 2``
copies of the trainable weights per checkpoint.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dg_lightning.core.callbacks import ExtraSelection

Weights = dict[str, torch.Tensor]


@dataclass
class Segment:
    """The average of the weights over training steps ``start_step..end_step`` and the live model's
    validation loss at its end."""

    weights: Weights
    start_step: int
    end_step: int
    end_loss: float


@dataclass
class Average:
    """Official ``AveragedModel`` semantics: the first update copies, later ones keep the running mean
    (each update weighs 1); ``start_step`` is set by the first update, ``end_step`` by every one."""

    weights: Weights
    n_averaged: int = 0
    start_step: int = -1
    end_step: int = -1

    @classmethod
    def from_segment(cls, segment: Segment) -> Average:
        # AveragedModel(model) deep-copies the weights with n_averaged = 0: the next update overwrites them
        return cls({k: v.clone() for k, v in segment.weights.items()})

    def update(self, segment: Segment) -> None:
        for k, v in self.weights.items():
            if self.n_averaged == 0:
                v.copy_(segment.weights[k])
            else:
                v.add_((segment.weights[k] - v) / (self.n_averaged + 1))
        self.n_averaged += 1
        if self.n_averaged == 1:
            self.start_step = segment.start_step
        self.end_step = segment.end_step


@dataclass
class LossValley:
    """The official start/end rules on a stream of segments (``update``), then ``final``."""

    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    converge_q: deque = field(init=False)
    smooth_q: deque = field(init=False)
    final_model: Average | None = None
    converge_step: int | None = None
    dead_valley: bool = False
    threshold: float | None = None

    def __post_init__(self):
        self.converge_q = deque(maxlen=self.n_converge)
        self.smooth_q = deque(maxlen=self.n_tolerance)

    @property
    def is_converged(self) -> bool:
        return self.converge_step is not None

    def smooth_loss(self) -> float:
        return min(s.end_loss for s in self.smooth_q)

    def update(self, segment: Segment) -> None:
        if self.dead_valley:
            return
        self.converge_q.append(segment)
        self.smooth_q.append(segment)
        if not self.is_converged:
            if len(self.converge_q) < self.n_converge:
                return
            if int(np.argmin([s.end_loss for s in self.converge_q])) != 0:
                return
            # converged: the oldest of the last n_converge segments is their minimum
            self.converge_step = self.converge_q[0].end_step
            self.final_model = Average.from_segment(self.converge_q[0])
            self.threshold = float(np.mean([s.end_loss for s in self.converge_q])) * (1.0 + self.tolerance_ratio)
            if self.n_tolerance < self.n_converge:
                for i in range(self.n_converge - self.n_tolerance):
                    self.final_model.update(self.converge_q[1 + i])
            elif self.n_tolerance > self.n_converge:
                window = list(self.smooth_q)[: self.n_tolerance - self.n_converge + 1]  # up to the converge point
                start = 0
                for i in reversed(range(len(window))):
                    if window[i].end_loss > self.threshold:
                        start = i + 1
                        break
                for s in window[start + 1:]:
                    self.final_model.update(s)
            return
        if self.smooth_q[0].end_step < self.converge_step:
            return
        if self.smooth_loss() > self.threshold:
            self.dead_valley = True  # the loss left the valley: nothing more is averaged
            return
        self.final_model.update(self.smooth_q[0])

    def final(self) -> Average | None:
        """The averaged weights (``None`` before any segment); before convergence the last segment."""
        if not self.is_converged:
            if not self.converge_q:
                return None
            last = self.converge_q[-1]
            avg = Average.from_segment(last)
            avg.update(last)
            return avg
        if not self.dead_valley:
            self.smooth_q.popleft()
            while self.smooth_q:
                if self.smooth_loss() > self.threshold:
                    break
                self.final_model.update(self.smooth_q.popleft())
        return self.final_model

    # -- checkpoints: the window's segments (the two queues share them), the average, the scalars
    def state_dict(self) -> dict:
        kept = list(self.smooth_q) if len(self.smooth_q) >= len(self.converge_q) else list(self.converge_q)
        seg = [vars(s) for s in kept]
        fm = vars(self.final_model) if self.final_model is not None else None
        return {"segments": seg, "n_smooth": len(self.smooth_q), "n_converge_q": len(self.converge_q),
                "final_model": fm, "converge_step": self.converge_step, "dead_valley": self.dead_valley,
                "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        kept = [Segment(**s) for s in state["segments"]]
        self.smooth_q = deque(kept[len(kept) - state["n_smooth"]:], maxlen=self.n_tolerance)
        self.converge_q = deque(kept[len(kept) - state["n_converge_q"]:], maxlen=self.n_converge)
        self.final_model = Average(**state["final_model"]) if state["final_model"] is not None else None
        self.converge_step, self.dead_valley = state["converge_step"], state["dead_valley"]
        self.threshold = state["threshold"]


def trainable_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def prediction_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers on the prediction path (backbone, decoder and heads; not a teacher's) that
    update their statistics in training mode (not frozen)."""
    parts = [getattr(module, n, None) for n in ("backbone", "decoder", "seg_head", "classifier")]
    return [m for part in parts if isinstance(part, nn.Module) for m in part.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, images, device) -> int:
    """Official ``update_bn``: reset the prediction path's BatchNorm statistics and re-estimate them as
    plain averages (momentum ``None``) over ``images`` (an iterable of batches) in training mode.
    Returns the number of layers updated."""
    was_training = module.training
    module.train()
    layers = prediction_batchnorms(module)
    if layers:
        momenta = {m: m.momentum for m in layers}
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        for x in images:
            module(x.to(device))
        for m, momentum in momenta.items():
            m.momentum = momentum
    module.train(was_training)
    return len(layers)


class SWAD(ExtraSelection):
    """Dense weight averaging over the validation-loss valley; see the module docstring.

    Args:
        n_converge: window for detecting convergence (official 3).
        n_tolerance: window of the overfitting test (official 6).
        tolerance_ratio: threshold = (1 + ratio) x the converged window's mean loss (official 0.3).
        monitor: the logged validation loss (the base's ``val/loss``).
        bn_steps: training batches for the BatchNorm statistics of the average (official 500).
        stop_on_dead_valley: stop training when the valley dies (the official trainer does).
        selection: the name in ``results.json``.
        dirpath: where ``swad.ckpt`` goes (default ``<run>/checkpoints``).
    """

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3,
                 monitor: str = "val/loss", bn_steps: int = 500, stop_on_dead_valley: bool = False,
                 selection: str = "swad", dirpath: str | None = None):
        if n_converge < 1 or n_tolerance < 1 or tolerance_ratio < 0:
            raise ValueError("SWAD needs n_converge >= 1, n_tolerance >= 1 and tolerance_ratio >= 0")
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.monitor, self.bn_steps, self.stop_on_dead_valley = monitor, bn_steps, stop_on_dead_valley
        self.selection, self.dirpath = selection, dirpath
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.step = 0  # training batches seen
        self._segment: Weights | None = None  # running mean of the current segment (on the model's device)
        self._segment_n, self._segment_start = 0, 0
        self.checkpoint_path: str | None = None
        self._info: dict = {}

    # -- the running segment ---------------------------------------------------------------------
    @torch.no_grad()
    def add_weights(self, pl_module: nn.Module) -> None:
        """The current weights into the running segment average (after a training step)."""
        live = trainable_weights(pl_module)
        if self._segment is None or self._segment_n == 0:
            self._segment = {k: p.detach().clone() for k, p in live.items()}
            self._segment_n, self._segment_start = 1, self.step
        else:
            self._segment_n += 1
            for k, avg in self._segment.items():
                avg.add_((live[k].detach() - avg) / self._segment_n)
        self.step += 1

    def close_segment(self, val_loss: float) -> None:
        """End the running segment with the live model's validation loss and feed it to the valley."""
        if not self._segment_n:
            return
        segment = Segment({k: v.detach().cpu().clone() for k, v in self._segment.items()}, self._segment_start,
                          self.step - 1, float(val_loss))
        self._segment_n = 0
        converged = self.valley.is_converged
        self.valley.update(segment)
        if self.valley.is_converged and not converged:
            rank_zero_info(f"SWAD: converged at step {self.valley.converge_step}, averaging from step "
                           f"{self.valley.final_model.start_step}, threshold {self.valley.threshold:.4f}")

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.add_weights(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self._segment_n:
            return
        if self.monitor not in trainer.callback_metrics:
            raise RuntimeError(f"SWAD needs the validation loss {self.monitor!r} after every validation, but "
                               f"{type(pl_module).__name__} did not log it (logged: "
                               f"{sorted(k for k in trainer.callback_metrics if k.startswith('val/'))}); methods "
                               "with their own validation step (linear probes) cannot use SWAD")
        self.close_segment(float(trainer.callback_metrics[self.monitor]))
        if self.valley.dead_valley and self.stop_on_dead_valley:
            rank_zero_info(f"SWAD: the valley is dead at step {self.step - 1}: stopping training")
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = self.valley.final()
        if final is None:
            rank_zero_warn("SWAD: no validation ran during training, so there is nothing to average "
                           "(no swad selection); validate during fit (trainer.val_check_interval)")
            return
        if not self.valley.is_converged:
            rank_zero_warn("SWAD: the validation loss never converged (n_converge "
                           f"{self.n_converge}); the swad selection is the last segment's average")
        live = trainable_weights(pl_module)
        saved = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        with torch.no_grad():
            for k, v in final.weights.items():
                live[k].copy_(v.to(live[k].device))
        n_bn = recompute_batchnorm(pl_module, self.bn_batches(trainer), pl_module.device) if self.bn_steps > 0 else 0
        self.checkpoint_path = str(Path(self.dirpath) / "swad.ckpt")
        trainer.save_checkpoint(self.checkpoint_path, weights_only=True)
        pl_module.load_state_dict(saved)
        self._info = {"start_step": final.start_step, "end_step": final.end_step, "n_averaged": final.n_averaged,
                      "converged": self.valley.is_converged, "converge_step": self.valley.converge_step,
                      "dead_valley": self.valley.dead_valley, "threshold": self.valley.threshold,
                      "batchnorm_layers_recomputed": n_bn, "bn_steps": self.bn_steps if n_bn else 0,
                      "segments_seen_steps": self.step}
        rank_zero_info(f"SWAD: averaged {final.n_averaged} segments, steps {final.start_step}-{final.end_step} "
                       f"-> {self.checkpoint_path}")

    def bn_batches(self, trainer: L.Trainer):
        """``bn_steps`` training batches' images (the training loader, re-drawn epoch after epoch)."""
        loader = trainer.datamodule.train_dataloader()

        def batches():
            for epoch in itertools.count():
                if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                    loader.sampler.set_epoch(10_000 + epoch)  # not the training epochs' draws
                yield from (b[0] for b in loader)

        return itertools.islice(batches(), self.bn_steps)

    def info(self) -> dict:
        return dict(self._info)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        segment = {k: v.cpu() for k, v in self._segment.items()} if self._segment_n else None
        return {"valley": self.valley.state_dict(), "step": self.step, "segment": segment,
                "segment_n": self._segment_n, "segment_start": self._segment_start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.valley.load_state_dict(state_dict["valley"])
        self.step = state_dict["step"]
        self._segment_n, self._segment_start = state_dict["segment_n"], state_dict["segment_start"]
        self._segment = state_dict["segment"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._segment is not None:  # a resumed segment, onto the model's device
            self._segment = {k: v.to(pl_module.device) for k, v in self._segment.items()}
