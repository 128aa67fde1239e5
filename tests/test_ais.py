"""Tests of pyrovae.ais: AIS and BDMC against the closed-form log p(x) of the linear-Gaussian
pair (statistical, seeded, stated tolerances), and the refusals (exact messages)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian

import pyrovae
from pyrovae.ais import ais, bdmc, sigmoid_schedule


def test_sigmoid_schedule():
    b = sigmoid_schedule(50)
    assert b.shape == (51,) and b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()
    assert b.diff()[0] < b.diff()[25]  # dense at the ends


def test_ais_matches_the_exact_log_likelihood():
    # 200 datapoints, 16 chains of 100 steps: the mean error of AIS is within 0.02 nats (its
    # standard error over datapoints is about 0.007 here)
    lg = LinearGaussian(shift=0.5, widen=0.7)
    x = lg.data(200)
    r = pyrovae.log_likelihood_report(lg.model, lg.guide, x, method="ais", num_samples=16,
                                      steps=100, seed=0)  # fmt: skip
    error = r.log_px - lg.log_px(x)  # (200,)
    assert abs(error.mean().item()) < 0.02
    assert r.method == "ais" and r.num_samples == 16 and torch.isnan(r.khat).all()
    assert ((r.ess >= 1) & (r.ess <= 16)).all() and (r.stderr < 0.5).all()
    # log_likelihood(method="ais") gives the same numbers
    kw = dict(method="ais", num_samples=4, steps=5, seed=1)
    ll = pyrovae.log_likelihood(lg.model, lg.guide, x[:5], **kw)
    assert torch.equal(ll, pyrovae.log_likelihood_report(lg.model, lg.guide, x[:5], **kw).log_px)


def test_ais_closes_the_gap_of_a_poor_guide():
    # a guide too narrow and off-centre: IS with K=1000 is 0.25 nats low on average; AIS with
    # 8 chains × 50 steps × 5 leapfrog (2000 gradient evaluations) is within 0.1 (its standard
    # error over the 50 datapoints is about 0.03)
    lg = LinearGaussian(shift=1.0, widen=0.5)
    x = lg.data(50)
    exact = lg.log_px(x)
    by_is = pyrovae.log_likelihood(lg.model, lg.guide, x, num_samples=1000, seed=0)
    by_ais = ais(lg.model, lg.guide, x, chains=8, steps=50, seed=0).log_px
    assert (by_is - exact).mean() < -0.15
    assert abs((by_ais - exact).mean().item()) < 0.1


def test_bdmc_interval_contains_the_exact_value():
    # a short schedule (10 steps): the bounds are loose enough that their noise over 100
    # simulated datapoints is far smaller than the gap
    lg = LinearGaussian(shift=1.0, widen=0.5)
    r = bdmc(lg.model, lg.guide, lg.data(100), chains=8, steps=10, seed=0)
    exact = lg.log_px(r.data)  # (100,)
    assert r.data.shape == (100, 4) and not torch.equal(r.data, lg.data(100))
    assert r.lower.mean() < exact.mean() < r.upper.mean()
    assert r.gap.mean() > 0


@pytest.mark.slow
def test_bdmc_gap_shrinks_with_steps():
    lg = LinearGaussian(shift=1.0, widen=0.5)
    x = lg.data(100)
    gaps = [bdmc(lg.model, lg.guide, x, chains=8, steps=s, seed=0).gap.mean() for s in (5, 200)]
    assert gaps[1] < gaps[0] / 3


def _discrete_pair():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.5))

    return model, guide


def _positive_pair():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("scale", dist.Gamma(2.0, 2.0))
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("scale", dist.Gamma(2.0, 2.0))

    return model, guide


@pytest.mark.parametrize(
    "pair, match",
    [
        (_discrete_pair, "--method ais needs continuous latents, but site 'c' is discrete "
                         r"\(Bernoulli\); use importance sampling \(--method is\)"),
        (_positive_pair, "--method ais moves latents on the whole real line, but site 'scale' "
                         "has support GreaterThan"),
    ],
)  # fmt: skip
def test_refuses_latents_hmc_cannot_move(pair, match):
    model, guide = pair()
    with pytest.raises(ValueError, match=match):
        ais(model, guide, torch.randn(5))


@pytest.mark.parametrize(
    "kw, match",
    [({"steps": 0}, "--steps must be >= 1"), ({"chains": 2.5}, "--chains must be a whole number"),
     ({"leapfrog": -1}, "--leapfrog must be >= 1")],
)  # fmt: skip
def test_refuses_counts_that_are_not_positive(kw, match):
    lg = LinearGaussian()
    with pytest.raises(ValueError, match=match):
        ais(lg.model, lg.guide, lg.data(3), **kw)


def test_ais_and_bdmc_on_a_hierarchical_vae():
    # two latent sites (z2, then z1 given z2) flattened into one HMC state: AIS lands near the
    # importance-sampled value of the untrained model and BDMC's bounds come out ordered
    data = pyrovae.data.load("digits", "test", binarize="threshold")
    config = pyrovae.Config(x_shape=data.x_shape, hidden=(32,), z_dim=4, model="hvae")
    vae = pyrovae.build_vae(config)
    x = data.images[:6]
    by_ais = ais(vae.model, vae.guide, x, chains=4, steps=5, seed=0).log_px
    by_is = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=200, seed=0)
    assert torch.isfinite(by_ais).all() and abs((by_ais - by_is).mean().item()) < 2.0
    assert bdmc(vae.model, vae.guide, x, chains=4, steps=5, seed=0).gap.mean() > 0
