import json

import pyro
import pytest
import torch
from hostile import rehash, safetensors_bytes, safetensors_parts

import pyrovae
from pyrovae import CheckpointError
from pyrovae.checkpoint import CONFIG, WEIGHTS, load_weights, save_weights
from pyrovae.errors import WriteError


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
        with pytest.raises(CheckpointError, match="model.safetensors does not match its hash"):
            pyrovae.load_run(tmp_path)
        rehash(tmp_path, WEIGHTS)  # as whoever handed the run over could
        with pytest.raises(CheckpointError, match="pickle.*never unpickles.*Refused"):
            pyrovae.load_run(tmp_path)
        with pytest.raises(CheckpointError, match="pickle.*never unpickles.*Refused"):
            load_weights(torch.nn.Linear(2, 2), tmp_path / WEIGHTS)
        assert not marker.exists()


def test_edited_header_or_data_is_refused(tmp_path):
    # a dtype edited in the header (F32 -> I32 was scored, exit 0), a flipped data byte with the
    # header's own checksum removed: refused by the manifest's hash, and re-signed by the dtypes
    _trained_run(tmp_path)
    header, data = safetensors_parts(tmp_path / WEIGHTS)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I32"
    (tmp_path / WEIGHTS).write_bytes(safetensors_bytes(header, data))
    with pytest.raises(CheckpointError, match="does not match its hash in manifest.json"):
        pyrovae.load_run(tmp_path)
    rehash(tmp_path, WEIGHTS)
    with pytest.raises(
        CheckpointError, match=f"{name} is torch.int32, the model's is torch.float32"
    ):
        pyrovae.load_run(tmp_path)
    header[name]["dtype"] = "F32"
    del header["__metadata__"]["sha256"]
    flipped = bytes([data[0] ^ 1]) + data[1:]
    (tmp_path / WEIGHTS).write_bytes(safetensors_bytes(header, flipped))
    with pytest.raises(CheckpointError, match="does not match its hash in manifest.json"):
        pyrovae.load_run(tmp_path)
    rehash(tmp_path, WEIGHTS)
    with pytest.raises(CheckpointError, match="carries no checksum of its data in its header"):
        pyrovae.load_run(tmp_path)


def test_safetensors_that_starts_like_a_pickle_loads(tmp_path):
    # a header of 128 + 256 n bytes makes the file's first byte 0x80, a pickle's first byte
    module, path = torch.nn.Linear(3, 2), tmp_path / "w.safetensors"
    for pad in range(512):
        save_weights(module, path, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    loaded = load_weights(torch.nn.Linear(3, 2), path)
    assert torch.equal(loaded.weight, module.weight) and torch.equal(loaded.bias, module.bias)


def test_corrupt_checkpoint(tmp_path):
    _trained_run(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x09\x00\x00\x00\x00\x00\x00\x00{not json")
    rehash(tmp_path, WEIGHTS)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        pyrovae.load_run(tmp_path)


def test_truncated_checkpoint(tmp_path):
    _trained_run(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    rehash(tmp_path, WEIGHTS)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        pyrovae.load_run(tmp_path)
    # cut inside a header of 128 + 256 n bytes (first byte 0x80): truncated, not "a pickle"
    module, path = torch.nn.Linear(3, 2), tmp_path / "w.safetensors"
    for pad in range(512):
        save_weights(module, path, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is truncated: its header alone should take"):
        load_weights(module, path)


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
    with pytest.raises(CheckpointError, match="model.safetensors is missing, though manifest"):
        pyrovae.load_run(tmp_path)
    (tmp_path / CONFIG).write_text("{ broken")
    rehash(tmp_path, CONFIG)
    with pytest.raises(CheckpointError, match="config.json is not readable JSON"):
        pyrovae.load_run(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"prior": "nonsense"}))
    rehash(tmp_path, CONFIG)
    with pytest.raises(CheckpointError, match="unknown prior 'nonsense'"):
        pyrovae.load_run(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    # A failure while writing leaves the previous checkpoint in place.
    vae, _, _ = _trained_run(tmp_path)
    good = (tmp_path / WEIGHTS).read_bytes()

    def broken(tmp, data):
        tmp.write_bytes(data[:100])  # a part written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pyrovae.rundir._write", broken)
    with pytest.raises(WriteError, match=r"cannot write .*model.safetensors: No space left"):
        save_weights(vae, tmp_path / WEIGHTS)
    assert (tmp_path / WEIGHTS).read_bytes() == good
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [CONFIG, "manifest.json", WEIGHTS]  # no temporary left


def test_training_state_round_trip_and_refusals(tmp_path):
    from pyrovae.checkpoint import LAST, STATE, load_state, save_state
    from pyrovae.training import TrainState

    vae, config, _ = _trained_run(tmp_path)
    state = TrainState()
    with pytest.raises(ValueError, match="no optimizer state yet"):
        save_state(tmp_path, vae, state)
    pyrovae.fit(vae.model, vae.guide, _digits_train(), epochs=1, progress=False, state=state)
    save_state(tmp_path, vae, state, extra={"note": [1, 2]})
    assert torch.equal(state.rng, torch.get_rng_state())  # the generator as at the save
    fresh = pyrovae.build_vae(config)
    loaded, extra = load_state(tmp_path, fresh)
    assert extra == {"note": [1, 2]} and loaded.epoch == 1
    assert torch.equal(loaded.rng, state.rng) and loaded.cuda_rng is None
    for a, b in zip(vae.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for i, moments in state.optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, loaded.optimizer["state"][i][key]), (i, key)
    assert loaded.optimizer["param_groups"][0]["lr"] == state.optimizer["param_groups"][0]["lr"]

    # weights and state of different epochs (a save cut short between the two files)
    state.epoch = 2
    save_state(tmp_path, vae, state)
    save_weights(vae, tmp_path / LAST, {"epoch": "1"})
    with pytest.raises(CheckpointError, match="last.safetensors does not match its hash"):
        load_state(tmp_path, fresh)
    rehash(tmp_path, LAST)
    with pytest.raises(CheckpointError, match="is from epoch 1 but state.safetensors from epoch 2"):
        load_state(tmp_path, fresh)
    torch.save({"x": 1}, tmp_path / STATE)  # a pickle in its place is refused, never loaded
    rehash(tmp_path, STATE)
    with pytest.raises(CheckpointError, match="pickle"):
        load_state(tmp_path, fresh)
    (tmp_path / STATE).write_bytes(b"\x00" * 20)
    rehash(tmp_path, STATE)
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_state(tmp_path, fresh)


def test_non_finite_optimizer_moments_are_refused(tmp_path):
    # NaN Adam moments were blamed on "non-finite loss at epoch N" once training resumed
    from pyrovae.checkpoint import STATE, load_state, save_state
    from pyrovae.training import TrainState

    vae, config, _ = _trained_run(tmp_path)
    state = TrainState()
    pyrovae.fit(vae.model, vae.guide, _digits_train(), epochs=1, progress=False, state=state)
    key = next(iter(state.optimizer["state"][0]))
    state.optimizer["state"][0][key] = torch.full_like(state.optimizer["state"][0][key], torch.nan)
    save_state(tmp_path, vae, state)
    with pytest.raises(CheckpointError, match=f"non-finite optimizer moments .optimizer.0.{key}"):
        load_state(tmp_path, pyrovae.build_vae(config))
    assert (tmp_path / STATE).is_file()


def _digits_train():
    return pyrovae.data.load("digits", "train", binarize="threshold")
