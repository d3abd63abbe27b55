"""DomainBed's hyperparameter registry: each method's defaults and random-search distributions.

Follows ``domainbed/hparams_registry.py`` (Gulrajani & Lopez-Paz 2021). Every hyperparameter has a
default and a sampler; a random draw for ``seed`` gives each hyperparameter its *own*
``np.random.RandomState(seed_hash(seed, name))``, so a value depends only on (seed, name), never on
which other hyperparameters exist or in which order they are defined. A sweep's trial uses
``hparams_seed == 0`` for the defaults and otherwise ``random_hparams(algorithm, dataset,
seed_hash(hparams_seed, trial_seed))`` (``domainbed/scripts/train.py``). With the same names and
seeds, the values are DomainBed's.

Each hyperparameter also names the config key it sets (``target``, a LightningCLI argument such as
``model.optimizer.init_args.lr``); :func:`to_overrides` turns a draw into command-line overrides.
``target=None`` records a value without applying it (DomainBed draws ``resnet_dropout`` for the
MNIST benchmarks too, but its MNIST CNN has no dropout).

Extending it (one function per method, next to the others or in the method's module)::

    @register_hparams("CORAL", "MMD")
    def _coral(dataset: str) -> dict[str, HParam]:
        return {"mmd_gamma": HParam(1.0, lambda r: 10 ** r.uniform(-1, 1), "model.mmd_gamma")}

A method's entries are added to (and may replace) the common ones below (lr, weight_decay,
batch_size, resnet_dropout), as DomainBed's algorithm-specific blocks do (e.g. ARM's batch size).
Not carried over: DomainBed's constant switches (``data_augmentation``, ``resnet18``,
``class_balanced``, ``nonlinear_classifier``), which are config choices here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dg_lightning.core.seeding import seed_hash

#: DomainBed's 28 x 28 benchmarks, with their own learning rate, batch size and weight decay
SMALL_IMAGES = ("Debug28", "RotatedMNIST", "ColoredMNIST")


@dataclass(frozen=True)
class HParam:
    """A hyperparameter: its default, a sampler ``RandomState -> value`` and the config key it sets."""

    default: Any
    sample: Callable[[np.random.RandomState], Any]
    target: str | None = None


Space = dict[str, HParam]
_REGISTRY: dict[str, Callable[[str], Space]] = {}


def register_hparams(*algorithms: str):
    """Decorator: ``fn(dataset) -> {name: HParam}`` holds the hyperparameters of ``algorithms`` (method class
    names) on top of the common ones."""

    def wrap(fn: Callable[[str], Space]) -> Callable[[str], Space]:
        for a in algorithms:
            _REGISTRY[a] = fn
        return fn

    return wrap


def registered_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def common_hparams(dataset: str) -> Space:
    """The hyperparameters every method has: DomainBed's unconditional and dataset-dependent blocks."""
    small = dataset in SMALL_IMAGES
    space = {
        # DomainBed: dropout on the ResNet's features; the MNIST CNN has none (drawn, not applied)
        "resnet_dropout": HParam(0.0, lambda r: r.choice([0.0, 0.1, 0.5]), None if small else "model.dropout"),
        "lr": HParam(1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5)) if small
        else HParam(5e-5, lambda r: 10 ** r.uniform(-5, -3.5)),
        "weight_decay": HParam(0.0, lambda r: 0.0) if small else HParam(0.0, lambda r: 10 ** r.uniform(-6, -2)),
    }
    if small:
        space["batch_size"] = HParam(64, lambda r: int(2 ** r.uniform(3, 9)))
    elif dataset == "DomainNet":
        space["batch_size"] = HParam(32, lambda r: int(2 ** r.uniform(3, 5)))
    else:
        space["batch_size"] = HParam(32, lambda r: int(2 ** r.uniform(3, 5.5)))
    targets = {"lr": "model.optimizer.init_args.lr", "weight_decay": "model.optimizer.init_args.weight_decay",
               "batch_size": "data.batch_size"}
    return {k: HParam(h.default, h.sample, targets.get(k, h.target)) for k, h in space.items()}


@register_hparams("ERM")
def _erm(dataset: str) -> Space:
    """ERM has only the common hyperparameters."""
    return {}


def hparam_space(algorithm: str, dataset: str) -> Space:
    """Every hyperparameter of ``algorithm`` (a method class name) on ``dataset`` (a data module class name)."""
    if algorithm not in _REGISTRY:
        raise KeyError(f"no hyperparameter registry entry for {algorithm!r} (registered: {registered_algorithms()}): "
                       f"add one with @register_hparams({algorithm!r}) in dg_lightning/methods/hparams.py")
    return {**common_hparams(dataset), **_REGISTRY[algorithm](dataset)}


def _plain(value: Any) -> Any:
    """NumPy scalars as Python values (JSON- and command-line-friendly)."""
    return value.item() if isinstance(value, np.generic) else value


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    return {name: h.default for name, h in hparam_space(algorithm, dataset).items()}


def random_hparams(algorithm: str, dataset: str, seed: int) -> dict[str, Any]:
    """One random draw: each hyperparameter from its own ``RandomState(seed_hash(seed, name))``."""
    return {name: _plain(h.sample(np.random.RandomState(seed_hash(seed, name))))
            for name, h in hparam_space(algorithm, dataset).items()}


def trial_hparams(algorithm: str, dataset: str, hparams_seed: int, trial_seed: int) -> dict[str, Any]:
    """A sweep run's hyperparameters: the defaults for ``hparams_seed == 0``, else DomainBed's draw."""
    if hparams_seed == 0:
        return default_hparams(algorithm, dataset)
    return random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))


def format_value(value: Any) -> str:
    """A value as the command line's YAML reads it back with the same type (``1e-05`` would be a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return str(value)


def to_overrides(algorithm: str, dataset: str, values: dict[str, Any]) -> list[str]:
    """``--<target>=<value>`` for every hyperparameter that has a target."""
    space = hparam_space(algorithm, dataset)
    unknown = sorted(set(values) - set(space))
    if unknown:
        raise KeyError(f"{unknown} are not hyperparameters of {algorithm} on {dataset}: {sorted(space)}")
    return [f"--{space[k].target}={format_value(v)}" for k, v in values.items() if space[k].target]
