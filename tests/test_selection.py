"""Model selection: early stopping counts only post-warm-up epochs without improvement, keeps the
best weights, and scores the true (unscaled) validation ELBO."""

import pyro
import pytest
import torch

import pyrovae
from pyrovae.selection import EarlyStopping


class _Scripted(EarlyStopping):
    # validation ELBOs read from a list; each epoch also changes the model's weights
    def __init__(self, values, **kw):
        self.values = iter(values)
        vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(4,), z_dim=2))
        super().__init__(vae, torch.zeros(2, 1, 8, 8), **kw)

    def score(self):
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)
        return next(self.values)


def _run(stopper, epochs):
    records = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch}
        stop = stopper(record)
        records.append(record)
        if stop:
            break
    return records


def test_patience_best_epoch_and_restore():
    saved = []
    values = [-90.0, -88.0, -89.0, -87.5, -88.0, -88.1, -87.9, -86.0]
    stopper = _Scripted(values, patience=3, on_improve=lambda r: saved.append(r["epoch"]))
    records = _run(stopper, len(values))
    assert [r["val_elbo"] for r in records] == values[:7]  # stops after 3 epochs without gain
    assert stopper.stopped_epoch == 7 and stopper.best_epoch == 4 and stopper.best_value == -87.5
    assert saved == [1, 2, 4]  # a checkpoint at every new best
    first = next(iter(stopper.model.parameters())).detach()
    assert float(
        first.flatten()[0] - stopper.best_state[_name(stopper)].flatten()[0]
    ) == pytest.approx(3.0)
    stopper.restore()
    assert torch.equal(first, stopper.best_state[_name(stopper)])


def _name(stopper):
    return next(iter(dict(stopper.model.named_parameters())))


def test_warmup_epochs_do_not_count_and_nan_never_improves():
    values = [-90.0, -91.0, -92.0, -93.0, -94.0, -95.0, float("nan")]
    stopper = _Scripted(values, patience=2, warmup=4)
    records = _run(stopper, len(values))
    assert len(records) == 6 and stopper.best_epoch == 1  # epochs 5, 6 are the 2 bad ones
    stopper = _Scripted([float("nan"), -5.0, float("nan")], patience=None)
    assert len(_run(stopper, 3)) == 3 and stopper.best_epoch == 2 and stopper.stopped_epoch is None
    with pytest.raises(ValueError, match="patience must be a positive number of epochs"):
        _Scripted([], patience=0)


def test_validation_elbo_is_unscaled():
    # the score is pyrovae.elbo on the validation data, whatever β the model trains with
    val = pyrovae.data.load("digits", "valid", binarize="threshold").images[:50]
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=2))
    stopper = EarlyStopping(vae, val)
    vae.beta = 0.1
    pyro.set_rng_seed(0)
    scaled = stopper.score()
    vae.beta = 1.0
    pyro.set_rng_seed(0)
    assert (
        scaled
        == stopper.score()
        == pytest.approx(float(pyrovae.elbo(vae.model, vae.guide, val).mean()), abs=1.0)
    )


def test_state_dict_round_trip_continues_the_count():
    # stopped after epoch 4 (two epochs without gain) and continued: as one uninterrupted run
    values = [-90.0, -88.0, -89.0, -89.5, -87.0, -88.2, -90.0, -89.0]
    whole = _Scripted(values, patience=3)
    _run(whole, len(values))
    first = _Scripted(values[:4], patience=3)
    _run(first, 4)
    assert first.state_dict() == {"best_value": -88.0, "best_epoch": 2, "wait": 2,
                                  "stopped_epoch": None}  # fmt: skip
    rest = _Scripted(values[4:], patience=3)
    rest.load_state_dict(first.state_dict(), first.best_state)
    assert _run_from(rest, 5, 8) == 8 == whole.stopped_epoch  # epochs 6, 7, 8: no gain
    assert rest.state_dict() == whole.state_dict()
    assert rest.state_dict()["best_epoch"] == 5


def _run_from(stopper, first, last):
    for epoch in range(first, last + 1):
        if stopper({"epoch": epoch}):
            return epoch
    return None
