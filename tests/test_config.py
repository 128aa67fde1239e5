import json

import pytest
import torch

from pyrovae import CheckpointError, Config, build_vae
from pyrovae.checkpoint import load_config
from pyrovae.rundir import commit


def test_round_trip_through_json():
    config = Config(x_shape=(1, 8, 8), hidden=(32, 16), patience=3, data_dir="/d")
    assert Config.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize("values, match", [
    ([], "a config is a JSON object of settings, not list"),
    ({"z_dim": 8.0}, "z_dim must be an integer, got 8.0"),
    ({"z_dim": 1e12}, "z_dim must be an integer"),
    ({"z_dim": True}, "z_dim must be an integer, got True"),
    ({"z_dim": 10**12}, "z_dim must be <= 1048576"),
    ({"x_shape": [-1, 8, 8]}, "x_shape must be 1 to 3 positive sizes"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"allow_non_binary": "no"}, "allow_non_binary must be true or false, got 'no'"),
    ({"hidden": [256.7]}, "hidden must be an integer, got 256.7"),
    ({"hidden": 256}, "hidden must be a list of integers"),
    ({"lr": "0.1"}, "lr must be a number"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"patience": None, "data_dir": 3}, "data_dir must be a string"),
    ({"valid_fraction": 1.5}, "valid_fraction must be in [0, 1)"),
    ({"frobs": 1}, "unknown config keys: frobs"),
])  # fmt: skip
def test_config_values_are_type_and_range_checked_naming_key_and_file(tmp_path, values, match):
    commit(tmp_path, {"config.json": json.dumps(values).encode()})  # a run's, verified
    with pytest.raises(CheckpointError, match="config.json is corrupt: ") as info:
        load_config(tmp_path)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_the_config_seed_fixes_the_initial_weights():
    config = Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=2, seed=3)
    torch.manual_seed(123)  # whatever the global generator holds before
    a = build_vae(config).state_dict()
    torch.manual_seed(456)
    b = build_vae(config).state_dict()
    c = build_vae(Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=2, seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_each_fields_choices_are_its_registrys_keys():
    from dataclasses import fields

    from pyrovae import data, guides, likelihoods, nets, objectives, priors
    from pyrovae.config import MODELS

    declared = {f.name: f.metadata["setting"].choices for f in fields(Config) if f.metadata}
    registries = {"dataset": data.DATASETS, "net": nets.NETS, "activation": nets.ACTIVATIONS,
                  "model": MODELS, "prior": priors.PRIORS, "guide": guides.GUIDES,
                  "likelihood": likelihoods.LIKELIHOODS, "loss": objectives.LOSSES}  # fmt: skip
    for name, registry in registries.items():
        assert declared[name] == tuple(registry), name
    assert declared["binarize"] == ("auto", *data.BINARIZE)


def _outside(setting, integer: bool) -> list:
    # values just outside a Setting's choices and bounds
    step = 1 if integer else 0.5
    values = ["no-such-name"] if setting.choices else []
    if setting.low is not None:
        values.append(setting.low if setting.low_open else setting.low - step)
    if setting.high is not None:
        values.append(setting.high if setting.high_open else setting.high + step)
    return values


def test_validate_refuses_what_each_fields_setting_declares_naming_the_field():
    from dataclasses import fields, replace

    Config().validate()  # the defaults are inside every declaration
    checked = 0
    for f in fields(Config):
        if not f.metadata:
            continue
        integer = "int" in f.type
        for value in _outside(f.metadata["setting"], integer):
            value = (value,) if f.type.startswith("tuple") else value
            with pytest.raises(ValueError) as info:
                replace(Config(), **{f.name: value}).validate()
            message = str(info.value)
            assert message.startswith((f.name, f"unknown {f.name} ")), message
            assert "\n" not in message
            checked += 1
    assert checked >= 40  # every choice and bound declared today was tried


def test_config_loads_without_torch_and_builds_with_it():
    import subprocess
    import sys

    code = ("import sys; from pyrovae.config import Config, build_vae; Config().validate(); "
            "print(sorted(m for m in ('torch', 'pyro') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert type(build_vae(Config(x_shape=(1, 8, 8), hidden=(8,), z_dim=2))).__name__ == "VAE"
