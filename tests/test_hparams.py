"""DomainBed's hyperparameter registry: defaults, seeded draws, overrides, extension."""

import hashlib

import numpy as np
import pytest
import yaml

from dg_lightning.methods import hparams as hp


def md5_seed(*args) -> int:
    return int(hashlib.md5(str(args).encode()).hexdigest(), 16) % 2**31


def test_erm_defaults_as_domainbed():
    assert hp.default_hparams("ERM", "ColoredMNIST") == {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0,
                                                         "resnet_dropout": 0.0}
    assert hp.default_hparams("ERM", "PACS") == {"lr": 5e-5, "batch_size": 32, "weight_decay": 0.0,
                                                 "resnet_dropout": 0.0}
    assert hp.trial_hparams("ERM", "RotatedMNIST", 0, 5) == hp.default_hparams("ERM", "RotatedMNIST")


def test_random_draw_is_domainbeds_seeding():
    """hparams_seed 3, trial 1: each value from RandomState(seed_hash(seed_hash(3, 1), name)), by hand."""
    seed = md5_seed(3, 1)

    def rs(name):
        return np.random.RandomState(md5_seed(seed, name))

    expected = {"lr": 10 ** rs("lr").uniform(-5, -3.5), "weight_decay": 10 ** rs("weight_decay").uniform(-6, -2),
                "batch_size": int(2 ** rs("batch_size").uniform(3, 5.5)),
                "resnet_dropout": float(rs("resnet_dropout").choice([0.0, 0.1, 0.5]))}
    assert hp.trial_hparams("ERM", "VLCS", 3, 1) == expected
    small = hp.trial_hparams("ERM", "ColoredMNIST", 3, 1)
    assert small["lr"] == 10 ** rs("lr").uniform(-4.5, -2.5) and small["weight_decay"] == 0.0
    assert small["batch_size"] == int(2 ** rs("batch_size").uniform(3, 9))


def test_draws_stay_in_domainbeds_ranges():
    for h in range(1, 40):
        small, big, dn = (hp.trial_hparams("ERM", d, h, 0) for d in ("RotatedMNIST", "OfficeHome", "DomainNet"))
        assert 10 ** -4.5 <= small["lr"] <= 10 ** -2.5 and 8 <= small["batch_size"] < 512
        assert 1e-5 <= big["lr"] <= 10 ** -3.5 and 1e-6 <= big["weight_decay"] <= 1e-2 and 8 <= big["batch_size"] < 46
        assert 8 <= dn["batch_size"] < 32 and big["resnet_dropout"] in (0.0, 0.1, 0.5)


def test_overrides_reach_the_config_keys_and_keep_types():
    values = {"lr": 1e-05, "weight_decay": 2.5e-06, "batch_size": 17, "resnet_dropout": 0.1}
    pacs = hp.to_overrides("ERM", "PACS", values)
    assert pacs == ["--model.optimizer.init_args.lr=1.0e-05", "--model.optimizer.init_args.weight_decay=2.5e-06",
                    "--data.batch_size=17", "--model.dropout=0.1"]
    for arg in pacs:  # YAML (the CLI's parser) reads them back as numbers
        assert isinstance(yaml.safe_load(arg.split("=", 1)[1]), (int, float))
    # DomainBed's MNIST CNN has no dropout: drawn and recorded, not applied
    assert not any("dropout" in a for a in hp.to_overrides("ERM", "ColoredMNIST", values))
    with pytest.raises(KeyError, match="not hyperparameters"):
        hp.to_overrides("ERM", "PACS", {"mmd_gamma": 1.0})


def test_unregistered_method_and_extension():
    with pytest.raises(KeyError, match=r"no hyperparameter registry entry for 'NewMethod'(.|\n)*register_hparams"):
        hp.hparam_space("NewMethod", "PACS")

    @hp.register_hparams("NewMethod")
    def _new(dataset):
        return {"gamma": hp.HParam(1.0, lambda r: 10 ** r.uniform(-1, 1), "model.gamma"),
                "batch_size": hp.HParam(8, lambda r: 8, "data.batch_size")}  # replaces the common one

    try:
        space = hp.hparam_space("NewMethod", "PACS")
        assert set(space) == {"lr", "weight_decay", "batch_size", "resnet_dropout", "gamma"}
        assert hp.default_hparams("NewMethod", "PACS")["batch_size"] == 8
        draw = hp.trial_hparams("NewMethod", "PACS", 2, 0)
        # adding a hyperparameter never changes the others' draws (one RandomState per name)
        assert {k: v for k, v in draw.items() if k not in ("gamma", "batch_size")} == \
            {k: v for k, v in hp.trial_hparams("ERM", "PACS", 2, 0).items() if k != "batch_size"}
        assert "--model.gamma=" + hp.format_value(draw["gamma"]) in hp.to_overrides("NewMethod", "PACS", draw)
    finally:
        hp._REGISTRY.pop("NewMethod")
