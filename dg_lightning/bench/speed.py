"""`make bench-speed`: training throughput of the data paths against the compute limit and DomainBed's loop.

    python -m dg_lightning.bench.speed [--device cpu|cuda] [--methods erm gcisg] [--models resnet18@64 ...]
                                       [--workers 0 1 2] [--rounds 3] [--steps 20] [--breakdown]
                                       [--file-side 227] [--out bench/speed.json]

For each method and backbone@size, in interleaved rounds (so that ratios survive a noisy machine):

* ``compute``: the method's forward, backward and Adam step on one batch already in memory (already
  augmented, on the device): the limit any data path can reach;
* ``per-sample``: ``Trainer.fit`` with today's path: every image JPEG-decoded and augmented with PIL in
  the loader (``batch_augment: false``), the balanced sampler, Lightning's loop with a CSV logger
  and per-step reseeding (as ``dg-lightning fit``);
* ``batched``: the same with the new path: images read from the decoded-image cache, crop in the
  loader, colour augmentation on the batch's device (``batch_augment: true, cache_images: true``);
  for GCISG the two RandAugment views are made on the batch's device too (``views_on: batch``),
  where ``per-sample`` makes them in the loader (``views_on: loader``, the default);
* ``domainbed`` (ERM only): a plain PyTorch loop doing what ``domainbed/scripts/train.py`` does per
  step: one infinite loader per source domain (``InfiniteDataLoader``: random sampling with
  replacement, ``num_workers`` each), torchvision's PIL transforms per image (DomainBed's
  ``augment_transform``, ImageNet normalisation included), the batches concatenated, cross-entropy,
  Adam, ``loss.item()``; the same backbone and head, the same images and batch, in the suite's
  memory format and precision (so that ``batched / domainbed`` compares the data paths alone);
* with ``--breakdown``, where the batched row's time goes: ``loop``, Lightning's loop (the same Trainer
  and callbacks) on the in-memory batch of ``compute`` (the loop's own cost), and ``data-path``, the
  batched path alone: the train loader read and ``finish_batch`` (the batch's augmentation), no model;
  run one after the other they would give ``1 / (1 / loop + 1 / data-path)`` images/s;
* ``domainbed-as-is`` (ERM, when the suite's settings differ from DomainBed's: channels-last, or bf16
  on CUDA): the same loop as DomainBed runs it, contiguous (NCHW) tensors in fp32, and
  ``compute-as-is``, the compute limit in those settings: what a user moving from DomainBed's own loop
  gains, compute included. The ``batched`` row also gives the ceiling of those two ratios: the suite's
  compute limit over the loop in each round (``compute_over_domainbed``, ``compute_over_domainbed_as_is``).

The ``Trainer.fit`` rows (``per-sample``, ``batched``, ``loop``) also give the share of their timed wall
time spent between steps (``between_steps_share``): from the end of one training batch to the start of
the next, where the loader's next batch is read, moved and augmented. It is measured on the same steps
as the images/s, so it does not move with the machine's load as the ratio of two measurements does.

Memory format (``--memory-format``, default ``channels-last``): the model of ``compute``,
``per-sample``, ``batched`` and ``domainbed`` in channels-last (``core.callbacks.ChannelsLast`` in the
pipelines), which on CPUs too lets oneDNN run convolutions, depthwise ones above all, without layout
transposes. Rows give images/s per round, the median, the median ratio to the same round's compute
limit (``domainbed-as-is``: to ``compute-as-is``), and for ``batched`` the median ratio to
``domainbed`` and to ``domainbed-as-is`` at the same worker count. Each round runs the measurements in
the opposite order of the previous one. ``--device cuda``: ResNet-50 at 224 px, batch 32 x 3, bf16
autocast (``bf16-mixed``), a worker sweep up to the machine's cores.
Without PACS it writes the embedded shapes as 96 px JPEGs into a temporary folder. GCISG's data module
uses ``augment: none`` (its views replace the preset), so the cache holds the training-size copy its
batched views read.

``--file-side N`` first copies the data's images resized to N x N (bicubic, JPEG quality 90) into a
temporary folder and reads that copy: the shared PACS is a 96 px copy of files whose originals are
227 px, and the paths that decode every image on every step (``per-sample``, DomainBed's loop) pay for
the size of the files they read, the cache only once (an upsampled copy is smoother than an original of
that size, so if anything cheaper to decode).
Writes JSON with the command, the commit and the machine; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from dg_lightning.core.callbacks import ChannelsLast, StepSeed
from dg_lightning.data import PACS, ImageFolderDomains

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


# -- the compute limit -----------------------------------------------------------------------------------
def seconds_per_step(model, batch, opt: torch.optim.Optimizer, steps: int, warmup: int,
                     precision: str = "32") -> float:
    """Mean time of ``training_losses`` + backward + optimiser step on one in-memory batch, on the
    model's device (``precision`` ``bf16``: bf16 autocast on CUDA, as ``bf16-mixed`` training)."""
    device = next(model.parameters()).device
    x, y, d, *_ = batch
    x = [v.to(device) for v in x] if isinstance(x, list) else x.to(device)
    y, d = y.to(device), d.to(device)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(steps + warmup):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with autocast:
            loss = model.training_losses(x, y, d)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


# -- the suite's pipelines --------------------------------------------------------------------------------
class _Timer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the start of batch ``warmup + steps`` (synchronised
    only at those two points, so the loop runs as it would), and the part of it spent between steps:
    from the end of one training batch to the start of the next, where Lightning reads the loader's next
    batch, moves it and augments it (``on_after_batch_transfer``). Both are measured on the same steps,
    so their ratio does not move with the machine's load as a ratio of two runs does. On CUDA it is host
    time, which may overlap the GPU's queued work (an upper bound on the GPU's wait)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.seconds = warmup, steps, None, None
        self.between, self._end = 0.0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.warmup < batch_idx <= self.warmup + self.steps:
            self.between += time.perf_counter() - self._end
        if batch_idx in (self.warmup, self.warmup + self.steps):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if batch_idx == self.warmup:
                self.t0 = now
            else:
                self.seconds = now - self.t0


class Setup:
    """What one measurement needs: the data (PACS or the embedded shapes as JPEGs), the method, the device."""

    def __init__(self, args, method: str, backbone: str, size: int, pretrained):
        self.args, self.method, self.backbone, self.size, self.pretrained = args, method, backbone, size, pretrained
        self.cuda = args.device == "cuda"
        self.channels_last = args.memory_format == "channels-last"
        self.batched_training: bool | None = None

    def datamodule(self, workers: int, batched: bool, steps: int):
        kw = dict(test_domains=["sketch"], batch_size=self.args.batch_size, image_size=self.size, num_workers=workers,
                  split_seed=0, steps_per_epoch=steps + 2, batch_augment=batched, cache_images=batched,
                  augment="none" if self.method == "gcisg" else "domainbed")
        if self.args.pacs:
            return PACS(root=self.args.root, **kw)
        return ImageFolderDomains(root=self.args.root, **kw)

    def model(self, batched: bool = True):
        """The method; GCISG with its views made on the batch (``batched``) or in the loader."""
        from dg_lightning.methods import ERM, GCISG

        kw = dict(num_classes=7 if self.args.pacs else 6, backbone=self.backbone, pretrained=self.pretrained,
                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-4))
        if self.method == "gcisg":
            return GCISG(queue_size=4096, views_on="batch" if batched else "loader", **kw)
        return ERM(**kw)

    def bf16(self, as_is: bool = False) -> bool:
        """bf16 autocast: on CUDA in the suite's settings; never as DomainBed runs (``as_is``)."""
        return self.cuda and not as_is

    def place(self, model, as_is: bool = False):
        """``model`` on the bench's device, channels-last in the suite's settings (``as_is``: contiguous, as
        DomainBed runs)."""
        model.to(torch.device("cuda" if self.cuda else "cpu"))
        if self.channels_last and not as_is:
            model.to(memory_format=torch.channels_last)
        return model

    @property
    def images_per_step(self) -> int:
        return self.args.batch_size * 3


def first_batch(dm, model):
    """The train loader's first batch, augmented, with ``model`` bound to ``dm`` first: a method's own views
    (GCISG's two) are part of the batch, as in ``Trainer.fit``."""
    model.bind_data(dm)
    return dm.finish_batch(next(iter(dm.train_dataloader())))


def compute_throughput(s: Setup, steps: int, warmup: int, as_is: bool = False) -> float:
    """Images/s of the step on an in-memory batch in the suite's settings (``as_is``: DomainBed's, contiguous fp32)."""
    dm = s.datamodule(0, True, steps)
    dm.prepare_data()
    model = s.model()
    batch = first_batch(dm, model)
    s.place(model, as_is)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return s.images_per_step / seconds_per_step(model, batch, opt, steps, warmup, "bf16" if s.bf16(as_is) else "32")


class _Repeat:
    """One batch ``n`` times (an iterable, not a list: Lightning reads a list as several loaders)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def data_path_throughput(s: Setup, workers: int, steps: int, warmup: int) -> float:
    """Images/s of the batched path alone: the train loader's batches, augmented by ``finish_batch``."""
    dm = s.datamodule(workers, True, warmup + steps)
    dm.setup()
    model = s.model()
    model.bind_data(dm)  # a method's own views (GCISG's two) are part of the batch
    batches = iter(dm.train_dataloader())
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        dm.finish_batch(next(batches))
    seconds = time.perf_counter() - t0
    del batches  # ends the workers
    return s.images_per_step * steps / seconds


def pipeline_throughput(s: Setup, workers: int, batched: bool, steps: int, warmup: int,
                        in_memory: bool = False) -> tuple[float, float]:
    """Images/s of ``Trainer.fit`` on the per-sample or batched path (``in_memory``: on one batch of the
    batched path, already augmented, given again every step: Lightning's loop on the compute limit's work),
    and the share of that wall time spent between steps (``_Timer``)."""
    dm = s.datamodule(workers, batched, warmup + steps)
    model = s.model(batched)
    if in_memory:
        batch = first_batch(dm, model)
        dm.train_dataloader = lambda: _Repeat(batch, warmup + steps + 1)
    timer = _Timer(warmup, steps)
    callbacks = [timer, StepSeed()] + ([ChannelsLast()] if s.channels_last else [])
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator="gpu" if s.cuda else "cpu", devices=1, precision="bf16-mixed" if s.cuda else "32-true",
            max_steps=warmup + steps + 1, limit_val_batches=0, num_sanity_val_steps=0,
            logger=L.pytorch.loggers.CSVLogger(logs), log_every_n_steps=5, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            callbacks=callbacks, default_root_dir=logs)
        trainer.fit(model, datamodule=dm)
    if batched and not in_memory:  # False if the method replaced the preset by per-sample views
        s.batched_training = dm.batched_training
    return s.images_per_step * steps / timer.seconds, timer.between / timer.seconds


# -- DomainBed's loop ---------------------------------------------------------------------------------------
class _InfiniteSampler(Sampler):
    """DomainBed's ``_InfiniteSampler``: a batch sampler repeated for ever."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        while True:
            yield from self.sampler


class _Images(Dataset):
    """torchvision's ImageFolder on a list of files: PIL loading, then the transform."""

    def __init__(self, paths, labels, transform):
        from torchvision.datasets.folder import default_loader

        self.paths, self.labels, self.transform, self.loader = list(paths), list(labels), transform, default_loader

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.loader(self.paths[i])), self.labels[i]


def domainbed_throughput(s: Setup, workers: int, steps: int, warmup: int, as_is: bool = False) -> float:
    """``domainbed/scripts/train.py``'s step with ``InfiniteDataLoader`` per source domain and ERM's update,
    in the suite's memory format and precision (``as_is``: DomainBed's own, contiguous fp32)."""
    from torchvision import transforms as T

    augment = T.Compose([T.RandomResizedCrop(s.size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                         T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), T.ToTensor(), T.Normalize(*IMAGENET)])
    dm = s.datamodule(0, False, steps)
    dm.setup()
    loaders = []
    for d in dm.train_domains:
        items, labels = dm._data[d]
        idx = dm.split_indices(d, "in")
        ds = _Images([items[i] for i in idx], [labels[i] for i in idx], augment)
        batches = BatchSampler(RandomSampler(ds, replacement=True), batch_size=s.args.batch_size, drop_last=True)
        loaders.append(iter(DataLoader(ds, num_workers=workers, batch_sampler=_InfiniteSampler(batches))))
    device = torch.device("cuda" if s.cuda else "cpu")
    model = s.place(s.model(), as_is)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16(as_is))
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        minibatches = [(x.to(device), y.to(device)) for x, y in (next(it) for it in loaders)]
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        with autocast:  # the images are normalised already: the backbone and head directly
            loss = F.cross_entropy(model.classifier(model.backbone(all_x)), all_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    seconds = time.perf_counter() - t0
    del loaders  # ends the workers
    return s.images_per_step * steps / seconds


# -- the run ---------------------------------------------------------------------------------------------------
def summarise(rounds: dict[tuple, list[float]], channels_last: bool,
              between: dict[tuple, list[float]] | None = None) -> list[dict]:
    """Rows from each (pipeline, workers)'s images/s per round: the median, the median of the per-round
    ratios to that round's compute limit (``-as-is`` rows: to ``compute-as-is``) and, for ``batched``,
    to DomainBed's loop at the same workers, with the ceiling of that ratio: the suite's compute limit
    over the loop (``compute_over_domainbed``...), what a data path that cost nothing would reach; for the
    ``Trainer.fit`` rows, the median share of their wall time spent between steps (``between``)."""
    rows = []
    for (pipeline, w), vals in rounds.items():
        contiguous = pipeline.endswith("as-is")
        limit = rounds[("compute-as-is" if contiguous else "compute", None)]
        row = {"pipeline": pipeline, "num_workers": w, "img_per_s": [round(v, 2) for v in vals],
               "median_img_per_s": round(statistics.median(vals), 2),
               "memory_format": "contiguous" if contiguous or not channels_last else "channels-last",
               "ratio_to_compute": round(statistics.median(v / c for v, c in zip(vals, limit)), 3)}
        if (pipeline, w) in (between or {}):
            row["between_steps_share"] = [round(v, 4) for v in between[(pipeline, w)]]
            row["median_between_steps_share"] = round(statistics.median(between[(pipeline, w)]), 4)
        for loop, key in (("domainbed", "ratio_to_domainbed"), ("domainbed-as-is", "ratio_to_domainbed_as_is")):
            if pipeline == "batched" and (loop, w) in rounds:
                row[key] = round(statistics.median(v / d for v, d in zip(vals, rounds[(loop, w)])), 3)
                row[key.replace("ratio_to", "compute_over")] = round(statistics.median(
                    c / d for c, d in zip(rounds[("compute", None)], rounds[(loop, w)])), 3)
        rows.append(row)
    return rows


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--root", default=os.environ.get("PACS_ROOT") or "../shared/data/pacs")
    p.add_argument("--methods", nargs="+", default=["erm", "gcisg"], choices=["erm", "gcisg"])
    p.add_argument("--models", nargs="+", default=None,
                   help="backbone@size[:wheel]; default cpu: resnet18@64 tf_efficientnet_lite0@96:wheel, cuda: resnet50@224")
    p.add_argument("--batch-size", type=int, default=None, help="per source domain (default cpu 24, cuda 32)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader workers (default cpu 0 1 2; cuda 0 2 4 8 ... up to the cores)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--gcisg-steps", type=int, default=10, help="timed steps per GCISG measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-domainbed", action="store_true", help="skip the DomainBed loop")
    p.add_argument("--breakdown", action="store_true",
                   help="also the loop on the in-memory batch (loop) and the batched path alone (data-path)")
    p.add_argument("--memory-format", default="channels-last", choices=["channels-last", "contiguous"],
                   help="the suite's rows and the DomainBed loop in this format; with channels-last, also "
                        "DomainBed's loop as it runs (contiguous) and the compute limit in that format")
    p.add_argument("--file-side", type=int, default=None,
                   help="first copy the data's images resized to this side into a temporary folder (227: the "
                        "size of PACS's original files, whose decode the shared 96 px copy does not cost)")
    p.add_argument("--out", default="bench/speed.json")
    args = p.parse_args(argv)
    if args.file_side is not None and args.file_side < 1:
        p.error(f"--file-side {args.file_side}: give the side in pixels, e.g. --file-side 227 (PACS's originals)")
    cuda = args.device == "cuda"
    args.models = args.models or (["resnet50@224"] if cuda else ["resnet18@64", "tf_efficientnet_lite0@96:wheel"])
    args.batch_size = args.batch_size or (32 if cuda else 24)
    if args.workers is None:
        cores = os.cpu_count() or 1
        args.workers = [0] + [w for w in (2, 4, 8, 16, 32, 64) if w <= cores] if cuda else [0, 1, 2]
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    args = parse_args(argv)
    from dg_lightning.cli_utils import quiet_third_party

    quiet_third_party()  # its many short fits would print Lightning's tip and a torch deprecation each time
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    tmp = None
    args.pacs = (Path(args.root) / "photo").is_dir()
    if args.pacs:
        data = f"PACS ({args.root})"
    else:
        from dg_lightning.data.synthetic import write_image_folder

        tmp = tempfile.TemporaryDirectory()
        write_image_folder(tmp.name, per_class=60, size=96, fmt="jpg")
        args.root = tmp.name
        data = "embedded shapes written as 96 px JPEGs (PACS not found)"
    if args.file_side:
        from dg_lightning.data.folder import write_resized_copy

        copy = tempfile.TemporaryDirectory()
        n = write_resized_copy(args.root, copy.name, args.file_side)
        if tmp is not None:
            tmp.cleanup()
        tmp, args.root = copy, copy.name
        data += f", its {n} files resized to {args.file_side} px (bicubic, JPEG quality 90) in a temporary copy"

    suites = []
    for method in args.methods:
        for spec in args.models:
            name, _, weights = spec.partition(":")
            backbone, _, size = name.partition("@")
            suites.append(Setup(args, method, backbone, int(size), weights or False))

    results = []
    for s in suites:
        steps = args.gcisg_steps if s.method == "gcisg" else args.steps
        t0 = time.perf_counter()
        s.datamodule(0, True, steps).prepare_data()  # the decoded-image cache, built once (not timed)
        cache_seconds = round(time.perf_counter() - t0, 1)
        as_is = s.channels_last or s.cuda  # the suite's settings differ from DomainBed's own
        loops = ("domainbed", "domainbed-as-is") if as_is else ("domainbed",)
        with_domainbed = s.method == "erm" and not args.no_domainbed
        items = [("compute", None)] + ([("compute-as-is", None)] if as_is and with_domainbed else []) \
            + ([("loop", None)] if args.breakdown else []) \
            + [(p, w) for w in args.workers
               for p in ("per-sample", "batched", *loops, *(("data-path",) if args.breakdown else ()))
               if with_domainbed or not p.startswith("domainbed")]
        rounds: dict[tuple, list[float]] = {k: [] for k in items}
        between: dict[tuple, list[float]] = {}  # Trainer.fit rows: share of the wall time between steps
        for r in range(args.rounds):
            for pipeline, w in (items if r % 2 == 0 else items[::-1]):
                share = None
                if pipeline.startswith("compute"):
                    v = compute_throughput(s, steps, args.warmup, as_is=pipeline.endswith("as-is"))
                elif pipeline == "loop":
                    v, share = pipeline_throughput(s, 0, True, steps, args.warmup, in_memory=True)
                elif pipeline == "data-path":
                    v = data_path_throughput(s, w, steps, args.warmup)
                elif pipeline.startswith("domainbed"):
                    v = domainbed_throughput(s, w, steps, args.warmup, as_is=pipeline.endswith("as-is"))
                else:
                    v, share = pipeline_throughput(s, w, pipeline == "batched", steps, args.warmup)
                rounds[(pipeline, w)].append(v)
                if share is not None:
                    between.setdefault((pipeline, w), []).append(share)
                print(f"[{s.method} {s.backbone}@{s.size} round {r}] {pipeline}"
                      f"{'' if w is None else f' workers={w}'}: {v:.1f} img/s"
                      f"{'' if share is None else f', {share:.3f} of it between steps'}", flush=True)
        rows = summarise(rounds, s.channels_last, between)
        res = {"method": s.method, "backbone": s.backbone, "image_size": s.size,
               "pretrained": s.pretrained or False, "batch": f"{args.batch_size} x 3 source domains",
               "steps_timed": steps, "warmup": args.warmup, "cache_build_s": cache_seconds,
               "batched_augmentation_in_training": s.batched_training, "rows": rows}
        if s.method == "gcisg":
            res["views_on"] = {"compute": "batch", "per-sample": "loader", "batched": "batch"}
        results.append(res)

    out = {"command": "python -m dg_lightning.bench.speed " + " ".join(argv), "commit": commit(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "device": args.device,
           "precision": "bf16-mixed" if args.device == "cuda" else "32", "memory_format": args.memory_format,
           "data": data, "rounds": args.rounds, "wall_seconds": round(time.perf_counter() - started, 1),
           "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(render(out))
    print(f"written: {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def render(out: dict) -> str:
    lines = [f"{out['device']} ({out['machine'].get('gpu') or out['machine']['cpu']}), {out['data']}, "
             f"{out['rounds']} rounds, commit {out['commit']}"]
    for res in out["results"]:
        lines += ["", f"**{res['method'].upper()}, {res['backbone']} @ {res['image_size']} px**, batch {res['batch']}",
                  "", "| pipeline | workers | img/s (median) | / compute | batched / DomainBed | batched / DomainBed as is |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            w = "" if r["num_workers"] is None else r["num_workers"]
            vs, as_is = r.get("ratio_to_domainbed", ""), r.get("ratio_to_domainbed_as_is", "")
            lines.append(f"| {r['pipeline']} | {w} | {r['median_img_per_s']} | {r['ratio_to_compute']:.2f} | {vs} | {as_is} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
