"""Objectives: the per-datapoint IWAE bound against the closed-form linear-Gaussian pair and
against Pyro's RenyiELBO, the loss registry, and β scaling that training sees and evaluation
does not."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.importance import vectorized_importance_weights

import pyrovae
from pyrovae.objectives import IWAE, LOSSES, make_loss


def test_iwae_per_datapoint_between_elbo_and_log_px_rising_with_k():
    # For every datapoint i: ELBO_i < E[IWAE_1,i] ≈ ELBO_i < E[IWAE_4,i] < E[IWAE_16,i]
    # < E[IWAE_64,i] < log p(x_i), each expectation averaged over 1000 replicates.
    lg = LinearGaussian(shift=1.0, widen=1.5)
    x = lg.data(8)
    reps = 1000
    exact, elbo = lg.log_px(x), lg.closed_form_elbo(x)  # (8,) each
    means, ses = [], []
    for k in (1, 4, 16, 64):
        est = IWAE(k, max_plate_nesting=1).per_datapoint(lg.model, lg.guide, x.repeat(reps, 1))
        est = est.reshape(reps, len(x))  # (reps, 8)
        means.append(est.mean(0))
        ses.append(est.std(0) / math.sqrt(reps))
    assert (abs(means[0] - elbo) < 4 * ses[0]).all()  # k = 1 is the ELBO
    for lo, hi in zip(means, means[1:], strict=False):
        assert (hi > lo).all(), (lo, hi)
    assert (means[1] > elbo).all() and (means[-1] < exact + 4 * ses[-1]).all()
    assert ((exact - means[-1]) < 0.25 * (exact - elbo)).all()  # most of each gap closed


def test_iwae_gradients_and_value_match_renyi_on_local_latents():
    # All sites in the data plate: Pyro's RenyiELBO(alpha=0) is per datapoint too, and with the
    # same random numbers the two losses agree exactly.
    lg = LinearGaussian(shift=0.5, widen=1.2)
    x = lg.data(30)
    for k in (1, 5):
        pyro.set_rng_seed(7)
        mine = IWAE(k, max_plate_nesting=1).loss(lg.model, lg.guide, x)
        pyro.set_rng_seed(7)
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        assert mine == pytest.approx(renyi.loss(lg.model, lg.guide, x), rel=1e-12)
    loc = torch.zeros(2, dtype=x.dtype, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    IWAE(4)(lg.model, guide)(x).backward()  # an ELBOModule, as fit uses it
    assert loc.grad is not None and loc.grad.abs().sum() > 0


def _global_model(x):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))  # a global latent, outside the data plate
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(g, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def _global_guide(x):
    g = pyro.sample("g", dist.Normal(0.3, 0.8))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * (x + g), 0.6))


def test_renyi_collapses_to_one_weight_per_batch_with_a_global_site_and_iwae_refuses():
    x = torch.linspace(-1, 2, 20)
    k = 8
    pyro.set_rng_seed(1)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    value = renyi.loss(_global_model, _global_guide, x)
    pyro.set_rng_seed(1)
    lw, _, _ = vectorized_importance_weights(
        _global_model, _global_guide, x, num_samples=k, max_plate_nesting=1
    )  # (k,): one joint weight per particle for the whole batch
    assert lw.shape == (k,)
    assert value == pytest.approx(-(float(lw.logsumexp(0)) - math.log(k)), rel=1e-6)
    with pytest.raises(ValueError, match="site 'g' is outside the 'data' plate"):
        IWAE(k).loss(_global_model, _global_guide, x)


def test_iwae_trains_a_vae_with_fit():
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(64,), z_dim=4))
    test = pyrovae.data.load("digits", "test", binarize="threshold").images[:60]
    with torch.no_grad():
        before = float(IWAE(5).per_datapoint(vae.model, vae.guide, test).mean())
    history = pyrovae.fit(vae.model, vae.guide, data, epochs=4, batch_size=64, lr=3e-3,
                          loss=IWAE(5), progress=False, seed=0)  # fmt: skip
    with torch.no_grad():
        after = float(IWAE(5).per_datapoint(vae.model, vae.guide, test).mean())
    assert after > before + 5 and history.train_elbo[-1] > history.train_elbo[0]


def test_beta_scales_latent_sites_in_model_and_guide_but_not_log_px():
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3))
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.4))
    vae.beta = 0.25
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["scale"] == 0.25 and model_tr.nodes["z"]["scale"] == 0.25
    assert model_tr.nodes["x"]["scale"] == 1.0
    # the training loss is −(log p(x|z) + β (log p(z) − log q(z|x)))
    pyro.set_rng_seed(4)
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    rec = model_tr.nodes["x"]["log_prob_sum"]
    kl_term = model_tr.nodes["z"]["unscaled_log_prob"] - guide_tr.nodes["z"]["unscaled_log_prob"]
    assert loss == pytest.approx(-float((rec + 0.25 * kl_term.sum()).detach()), rel=1e-5)
    # evaluation reads unscaled densities: the same log p(x) whatever β is
    pyro.set_rng_seed(9)
    scaled = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=64)
    scaled_elbo = pyrovae.elbo(vae.model, vae.guide, x)
    vae.beta = 1.0
    pyro.set_rng_seed(9)
    assert torch.equal(scaled, pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=64))
    assert torch.equal(scaled_elbo, pyrovae.elbo(vae.model, vae.guide, x))
    # meanfield's closed-form KL is scaled the same way
    vae.beta = 0.5
    pyro.set_rng_seed(2)
    half = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    vae.beta = 1.0
    pyro.set_rng_seed(2)
    full = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    assert half < full


def test_loss_registry_and_bad_settings():
    assert set(LOSSES) == {"elbo", "meanfield", "iwae"}
    assert isinstance(make_loss("elbo"), Trace_ELBO)
    assert make_loss("meanfield", 3).num_particles == 3
    assert isinstance(make_loss("iwae", 5), IWAE) and make_loss("iwae", 5).num_particles == 5
    with pytest.raises(ValueError, match="unknown loss 'renyi'; choose from elbo, meanfield, iwae"):
        make_loss("renyi")
    with pytest.raises(ValueError, match="particles must be a positive integer, got 0"):
        make_loss("elbo", 0)
    with pytest.raises(ValueError, match=r"particles \(k, the IWAE's samples per datapoint\)"):
        IWAE(0)
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3))
    vae.beta = 0.5
    with pytest.raises(ValueError, match="beta=0.5 .* would be ignored"):
        IWAE(2).loss(vae.model, vae.guide, torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="the iwae loss uses the model's unscaled densities"):
        pyrovae.Config(loss="iwae", warmup=10).validate()
    with pytest.raises(ValueError, match="beta \\(the KL weight\\) must be > 0"):
        pyrovae.Config(beta=0.0).validate()
    with pytest.raises(ValueError, match="beta \\(the KL weight\\) must be a finite number > 0"):
        vae.beta = -1
