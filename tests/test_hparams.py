"""The baselines' hyperparameter registry: DomainBed's defaults, DomainBed's seeded random draws, and
the W&B sweep YAMLs written from it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from dg_lightning.methods.hparams import METHODS, default_hparams, random_hparams, sweep_parameters
from tests.conftest import ROOT

LR, WD, BS, DROP = "model.optimizer.init_args.lr", "model.optimizer.init_args.weight_decay", "data.batch_size", "model.dropout"


def test_defaults_are_domainbeds():
    base = {LR: 5e-5, WD: 0.0, BS: 32, DROP: 0.0}
    assert default_hparams("ERM") == base
    assert default_hparams("CORAL") == {**base, "model.mmd_gamma": 1.0}
    assert default_hparams("MMD") == {**base, "model.mmd_gamma": 1.0}
    assert default_hparams("IRM") == {**base, "model.irm_lambda": 100.0, "model.irm_penalty_anneal_iters": 500}
    assert default_hparams("VREx") == {**base, "model.vrex_lambda": 10.0, "model.vrex_penalty_anneal_iters": 500}
    assert default_hparams("GroupDRO") == {**base, "model.groupdro_eta": 0.01}
    assert default_hparams("Mixup") == {**base, "model.mixup_alpha": 0.2}
    assert default_hparams("SagNet") == {**base, "model.sag_w_adv": 0.1}
    assert default_hparams("Fish") == {**base, "model.meta_lr": 0.5}
    assert default_hparams("MixStyle") == {**base, "model.mixstyle_p": 0.5, "model.mixstyle_alpha": 0.1}
    assert default_hparams("DANN") == {
        BS: 32, DROP: 0.0, "model.dann_lambda": 1.0, "model.weight_decay_d": 0.0, "model.d_steps_per_g_step": 1,
        "model.grad_penalty": 0.0, "model.beta1": 0.5, "model.mlp_width": 256, "model.mlp_depth": 3,
        "model.mlp_dropout": 0.0, "model.lr_g": 5e-5, "model.lr_d": 5e-5, "model.weight_decay_g": 0.0}
    small = default_hparams("ERM", "ColoredMNIST")
    assert small[LR] == 1e-3 and small[BS] == 64


def rs(seed, name):
    """DomainBed: RandomState(misc.seed_hash(random_seed, name)), seed_hash = md5 of str(args) mod 2^31."""
    return np.random.RandomState(int(hashlib.md5(str((seed, name)).encode()).hexdigest(), 16) % 2**31)


@pytest.mark.parametrize("seed", [0, 7, 123])
def test_random_draws_are_domainbeds(seed):
    got = random_hparams("CORAL", "PACS", seed)
    assert got[LR] == 10 ** rs(seed, "lr").uniform(-5, -3.5)
    assert got[WD] == 10 ** rs(seed, "weight_decay").uniform(-6, -2)
    assert got[BS] == int(2 ** rs(seed, "batch_size").uniform(3, 5.5))
    assert got[DROP] == rs(seed, "resnet_dropout").choice([0.0, 0.1, 0.5])
    assert got["model.mmd_gamma"] == 10 ** rs(seed, "mmd_gamma").uniform(-1, 1)
    dann = random_hparams("DANN", "PACS", seed)
    assert dann["model.d_steps_per_g_step"] == int(2 ** rs(seed, "d_steps_per_g_step").uniform(0, 3))
    assert dann["model.mlp_depth"] == int(rs(seed, "mlp_depth").choice([3, 4, 5]))
    assert dann["model.dann_lambda"] == 10 ** rs(seed, "lambda").uniform(-2, 2)
    assert dann[BS] == got[BS]  # one draw per name, whatever the method
    irm = random_hparams("IRM", "PACS", seed)
    assert irm["model.irm_penalty_anneal_iters"] == int(10 ** rs(seed, "irm_penalty_anneal_iters").uniform(0, 4))
    small = random_hparams("ERM", "RotatedMNIST", seed)
    assert small[LR] == 10 ** rs(seed, "lr").uniform(-4.5, -2.5) and small[WD] == 0.0
    assert small[BS] == int(2 ** rs(seed, "batch_size").uniform(3, 9))
    assert random_hparams("CORAL", "PACS", seed) == got and random_hparams("CORAL", "PACS", seed + 1) != got


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="no hyperparameters registered for 'Nope'"):
        default_hparams("Nope")


@pytest.mark.parametrize("method", METHODS)
def test_sweep_yaml_is_the_registrys_search(method):
    path = ROOT / "experiments" / "sweeps" / f"pacs_{method.lower()}.yaml"
    config = yaml.safe_load(path.read_text())
    params = {k: v for k, v in config["parameters"].items() if k not in ("data.test_domains", "seed_everything")}
    want = sweep_parameters(method)
    assert set(params) == set(want)
    for key, spec in want.items():
        got = params[key]
        assert set(got) == set(spec), key
        for field, value in spec.items():
            if isinstance(value, float):
                assert got[field] == pytest.approx(value, rel=1e-4), key
            else:
                assert got[field] == value, key
    assert config["command"][config["command"].index("--config") + 1] == f"experiments/pacs/{method.lower()}.yaml"
    paper = yaml.safe_load((ROOT / "experiments" / "pacs" / f"{method.lower()}.yaml").read_text())
    assert paper["model"]["class_path"] == f"dg_lightning.methods.{method}"
    for key, value in default_hparams(method).items():  # the paper-scale YAML sets DomainBed's defaults
        node = paper
        for k in key.split("."):
            node = node[k] if k in node else node["init_args"][k]
        assert node == value, key
