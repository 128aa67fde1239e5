import json

import pyro
import pytest
import torch

import pyrovae
from pyrovae import CheckpointError
from pyrovae.checkpoint import CONFIG, WEIGHTS, load_weights, save_weights


def _trained_run(tmp_path):
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    config = pyrovae.Config(x_shape=data.x_shape, hidden=(32,), z_dim=3, binarize="threshold")
    vae = pyrovae.build_vae(config)
    pyrovae.fit(vae.model, vae.guide, data, epochs=2, progress=False)
    pyrovae.save_run(tmp_path, vae, config)
    return vae, config, data.images[:30]


def test_round_trip_gives_the_same_log_likelihood(tmp_path):
    vae, config, x = _trained_run(tmp_path)
    loaded, loaded_config = pyrovae.load_run(tmp_path)
    assert loaded_config == config
    for (k, a), (k2, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    pyro.set_rng_seed(11)
    before = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=100)
    pyro.set_rng_seed(11)
    after = pyrovae.log_likelihood(loaded.model, loaded.guide, x, num_samples=100)
    assert torch.equal(before, after)


def test_pickle_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _trained_run(tmp_path)
    for save in (lambda p: torch.save({"w": Payload()}, p),
                 lambda p: p.write_bytes(__import__("pickle").dumps(Payload()))):  # fmt: skip
        save(tmp_path / WEIGHTS)
        with pytest.raises(CheckpointError, match="pickle.*never unpickles.*Refused"):
            pyrovae.load_run(tmp_path)
        assert not marker.exists()


def test_corrupt_checkpoint(tmp_path):
    _trained_run(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        pyrovae.load_run(tmp_path)


def test_truncated_checkpoint(tmp_path):
    _trained_run(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        pyrovae.load_run(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    vae, config, _ = _trained_run(tmp_path)
    other = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weights(other, tmp_path / WEIGHTS)


def test_missing_and_corrupt_run_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pyrovae.load_run(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        pyrovae.load_run(tmp_path)
    _trained_run(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        pyrovae.load_run(tmp_path)
    (tmp_path / CONFIG).write_text("{ broken")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        pyrovae.load_run(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"prior": "nonsense"}))
    with pytest.raises(CheckpointError, match="unknown prior 'nonsense'"):
        pyrovae.load_run(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    # A failure while writing leaves the previous checkpoint in place.
    vae, _, _ = _trained_run(tmp_path)
    good = (tmp_path / WEIGHTS).read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pyrovae.checkpoint.save_model", broken)
    with pytest.raises(OSError):
        save_weights(vae, tmp_path / WEIGHTS)
    assert (tmp_path / WEIGHTS).read_bytes() == good
