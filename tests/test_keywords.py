"""Keyword arguments for every training step (``step_kwargs``): the DMM's annealing factor."""

import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovae
from pyrovae.schedules import Clock, Ramp, Schedule
from pyrovae.training import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from pairs import CHAIN, Chain, chains  # noqa: E402

T, D, Z = CHAIN


def _data(n=96):
    return chains(n)


def _chain(seed=0):
    pyro.set_rng_seed(seed)
    return Chain()


def _train(chain, epochs, step_kwargs, state=None, fast=True, seed=0):
    trainer = Trainer(chain.model, chain.guide, _data(), batch_size=32, lr=0.01, seed=seed,
                      fast=fast, state=state, step_kwargs=step_kwargs)  # fmt: skip
    for _ in range(epochs - int(trainer.state.epoch)):
        trainer.epoch()
    return trainer


def _factors(trainer):
    return [r["step_kwargs"]["annealing_factor"] for r in trainer.history.records()]


# exact tier ---------------------------------------------------------------------------------


def test_ramp_is_the_dmm_examples_annealing_factor():
    # pyro/examples/dmm.py, its training loop's annealing factor, for every mini-batch
    epochs, n_mini, min_af = 3, 5, 0.2
    ramp = Ramp(min_af, 1.0, epochs=epochs)
    for epoch in range(epochs + 2):
        for which in range(n_mini):
            if epoch < epochs:
                expected = min_af + (1.0 - min_af) * (
                    float(which + epoch * n_mini + 1) / float(epochs * n_mini)
                )
            else:
                expected = 1.0
            assert ramp(Clock(epoch, which, n_mini)) == pytest.approx(expected, abs=1e-12)
    assert Ramp(0.5, 1.0, epochs=4)(Clock(1, 7, None)) == pytest.approx(0.75)  # per epoch
    assert Ramp(0.3, 1.0, epochs=0)(Clock(0, 0, 10)) == 1.0


def test_the_schedule_reaches_every_replayed_step_without_a_new_trace():
    # the captured loss takes the step's value as a graph input: recorded once, and the same
    # epochs as the eager loop (which runs the Python with each value)
    schedule = {"annealing_factor": Ramp(0.1, 1.0, epochs=2)}
    fast = _train(_chain(), 3, schedule)
    eager = _train(_chain(), 3, schedule, fast=False)
    plain = _train(_chain(), 3, None)
    assert fast.engine.name == "captured"
    assert len(fast.terms[0].step_loss._graphs) == 1  # one trace for 9 steps of 3 values each
    for a, b in zip(fast.history.records(), eager.history.records(), strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-5, abs=1e-5)
        assert a["step_kwargs"] == b["step_kwargs"]
    assert [r["step_kwargs"]["annealing_factor"] for r in fast.history.records()] == pytest.approx(
        [0.55, 1, 1]
    )
    # the values change the loss: the first epoch's differs from a run without them
    first, unscaled = fast.history.records()[0], plain.history.records()[0]
    assert abs(first["train_elbo"] - unscaled["train_elbo"]) > 0.1


def test_a_continued_run_feeds_the_same_values_bit_for_bit():
    from pyrovae.checkpoint import load_state, save_state

    schedule = {"annealing_factor": Ramp(0.2, 1.0, epochs=3)}
    straight = _chain()
    whole = _train(straight, 4, schedule)
    first = _chain()
    part = _train(first, 2, schedule)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, first, part.state)
        pyro.clear_param_store()
        resumed = _chain(seed=5)  # other weights, replaced by the saved ones
        state, _ = load_state(tmp, resumed)
    rest = _train(resumed, 4, schedule, state=state, seed=None)
    factors = [
        r["step_kwargs"]["annealing_factor"]
        for r in part.history.records() + rest.history.records()
    ]
    assert factors == [r["step_kwargs"]["annealing_factor"] for r in whole.history.records()]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_constants_are_passed_on_every_step_and_the_model_sees_them():
    # a function is a constant too (Pyro's AIR takes z_pres_prior_p, a function of the object's
    # step t); a Schedule is evaluated every step
    seen = []

    def model(x, annealing_factor=1.0, label="none", prior_p=None):
        seen.append((float(annealing_factor), label, prior_p(1)))  # the step's value
        pyro.module("net", net)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x[:, 0])

    def guide(x, annealing_factor=1.0, label="none", prior_p=None):
        pyro.module("net", net)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x[:, 0, :Z], 1.0).to_event(1))

    net = nn.Linear(Z, D)
    step_kwargs = {"label": "chorales", "annealing_factor": Ramp(0.5, 1.0, 1),
                   "prior_p": lambda t: 0.5**t}  # fmt: skip
    Trainer(model, guide, _data(), batch_size=32, fast=False, step_kwargs=step_kwargs).epoch()
    assert [s[1:] for s in seen] == [("chorales", 0.5)] * 3
    assert [float(s[0]) for s in seen] == pytest.approx([0.5 + 0.5 / 3 * k for k in (1, 2, 3)])


def test_the_lightning_engine_feeds_the_same_schedule():
    from pyrovae.lightning import EpochCallback, fit

    records = []
    chain = _chain()
    fit(chain.model, chain.guide, _data(), epochs=2, batch_size=32, lr=0.01,
        step_kwargs={"annealing_factor": Ramp(0.1, 1.0, epochs=2)}, accelerator="cpu", devices=1,
        enable_progress_bar=False, callbacks=[EpochCallback(records.append)])  # fmt: skip
    assert [r["step_kwargs"]["annealing_factor"] for r in records] == pytest.approx([0.55, 1.0])
    assert all(math.isfinite(r["train_elbo"]) for r in records)


def test_a_run_directory_writes_the_schedule_to_metrics_csv(tmp_path):
    import csv

    chain = _chain()
    pyrovae.fit(chain.model, chain.guide, _data(), epochs=2, batch_size=32, progress=False,
                run_dir=tmp_path / "run", step_kwargs={"annealing_factor": Ramp(0.2, 1.0, 2)},
                seed=0)  # fmt: skip
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["annealing_factor"]) for r in rows] == pytest.approx([0.6, 1.0])


# bad input: one line, before any step --------------------------------------------------------


@pytest.mark.parametrize(
    "step_kwargs, message",
    [
        (
            {"annealing_factr": 0.5},
            "the model Chain.model takes no keyword argument 'annealing_factr'",
        ),
        ({"annealing_factor": Ramp(0.2, 1.0, 2), "beta": 2.0}, "takes no keyword argument 'beta'"),
        ({"annealing factor": 0.5}, "'annealing factor' is not a keyword argument name"),
        ([("annealing_factor", 0.5)], "step_kwargs must be a dict"),
        ({"annealing_factor": Schedule(lambda c: math.nan)}, "must return a finite number"),
        ({"annealing_factor": Schedule(lambda c: "high")}, "must return a finite number"),
    ],
)
def test_bad_step_kwargs_are_one_line_before_any_step(step_kwargs, message):
    chain = _chain()
    with pytest.raises(ValueError, match=message) as e:
        Trainer(chain.model, chain.guide, _data(), step_kwargs=step_kwargs)
    assert "\n" not in str(e.value) and chain.calls == 0


def test_a_keyword_only_the_model_takes_names_the_guide():
    def model(x, annealing_factor=1.0):
        pass

    def guide(x):
        pass

    with pytest.raises(ValueError, match="the guide guide takes no keyword argument"):
        Trainer(model, guide, _data(), step_kwargs={"annealing_factor": 0.5})


def test_a_schedule_failing_mid_run_names_the_step():
    chain = _chain()
    schedule = {"annealing_factor": Schedule(lambda c: 1.0 if c.step < 2 else -math.inf)}
    trainer = Trainer(chain.model, chain.guide, _data(), batch_size=32, step_kwargs=schedule)
    with pytest.raises(ValueError, match="at epoch 1, step 3"):
        trainer.epoch()


def test_ramp_refuses_bad_arguments():
    with pytest.raises(ValueError, match="epochs must be a whole number"):
        Ramp(0.2, 1.0, epochs=-1)
    with pytest.raises(ValueError, match="start must be a finite number"):
        Ramp(math.nan)
    with pytest.raises(ValueError, match="Schedule wraps a function of the step's Clock"):
        Schedule(0.5)
    assert Schedule(lambda c: c.epoch + 0.5)(Clock(2, 0, 4)) == 2.5


def test_a_pair_file_brings_its_schedule_to_a_cli_run_and_its_resume(tmp_path):
    # pyrovae train --pair tests/pairs.py:annealed_chain --data chains.npz: the module's
    # step_kwargs attribute; resume continues the ramp where the run stopped
    import csv

    import numpy as np

    from pyrovae import cli

    np.savez(tmp_path / "chains.npz", x=chains().numpy())
    run = tmp_path / "run"
    args = ["--batch-size", "32", "--no-progress", "--seed", "0", "--epochs", "1"]
    spec, data = f"{HERE / 'pairs.py'}:annealed_chain", str(tmp_path / "chains.npz")
    assert cli.main(["train", "--out", str(run), "--pair", spec, "--data", data, *args]) == 0
    assert cli.main(["resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = -(-int(0.8 * 96) // 32)  # the training split's steps per epoch
    ramp = Ramp(0.2, 1.0, epochs=2)
    expected = [ramp(Clock(e, steps - 1, steps)) for e in range(3)]
    assert [float(r["annealing_factor"]) for r in rows] == pytest.approx(expected)


def test_the_same_mechanism_carries_the_built_in_vaes_beta():
    # the β of pyrovae's VAE, a keyword of its model and guide: a constant β by step_kwargs
    # trains as vae.beta does; a per-step ramp is replayed without a new trace
    def vae():
        cfg = pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=4, seed=3)
        return pyrovae.build_vae(cfg)

    x = pyrovae.data.load("digits", "train", binarize="threshold").images[:256]
    run = dict(epochs=2, batch_size=64, seed=0, progress=False)
    by_attribute = vae()
    by_attribute.beta = 0.5
    a = pyrovae.fit(by_attribute.model, by_attribute.guide, x, **run)
    by_keyword = vae()
    b = pyrovae.fit(by_keyword.model, by_keyword.guide, x, step_kwargs={"beta": 0.5}, **run)
    assert a.train_elbo == pytest.approx(b.train_elbo, rel=1e-6)
    ramped = vae()
    trainer = Trainer(ramped.model, ramped.guide, x, batch_size=64, seed=0,
                      step_kwargs={"beta": Ramp(0.1, 1.0, epochs=2)})  # fmt: skip
    records = [trainer.epoch() for _ in range(2)]
    assert [r["step_kwargs"]["beta"] for r in records] == pytest.approx([0.55, 1.0])
    assert trainer.engine.name == "captured" and len(trainer.terms[0].step_loss._graphs) == 1
