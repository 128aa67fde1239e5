"""Exact tests of the ELBO, IWAE and log p(x) estimators on a linear-Gaussian model, where
log p(x) and p(z|x) are closed form (see linear_gaussian.py)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import Trace_ELBO

import pyrovae
from pyrovae.evaluation import log_weights, plan_chunks


def test_exact_posterior_gives_constant_weights():
    # With q(z|x) = p(z|x), every importance weight equals p(x): log w = log p(x) exactly.
    lg = LinearGaussian()
    x = lg.data(30)
    lw = log_weights(lg.model, lg.exact_guide, x, num_particles=16, max_plate_nesting=1)
    assert lw.shape == (16, 30)
    expected = lg.log_px(x).expand(16, 30)
    assert torch.allclose(lw, expected, atol=1e-10, rtol=0)
    ll = pyrovae.log_likelihood(lg.model, lg.exact_guide, x, num_samples=7)
    assert torch.allclose(ll, lg.log_px(x), atol=1e-10, rtol=0)
    el = pyrovae.elbo(lg.model, lg.exact_guide, x, num_particles=3)
    assert torch.allclose(el, lg.log_px(x), atol=1e-10, rtol=0)


def test_chunked_evaluation_is_exact_too():
    # Many datapoint batches and particle chunks, combined in log space: still exact.
    lg = LinearGaussian()
    x = lg.data(23)
    ll = pyrovae.log_likelihood(
        lg.model, lg.exact_guide, x, num_samples=50, batch_size=5, max_chunk_elements=5 * 4 * 7
    )
    assert torch.allclose(ll, lg.log_px(x), atol=1e-10, rtol=0)


def test_is_estimate_with_imperfect_guide_k5000():
    # A shifted, widened mean-field guide: K=5000 importance samples recover log p(x) to within
    # a few hundredths of a nat per datapoint, while the ELBO is off by the KL.
    lg = LinearGaussian(shift=0.5, widen=1.3)
    x = lg.data(40)
    exact = lg.log_px(x)
    ll = pyrovae.log_likelihood(lg.model, lg.guide, x, num_samples=5000)
    err = (ll - exact).abs()
    assert err.max() < 0.03, err.max()
    assert err.mean() < 0.01, err.mean()
    gap = exact - pyrovae.elbo(lg.model, lg.guide, x, num_particles=2000)
    assert gap.mean() > 0.2  # the ELBO is clearly looser: the estimate is not just the ELBO


def test_bounds_are_ordered_and_rise_with_k():
    # ELBO <= IWAE_k <= log p(x), and IWAE_k rises with k (means over 1000 datapoints).
    lg = LinearGaussian(shift=1.0, widen=1.5)
    x = lg.data(1000)
    exact = lg.log_px(x).mean()
    elbo = lg.closed_form_elbo(x).mean()
    bounds = [pyrovae.iwae(lg.model, lg.guide, x, k).mean() for k in (1, 4, 16, 64)]
    assert abs(bounds[0] - elbo) < 0.05  # IWAE_1 is the ELBO
    for lower, upper in zip(bounds, bounds[1:], strict=False):
        assert lower < upper
    assert elbo < bounds[1] and bounds[-1] < exact
    assert exact - bounds[-1] < 0.1 * (exact - elbo)  # most of the gap closed by k=64


def test_gap_is_kl_to_posterior():
    # The identity log p(x) − ELBO = KL(q(z|x) ‖ p(z|x)): exact in closed form, and the
    # Monte-Carlo ELBO agrees within 4 standard errors per datapoint.
    lg = LinearGaussian(shift=0.3, widen=1.3)
    x = lg.data(20)
    closed = lg.closed_form_elbo(x)
    assert torch.allclose(lg.log_px(x) - closed, lg.kl_q_posterior(x), atol=1e-10, rtol=0)
    particles = 20000
    lw = log_weights(lg.model, lg.guide, x, num_particles=particles, max_plate_nesting=1)
    se = lw.std(0) / math.sqrt(particles)
    mc = pyrovae.elbo(lg.model, lg.guide, x, num_particles=particles)
    assert ((mc - closed).abs() < 4 * se).all()


@pytest.mark.parametrize("n", [1, 17])
def test_elbo_equals_pyro_trace_elbo(n):
    # Same random state, one particle: pyrovae's per-datapoint ELBO sums to −Trace_ELBO's loss.
    lg = LinearGaussian(shift=0.3, widen=1.3)
    x = lg.data(n)
    pyro.set_rng_seed(5)
    ours = pyrovae.elbo(lg.model, lg.guide, x).sum()
    pyro.set_rng_seed(5)
    theirs = -Trace_ELBO().loss(lg.model, lg.guide, x)
    assert ours.item() == pytest.approx(theirs, abs=1e-9)


def test_elbo_equals_trace_elbo_on_vae(digits_vae):
    vae, x = digits_vae
    pyro.set_rng_seed(3)
    ours = pyrovae.elbo(vae.model, vae.guide, x).sum()
    pyro.set_rng_seed(3)
    theirs = -Trace_ELBO().loss(vae.model, vae.guide, x)
    assert ours.item() == pytest.approx(theirs, rel=1e-5)


def test_global_latent_is_refused():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'mu' is outside the 'data' plate"):
        pyrovae.log_likelihood(model, guide, torch.randn(5), num_samples=10)


def test_other_plate_name():
    lg = LinearGaussian()
    x = lg.data(4)
    with pytest.raises(ValueError, match=r"no plate named 'batch'.*plates in the model: 'data'"):
        pyrovae.log_likelihood(lg.model, lg.guide, x, num_samples=3, data_plate="batch")


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_num_samples(bad):
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="must be >= 1"):
        pyrovae.log_likelihood(lg.model, lg.guide, lg.data(3), num_samples=bad)


def test_chunk_plan_bounds_memory():
    # K=5000 over 10k binarized-MNIST images: every chunk within the element bound (~64 MiB per
    # float32 tensor of that size), whatever the requested batch size.
    bound = 2**24
    for batch_size in (None, 1, 100, 10000):
        b, c = plan_chunks(10000, 5000, 784, batch_size, bound)
        assert b * c * 784 <= bound and b >= 1 and c >= 1
    assert plan_chunks(10, 3, 4, None, 10**6) == (10, 3)  # small problems: one chunk


def test_log_likelihood_of_digits_vae_is_finite_and_below_zero(digits_vae):
    vae, x = digits_vae
    ll = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=64)
    assert ll.shape == (len(x),) and torch.isfinite(ll).all() and (ll < 0).all()
    el = pyrovae.elbo(vae.model, vae.guide, x, num_particles=64)
    assert (el.mean() < ll.mean()).item()


def test_scoring_progress_bar_states_the_work_and_rate(digits_vae, capsys):
    # the bar states images × K up front and shows images/s; quiet by default
    vae, x = digits_vae
    pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=50)
    assert capsys.readouterr().err == ""
    pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=50, progress=True,
                           max_chunk_elements=40 * 64 * 10)  # fmt: skip
    err = capsys.readouterr().err
    assert "log p(x): 40 images × K=50" in err and "img/s" in err and "40/40" in err
    pyrovae.elbo(vae.model, vae.guide, x, progress=True)
    assert "ELBO: 40 images × K=1" in capsys.readouterr().err


def test_scoring_estimate_extrapolates_and_names_a_k_that_fits(monkeypatch):
    # the time is extrapolated from one timed chunk; over budget, it names the K that fits
    from pyrovae import evaluation

    lg = LinearGaussian()
    x = lg.data(40)
    ticks = iter([0.0, 2.0])  # the timed chunk (4 datapoints × 100 particles) takes 2 s
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks))
    state = torch.get_rng_state()
    seconds, note = evaluation.scoring_estimate(
        lg.model, lg.exact_guide, x, 1000, budget=60.0, probe=(4, 100)
    )
    assert torch.equal(torch.get_rng_state(), state)  # seeded: the caller's draws are untouched
    assert seconds == pytest.approx(2.0 / (4 * 100) * 40 * 1000)  # 200 s
    assert note == (
        "scoring 40 images × K=1,000: about 3.3 min (timed on 4 × K=100); K=200 would fit in 60 s"
    )
