"""DomainBed's hyperparameter registry for the baselines: a default and a random-search distribution
per hyperparameter, by method and dataset, each keyed to the config argument it sets.

Follows ``domainbed/hparams_registry.py`` (``_hparams``, ``default_hparams``, ``random_hparams``):
the same names, defaults and distributions, and the same seeding: every hyperparameter draws from its
own ``numpy.random.RandomState(seed_hash(seed, name))`` (``seed_hash``: DomainBed's md5 of the
arguments' ``str``), so ``random_hparams(m, d, s)`` gives DomainBed's values for the same seed, and a
hyperparameter's value does not depend on which others a method has. Small-image datasets
(RotatedMNIST, ColoredMNIST) get DomainBed's small-image learning rates and batch sizes.

Each entry also knows its W&B distribution (:func:`sweep_parameters`, written into
``experiments/sweeps/pacs_<method>.yaml``; W&B's ``q_log_uniform_values`` rounds where DomainBed
truncates with ``int``, the only difference). MixStyle is not in DomainBed: its defaults are the
official release's (p 0.5, alpha 0.1) and its search the release's registered variants
(p and alpha in {0.1, ..., 0.7}).

    default_hparams("CORAL")            -> {"model.optimizer.init_args.lr": 5e-05, ..., "model.mmd_gamma": 1.0}
    random_hparams("CORAL", "PACS", 3)  -> the same keys, DomainBed's random draw for seed 3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dg_lightning.core.errors import ConfigError
from dg_lightning.core.seeding import seed_hash

SMALL_IMAGES = ("Debug28", "RotatedMNIST", "ColoredMNIST")
METHODS = ("ERM", "CORAL", "MMD", "DANN", "IRM", "VREx", "GroupDRO", "Mixup", "SagNet", "Fish", "MixStyle")

LR = "model.optimizer.init_args.lr"
WEIGHT_DECAY = "model.optimizer.init_args.weight_decay"


@dataclass(frozen=True)
class LogUniform:
    """``base ** U(lo, hi)``; ``integer``: truncated to int (DomainBed's ``int(2**r.uniform(3, 5.5))``)."""

    lo: float
    hi: float
    base: float = 10.0
    integer: bool = False

    def sample(self, r: np.random.RandomState):
        v = self.base ** r.uniform(self.lo, self.hi)
        return int(v) if self.integer else float(v)

    def wandb(self) -> dict:
        lo, hi = self.base ** self.lo, self.base ** self.hi
        if self.integer:
            return {"distribution": "q_log_uniform_values", "min": int(lo), "max": int(hi), "q": 1}
        return {"distribution": "log_uniform_values", "min": float(f"{lo:.5g}"), "max": float(f"{hi:.5g}")}


@dataclass(frozen=True)
class Choice:
    """One of ``values``, uniformly (``r.choice``)."""

    values: tuple

    def sample(self, r: np.random.RandomState):
        return r.choice(self.values).item()

    def wandb(self) -> dict:
        return {"values": list(self.values)}


@dataclass(frozen=True)
class Fixed:
    """Not searched (DomainBed's ``lambda r: 0.``)."""

    value: Any

    def sample(self, r: np.random.RandomState):
        return self.value

    def wandb(self) -> dict:
        return {"value": self.value}


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: DomainBed's ``name``, the config ``key`` it sets, its default and search."""

    name: str
    key: str
    default: Any
    search: LogUniform | Choice | Fixed


def registry(method: str, dataset: str = "PACS") -> list[HParam]:
    """The hyperparameters of ``method`` on ``dataset`` (DomainBed's ``_hparams``)."""
    if method not in METHODS:
        raise ConfigError(f"no hyperparameters registered for {method!r}; registered: {', '.join(METHODS)}")
    small = dataset in SMALL_IMAGES
    h = [HParam("resnet_dropout", "model.dropout", 0.0, Choice((0.0, 0.1, 0.5)))]
    if method == "DANN":
        h += [
            HParam("lambda", "model.dann_lambda", 1.0, LogUniform(-2, 2)),
            HParam("weight_decay_d", "model.weight_decay_d", 0.0, LogUniform(-6, -2)),
            HParam("d_steps_per_g_step", "model.d_steps_per_g_step", 1, LogUniform(0, 3, base=2, integer=True)),
            HParam("grad_penalty", "model.grad_penalty", 0.0, LogUniform(-2, 1)),
            HParam("beta1", "model.beta1", 0.5, Choice((0.0, 0.5))),
            HParam("mlp_width", "model.mlp_width", 256, LogUniform(6, 10, base=2, integer=True)),
            HParam("mlp_depth", "model.mlp_depth", 3, Choice((3, 4, 5))),
            HParam("mlp_dropout", "model.mlp_dropout", 0.0, Choice((0.0, 0.1, 0.5))),
            HParam("lr_g", "model.lr_g", 1e-3 if small else 5e-5, LogUniform(-4.5, -2.5) if small else LogUniform(-5, -3.5)),
            HParam("lr_d", "model.lr_d", 1e-3 if small else 5e-5, LogUniform(-4.5, -2.5) if small else LogUniform(-5, -3.5)),
            HParam("weight_decay_g", "model.weight_decay_g", 0.0, Fixed(0.0) if small else LogUniform(-6, -2)),
        ]
    elif method == "Fish":
        h.append(HParam("meta_lr", "model.meta_lr", 0.5, Choice((0.05, 0.1, 0.5))))
    elif method == "SagNet":
        h.append(HParam("sag_w_adv", "model.sag_w_adv", 0.1, LogUniform(-2, 1)))
    elif method == "IRM":
        h += [HParam("irm_lambda", "model.irm_lambda", 1e2, LogUniform(-1, 5)),
              HParam("irm_penalty_anneal_iters", "model.irm_penalty_anneal_iters", 500, LogUniform(0, 4, integer=True))]
    elif method == "Mixup":
        h.append(HParam("mixup_alpha", "model.mixup_alpha", 0.2, LogUniform(-1, 1)))
    elif method == "GroupDRO":
        h.append(HParam("groupdro_eta", "model.groupdro_eta", 1e-2, LogUniform(-3, -1)))
    elif method in ("MMD", "CORAL"):
        h.append(HParam("mmd_gamma", "model.mmd_gamma", 1.0, LogUniform(-1, 1)))
    elif method == "VREx":
        h += [HParam("vrex_lambda", "model.vrex_lambda", 1e1, LogUniform(-1, 5)),
              HParam("vrex_penalty_anneal_iters", "model.vrex_penalty_anneal_iters", 500, LogUniform(0, 4, integer=True))]
    elif method == "MixStyle":  # not in DomainBed: the official release's defaults and variants
        grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
        h += [HParam("mixstyle_p", "model.mixstyle_p", 0.5, Choice(grid)),
              HParam("mixstyle_alpha", "model.mixstyle_alpha", 0.1, Choice(grid))]
    if method != "DANN":  # DANN's optimisers have their own lr_g/lr_d and weight decays
        h.append(HParam("lr", LR, 1e-3 if small else 5e-5, LogUniform(-4.5, -2.5) if small else LogUniform(-5, -3.5)))
        h.append(HParam("weight_decay", WEIGHT_DECAY, 0.0, Fixed(0.0) if small else LogUniform(-6, -2)))
    if small:
        batch = HParam("batch_size", "data.batch_size", 64, LogUniform(3, 9, base=2, integer=True))
    elif dataset == "DomainNet":
        batch = HParam("batch_size", "data.batch_size", 32, LogUniform(3, 5, base=2, integer=True))
    else:
        batch = HParam("batch_size", "data.batch_size", 32, LogUniform(3, 5.5, base=2, integer=True))
    h.append(batch)
    return h


def default_hparams(method: str, dataset: str = "PACS") -> dict[str, Any]:
    """``{config key: default}`` (DomainBed's ``default_hparams``)."""
    return {p.key: p.default for p in registry(method, dataset)}


def random_hparams(method: str, dataset: str, seed: int) -> dict[str, Any]:
    """``{config key: random value}``: DomainBed's ``random_hparams(method, dataset, seed)``."""
    return {p.key: p.search.sample(np.random.RandomState(seed_hash(seed, p.name))) for p in registry(method, dataset)}


def sweep_parameters(method: str, dataset: str = "PACS") -> dict[str, dict]:
    """The W&B ``parameters`` of the method's random search (the sweep YAML's, less domain and seed)."""
    return {p.key: p.search.wandb() for p in registry(method, dataset) if not isinstance(p.search, Fixed)}


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``--key=value`` command-line overrides for ``dg-lightning fit``."""
    return [f"--{k}={v}" for k, v in values.items()]
