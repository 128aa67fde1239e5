"""The pair core (pyrovae.pair) that both engines share: discovery, the validation score and the
epoch record, and the two engines agreeing on what they report."""

import csv

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae
from pyrovae import cli
from pyrovae.pair import Objective, Term, discover, epoch_record, validation_elbo


def _digits_vae(beta=1.0):
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=4, seed=0))
    vae.beta = beta
    x = pyrovae.data.load("digits", "valid", binarize="threshold").images
    return vae, x


def test_validation_score_is_the_unscaled_elbo_whatever_beta():
    # Under KL warm-up the training loss scales the KL by β; the validation score does not: it
    # is pyrovae.elbo's estimate with the seed given, the same at β = 1 and β = 0.01, and the
    # generator is left alone.
    vae, x = _digits_vae()
    term = Term(Objective(vae.model, vae.guide, x), 0)
    scores, losses = [], []
    for beta in (1.0, 0.01):
        vae.beta = beta
        before = torch.get_rng_state()
        scores.append(validation_elbo(term, (x,), seed=5))
        assert torch.equal(before, torch.get_rng_state())
        torch.manual_seed(7)
        with torch.no_grad():
            losses.append(float(term.elbo_module(x)))  # the same draws at each β
    assert scores[0] == scores[1]
    assert scores[0] == pytest.approx(float(pyrovae.elbo(vae.model, vae.guide, x, seed=5).mean()))
    assert losses[1] < losses[0]  # the loss counts the KL at β


@pytest.mark.statistical
def test_validation_score_of_streamed_batches_sums_per_datapoint():
    vae, x = _digits_vae()
    term = Term(Objective(vae.model, vae.guide, x), 0)
    batches = [(x[:100],), (x[100:],)]
    score = validation_elbo(term, iter(batches), seed=1)
    exact = pyrovae.elbo(vae.model, vae.guide, x, num_particles=200).mean()
    assert score == pytest.approx(float(exact), abs=1.5)  # one particle: Monte-Carlo error


def test_a_pair_elbo_cannot_score_is_scored_by_its_loss(caplog):
    # A global latent outside the data plate: pyrovae.elbo refuses it, so the validation score
    # is the loss's (said once), as fit scored such pairs before.
    x = torch.randn(50, 2)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        m = pyro.param("m", torch.zeros(2))
        pyro.sample("loc", dist.Normal(m, 0.1).to_event(1))

    term = Term(Objective(model, guide, x), 0)
    with caplog.at_level("WARNING", logger="pyrovae"):
        score = validation_elbo(term, (x,), seed=0)
        validation_elbo(term, (x,), seed=0)
    assert sum("cannot score" in r.getMessage() for r in caplog.records) == 1
    assert -400 < score < 0


def test_discovery_finds_modules_and_free_params():
    # The modules the pair is bound to (then those it registers with pyro.module, here its own
    # submodules) and the pyro.param sites outside them that the loss reached; an unused one
    # (no gradient) is left out.
    vae, x = _digits_vae()

    def guide(x):
        pyro.param("unused", torch.ones(()))
        shift = pyro.param("shift", torch.zeros(x.shape[1:]))
        return vae.guide(x + 0.0 * shift)

    term = Term(Objective(vae.model, guide, x), 0)
    found = discover([term], [(x[:16],)])
    assert found.modules[0] is vae
    inside = {id(m) for m in vae.modules()}
    assert all(id(m) in inside for m in found.modules)
    assert set(found.free) == {"shift"}
    assert len(found.params) == sum(1 for _ in vae.parameters()) + 1
    assert all(p.grad is not None for p in vae.encoder.parameters())


def test_epoch_record_per_datapoint_and_parts():
    a, b = (Term(Objective(lambda x: None, lambda x: None, torch.zeros(3)), i) for i in (0, 1))
    for t, total, n in ((a, 30.0, 10), (b, 8.0, 4)):
        t.start_epoch("cpu")
        t.add(torch.tensor(total), n)
    record = epoch_record(3, [a, b], 1.5, -2.0)
    assert record["train_elbo"] == -3.0 and record["parts"] == {"objective1": -3.0,
                                                              "objective2": -2.0}  # fmt: skip
    assert record["epoch"] == 3 and record["val_elbo"] == -2.0


@pytest.mark.parametrize("engine", ["fit", "lightning"])
def test_both_engines_report_the_elbo_as_its_parts_under_warmup(tmp_path, engine, capsys):
    # The measurement: with KL warm-up the Lightning engine reported the β-scaled loss
    # as val_elbo. Both engines now report the ELBO: val_reconstruction − val_kl (the same
    # 180 validation digits) within Monte-Carlo error, at every epoch, and select on it.
    pytest.importorskip("lightning")
    run = tmp_path / engine
    args = ["train", "--epochs", "3", "--warmup", "5", "--seed", "3", "--hidden", "32",
            "--z-dim", "4", "--engine", engine, "--out", str(run)]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err  # not a terminal: a line per epoch, no redrawn bar
    assert "\r" not in err and [f"epoch {i}/3: ELBO" in err for i in (1, 2, 3)] == [True] * 3
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        assert float(row["beta"]) < 1
        parts = float(row["val_reconstruction"]) - float(row["val_kl"])
        assert float(row["val_elbo"]) == pytest.approx(parts, abs=1.5), row
