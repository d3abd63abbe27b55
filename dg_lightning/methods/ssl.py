"""Self-supervised pre-training judged by linear probes: the six SSL bases and their shared base.

The bases' heads, losses, memory banks, momentum updates, schedules and view transforms are
lightly's (pinned in ``pyproject.toml``); this module only wires them to the method base:

=============  ==========================================================  =====================
``ssl``        heads and loss (lightly)                                    momentum encoder
=============  ==========================================================  =====================
simclr         SimCLRProjectionHead, NTXentLoss (tau 0.5)                  no
moco (v2)      MoCoProjectionHead, NTXentLoss with a 65,536 memory bank    backbone + head
moco (v3)      MoCo v3 BN heads + predictor, symmetric NTXentLoss          backbone + head
byol           BYOL projection + prediction heads, NegativeCosineSimilarity backbone + head
dino           DINOProjectionHead, DINOLoss (teacher centring, temp warmup) backbone + head
simsiam        SimSiam projection + prediction heads, stop-gradient        no
barlowtwins    BarlowTwinsProjectionHead, BarlowTwinsLoss (lambda 5e-3)    no
=============  ==========================================================  =====================

Momentum encoders follow lightly's cosine schedule from the base's ``momentum`` to 1 over the run.
Views come from lightly's transforms (SimCLR/MoCo v2/BYOL/DINO multi-crop/SimSiam), applied per
sample in the data loader workers, seeded per sample like every other augmentation here.

Evaluation (all self-supervised methods, :class:`SSLMethod`): at the start of every validation
epoch a linear probe per representation part (:mod:`dg_lightning.eval.probe`) is fitted on the
frozen features of the source domains' "in" splits; the per-domain metrics then report it on the
source "out" splits (``val/<domain>/acc``: in-domain, drives model selection) and on the held-out
domains (``test/<domain>/acc``: unseen). The primary part is logged as ``acc``, the others as
``acc_<part>``. Labels are used by nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import heads
from lightly.models.utils import update_momentum
from lightly.transforms import (
    BYOLTransform,
    DINOTransform,
    MoCoV2Transform,
    SimCLRTransform,
    SimSiamTransform,
)
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.utils.data import Subset
from torchvision.transforms.functional import to_pil_image

from dg_lightning.core.data import ShardSampler
from dg_lightning.core.method import DGMethod
from dg_lightning.eval.probe import extract, fit_linear_probe, pad_rows, unshard


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False)


class SSLObjective(nn.Module):
    """One self-supervised base: heads, loss and view transform, on representations of ``in_dim``.

    ``loss(h, h_m, epoch)`` takes the online representations of every view and, for momentum
    bases, the momentum encoder's representations of the first ``teacher_views`` views.
    """

    #: momentum (EMA) encoder needed; its start value of the cosine schedule to 1
    momentum: float | None = None
    #: how many of the views (the first ones) the momentum branch sees
    teacher_views = 2

    def transform(self, image_size: int):
        raise NotImplementedError

    def loss(self, h: list[torch.Tensor], h_m: list[torch.Tensor] | None, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def momentum_update(self, m: float) -> None:
        """EMA of the heads that have a momentum copy (the backbone copy is the method's)."""

    def after_backward(self, epoch: int) -> None:
        """Hook after ``backward`` (DINO freezes its last layer during the first epoch)."""


class SimCLR(SSLObjective):
    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, temperature: float = 0.5):
        super().__init__()
        self.head = heads.SimCLRProjectionHead(in_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def transform(self, image_size: int):
        return SimCLRTransform(input_size=image_size, normalize=None)

    def loss(self, h, h_m, epoch):
        return self.criterion(self.head(h[0]), self.head(h[1]))


class MoCo(SSLObjective):
    """MoCo v2 (memory bank of keys, one direction) or v3 (BN heads, predictor, symmetric, no bank)."""

    def __init__(self, in_dim: int, version: int = 2, hidden_dim: int | None = None, out_dim: int | None = None,
                 temperature: float = 0.2, queue_size: int = 65536, momentum: float | None = None):
        super().__init__()
        if version not in (2, 3):
            raise ValueError(f"MoCo version must be 2 or 3, got {version}")
        self.version = version
        v3 = version == 3
        hidden_dim, out_dim = hidden_dim or (4096 if v3 else 2048), out_dim or (256 if v3 else 128)
        self.momentum = momentum if momentum is not None else (0.99 if v3 else 0.996)
        self.head = heads.MoCoProjectionHead(in_dim, hidden_dim, out_dim, num_layers=3 if v3 else 2, batch_norm=v3)
        self.head_m = _frozen_copy(self.head)
        if v3:
            self.predictor = heads.MoCoProjectionHead(out_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True)
            self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)
        else:
            self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, out_dim))

    def transform(self, image_size: int):
        return MoCoV2Transform(input_size=image_size, normalize=None)

    def loss(self, h, h_m, epoch):
        k0, k1 = (self.head_m(v).detach() for v in h_m[:2])
        if self.version == 2:
            return self.criterion(self.head(h[0]), k1)
        p0, p1 = (self.predictor(self.head(v)) for v in h[:2])
        return 0.5 * (self.criterion(p0, k1) + self.criterion(p1, k0))

    def momentum_update(self, m):
        update_momentum(self.head, self.head_m, m)


class BYOL(SSLObjective):
    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.head = heads.BYOLProjectionHead(in_dim, hidden_dim, out_dim)
        self.predictor = heads.BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.head_m = _frozen_copy(self.head)
        self.criterion = NegativeCosineSimilarity()

    def transform(self, image_size: int):
        return byol_transform(image_size)

    def loss(self, h, h_m, epoch):
        p0, p1 = (self.predictor(self.head(v)) for v in h[:2])
        z0, z1 = (self.head_m(v).detach() for v in h_m[:2])
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def momentum_update(self, m):
        update_momentum(self.head, self.head_m, m)


def byol_transform(image_size: int) -> BYOLTransform:
    """BYOL's two asymmetric views (also Barlow Twins'), without normalisation (the model normalises)."""
    return BYOLTransform(BYOLView1Transform(input_size=image_size, normalize=None),
                         BYOLView2Transform(input_size=image_size, normalize=None))


class SimSiam(SSLObjective):
    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, pred_hidden_dim: int = 512):
        super().__init__()
        self.head = heads.SimSiamProjectionHead(in_dim, hidden_dim, out_dim)
        self.predictor = heads.SimSiamPredictionHead(out_dim, pred_hidden_dim, out_dim)
        self.criterion = NegativeCosineSimilarity()

    def transform(self, image_size: int):
        return SimSiamTransform(input_size=image_size, normalize=None)

    def loss(self, h, h_m, epoch):
        z0, z1 = (self.head(v) for v in h[:2])
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))


class BarlowTwins(SSLObjective):
    def __init__(self, in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192, lambda_param: float = 5e-3):
        super().__init__()
        self.head = heads.BarlowTwinsProjectionHead(in_dim, hidden_dim, out_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param, gather_distributed=True)

    def transform(self, image_size: int):
        return byol_transform(image_size)

    def loss(self, h, h_m, epoch):
        return self.criterion(self.head(h[0]), self.head(h[1]))


class DINO(SSLObjective):
    """DINO: student sees every view (2 global + ``n_local_views`` local crops), the momentum
    teacher the 2 global ones; lightly's DINOLoss centres the teacher and warms its temperature up."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 n_local_views: int = 6, local_crop_fraction: float = 96 / 224, warmup_teacher_temp_epochs: int = 30,
                 freeze_last_layer: int = 1, momentum: float = 0.996):
        super().__init__()
        self.momentum, self.n_local_views, self.local_crop_fraction = momentum, n_local_views, local_crop_fraction
        def make():
            return heads.DINOProjectionHead(in_dim, hidden_dim, bottleneck_dim, out_dim,
                                            freeze_last_layer=freeze_last_layer)

        self.head = make()
        self.head_m = make().requires_grad_(False)  # weight_norm modules cannot be deep-copied
        self.head_m.load_state_dict(self.head.state_dict())
        self.criterion = DINOLoss(output_dim=out_dim, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs)

    def transform(self, image_size: int):
        local = max(8, round(image_size * self.local_crop_fraction))
        return DINOTransform(global_crop_size=image_size, local_crop_size=local,
                             n_local_views=self.n_local_views, normalize=None)

    def loss(self, h, h_m, epoch):
        teacher = [self.head_m(v).detach() for v in h_m[:2]]
        student = [self.head(v) for v in h]
        return self.criterion(teacher, student, epoch=epoch)

    def momentum_update(self, m):
        update_momentum(self.head, self.head_m, m)

    def after_backward(self, epoch):
        self.head.cancel_last_layer_gradients(current_epoch=epoch)


OBJECTIVES: dict[str, type[SSLObjective]] = {
    "simclr": SimCLR, "moco": MoCo, "byol": BYOL, "dino": DINO, "simsiam": SimSiam, "barlowtwins": BarlowTwins,
}


def build_objective(name: str, in_dim: int, args: dict[str, Any] | None = None) -> SSLObjective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown ssl base {name!r}: choose one of {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](in_dim, **(args or {}))
    except TypeError as e:
        raise TypeError(f"ssl_args for {name!r}: {e}") from e


class PILInput:
    """Hands a transform PIL images (lightly's solarize/blur need them) whatever the dataset loads."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            img = to_pil_image(img)
        return self.transform(img)


class SSLMethod(DGMethod):
    """Base of the self-supervised methods: views from the method, probes instead of a classifier.

    A subclass defines ``representations(x) -> {part: features}`` (``probe_part`` is the one
    logged as ``acc`` and used for model selection), ``probe_dims()`` and ``training_losses`` on a
    list of views.

    Args:
        probe_weight_decay: L2 penalty of the linear probes (on standardised features).
        probe_max_iter: L-BFGS iterations of each probe fit.
        probe_max_samples: fit the probes on at most this many samples per source domain (seeded
            subset; default: all of the "in" split).
        (everything else: :class:`DGMethod`; ``head_hidden`` and ``dropout`` are unused)
    """

    tasks = ("classification",)

    probe_part = "full"

    def __init__(self, probe_weight_decay: float = 1e-4, probe_max_iter: int = 100,
                 probe_max_samples: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.classifier = None  # the linear probes (``self.probes``) classify

    # -- what a subclass provides ----------------------------------------------------------------
    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"full": self.features(x)}

    def probe_dims(self) -> dict[str, int]:
        return {"full": self.backbone.num_features}

    def build_probes(self) -> None:
        dims = self.probe_dims()
        if self.probe_part not in dims:
            raise ValueError(f"probe part {self.probe_part!r} is not one of {sorted(dims)}")
        self.probes = nn.ModuleDict({p: nn.Linear(d, self.hparams.num_classes) for p, d in dims.items()})
        # fitted in closed form, never by the optimiser; frozen before DDP wraps the module (which
        # happens before configure_optimizers), else DDP waits for their gradients
        self.probes.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of the primary part's linear probe."""
        return self.probes[self.probe_part](self.representations(x)[self.probe_part])

    # -- views -----------------------------------------------------------------------------------
    def encode_views(self, views: list[torch.Tensor], backbone: nn.Module | None = None) -> list[torch.Tensor]:
        """Pooled backbone features of each view; views of one size go through in one batch."""
        net = self.backbone if backbone is None else backbone
        out: list[torch.Tensor | None] = [None] * len(views)
        by_shape: dict[tuple, list[int]] = {}
        for i, v in enumerate(views):
            by_shape.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_shape.values():
            h = net(self.normalize(torch.cat([views[i] for i in idx])))
            for i, chunk in zip(idx, h.chunk(len(idx)), strict=True):
                out[i] = chunk
        return out

    # -- probes ----------------------------------------------------------------------------------
    def probe_datasets(self) -> list:
        """The source domains' "in" splits (at most ``probe_max_samples`` each, seeded)."""
        dm = self.trainer.datamodule
        out = []
        for d in dm.train_domains:
            ds = dm.dataset(d, "in")
            limit = self.hparams.probe_max_samples
            if limit and len(ds) > limit:
                g = torch.Generator().manual_seed(len(ds))
                ds = Subset(ds, torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist())
            out.append(ds)
        return out

    def probe_features(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Frozen features and labels of the probe datasets. Under DDP every rank extracts a disjoint
        shard and the shards are all-gathered back into dataset order, so every rank fits the same
        probes on the same features, each sample's features computed once."""
        dm, rank, world = self.trainer.datamodule, self.global_rank, self.trainer.world_size
        feats: dict[str, list[torch.Tensor]] = {}
        labels = []
        for ds in self.probe_datasets():
            n = len(ds)
            if n < world:
                raise ValueError(f"a probe dataset of {n} samples cannot be sharded over {world} processes")
            loader = dm._loader(ds, dm.eval_batch_size, ShardSampler(n, rank, world))
            f, y = extract(self.representations, [loader], self.device)
            if world > 1:
                m = len(range(0, n, world))  # rank 0's shard is the longest
                f = {p: unshard(self.all_gather(pad_rows(v.to(self.device), m)).cpu(), n) for p, v in f.items()}
                y = unshard(self.all_gather(pad_rows(y.to(self.device), m)).cpu(), n)
            for p, v in f.items():
                feats.setdefault(p, []).append(v)
            labels.append(y)
        return {p: torch.cat(v) for p, v in feats.items()}, torch.cat(labels)

    @torch.no_grad()
    def fit_probes(self) -> None:
        """Refit every probe on the frozen features of the source "in" splits (identical on every
        DDP rank: same gathered features, deterministic fit)."""
        was_training = self.training
        self.eval()
        feats, labels = self.probe_features()
        for part, probe in self.probes.items():
            fitted = fit_linear_probe(feats[part], labels, self.hparams.num_classes,
                                      self.hparams.probe_weight_decay, self.hparams.probe_max_iter)
            probe.load_state_dict(fitted.to(self.device).state_dict())
        self.train(was_training)

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.fit_probes()

    # -- metrics per part --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        # one metric list per (stage, part); the primary part's are the base's val/test metrics
        self.part_metrics = nn.ModuleDict()
        for prefix, domains, primary in (("val", self.val_domains, self.val_metrics),
                                         ("test", self.test_domains, self.test_metrics)):
            for part in self.probes:
                self.part_metrics[f"{prefix}_{part}"] = primary if part == self.probe_part else \
                    nn.ModuleList([self.make_metric(d, prefix) for d in domains])

    def _probe_step(self, prefix: str, batch, dataloader_idx: int) -> None:
        x, y, *_ = batch
        reps = self.representations(x)
        for part, probe in self.probes.items():
            self.part_metrics[f"{prefix}_{part}"][dataloader_idx].update(probe(reps[part]), y)

    def _part_epoch_end(self, prefix: str, domains: list[str]) -> None:
        for part in self.probes:  # the primary part is logged by the base, without a suffix
            if part != self.probe_part:
                self._eval_epoch_end(prefix, self.part_metrics[f"{prefix}_{part}"], domains, suffix=f"_{part}")

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._probe_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self._part_epoch_end("val", self.val_domains)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._probe_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self):
        super().on_test_epoch_end()
        self._part_epoch_end("test", self.test_domains)


class SSL(SSLMethod):
    """One SSL base (``ssl``) trained on its own: the baseline every SSL table reports.

    Args:
        ssl: ``simclr``, ``moco``, ``byol``, ``dino``, ``simsiam`` or ``barlowtwins``.
        ssl_args: keyword arguments of the base (head sizes, temperature, MoCo ``version``, queue
            size, DINO ``out_dim``/``n_local_views``, ``momentum``, ...), see each class above.
        (everything else: :class:`SSLMethod`)
    """

    def __init__(self, ssl: str = "simclr", ssl_args: dict[str, Any] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.objective = build_objective(ssl, self.ssl_input_dim(self.backbone.num_features), ssl_args)
        if self.objective.momentum is not None:
            self.momentum_backbone = _frozen_copy(self.backbone)
        self.build_probes()

    def ssl_input_dim(self, width: int) -> int:
        """Width of what the SSL heads see (DDM: the invariant part)."""
        return width

    def ssl_input(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def train_views(self, image_size: int):
        return PILInput(self.objective.transform(image_size))

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base loss, online representations of every view)."""
        h = self.encode_views(views)
        h_m = None
        if self.objective.momentum is not None:
            with torch.no_grad():
                h_m = [self.ssl_input(v) for v in
                       self.encode_views(views[:self.objective.teacher_views], self.momentum_backbone)]
        loss = self.objective.loss([self.ssl_input(v) for v in h], h_m, self.current_epoch)
        return loss, h

    def training_losses(self, x, y, domain):
        loss, _ = self.ssl_loss(list(x))
        return {"loss": loss}

    def on_after_backward(self) -> None:
        self.objective.after_backward(self.current_epoch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.objective.momentum is None:
            return
        # global_step already counts this step: the schedule is indexed from 0 (m = start at the first step)
        m = cosine_schedule(self.global_step - 1, max(1, self.trainer.estimated_stepping_batches),
                            self.objective.momentum, 1.0)
        update_momentum(self.backbone, self.momentum_backbone, m)
        self.objective.momentum_update(m)


__all__ = ["OBJECTIVES", "SSL", "SSLMethod", "SSLObjective", "build_objective"]
