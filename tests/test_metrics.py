import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian

import pyrovae
from pyrovae.metrics import active_units, elbo_parts

# exact tier: closed forms of the linear-Gaussian model (tests/linear_gaussian.py)


def test_parts_with_the_exact_posterior_add_up_to_log_px():
    # with q = p(z|x), log p(x|z) − (log q − log p(z)) = log p(x) at every draw (the KL of a
    # MultivariateNormal guide against a Normal prior has no closed form in torch: estimated)
    lg = LinearGaussian()
    x = lg.data(50)
    parts = elbo_parts(lg.model, lg.exact_guide, x)
    assert parts["reconstruction"].shape == parts["kl"].shape == (50,)
    assert torch.allclose(parts["reconstruction"] - parts["kl"], lg.log_px(x), atol=1e-9)


@pytest.mark.statistical
def test_kl_is_closed_form_for_a_gaussian_guide_and_the_reconstruction_is_unbiased():
    lg = LinearGaussian(shift=0.7, widen=1.3)
    x = lg.data(20)
    loc, scale = lg.q(x)
    kl = 0.5 * (scale**2 + loc**2 - 1 - torch.log(scale**2)).sum(-1)  # (20,)
    parts = [elbo_parts(lg.model, lg.guide, x) for _ in range(400)]
    assert all(torch.allclose(p["kl"], kl, atol=1e-12) for p in parts)  # no sampling noise
    rec = torch.stack([p["reconstruction"] for p in parts]).mean(0)
    expected = lg.closed_form_elbo(x) + kl
    # statistical tier: 400 draws; the per-draw spread of log p(x|z) is about 2 nats here
    assert torch.allclose(rec, expected, atol=0.5)


def test_parts_are_unscaled_by_the_kl_weight():
    data = pyrovae.data.load("digits", "valid", binarize="threshold").images[:30]
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3))
    pyro.set_rng_seed(1)
    before = elbo_parts(vae.model, vae.guide, data)
    vae.beta = 0.2  # warm-up scales the KL in the loss, not in the reported parts
    pyro.set_rng_seed(1)
    after = elbo_parts(vae.model, vae.guide, data)
    assert torch.equal(before["kl"], after["kl"])
    assert torch.equal(before["reconstruction"], after["reconstruction"])


def _guide_with_units(moving: int, total: int):
    # posterior means: the first `moving` units follow x, the others are fixed at 0.3
    def guide(x):
        loc = torch.full((x.shape[0], total), 0.3)
        loc[:, :moving] = x[:, :moving]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    return guide


@pytest.mark.parametrize("moving", [0, 2, 5])
def test_active_units_counts_the_units_whose_posterior_mean_moves(moving):
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    assert active_units(_guide_with_units(moving, 7), x) == moving
    # Burda et al.'s threshold: a unit whose mean varies with variance 0.005 is inactive
    assert active_units(_guide_with_units(5, 7), x * math.sqrt(0.005)) == 0
    with pytest.raises(ValueError, match="at least 2 datapoints"):
        active_units(_guide_with_units(1, 2), x[:1])


def test_metrics_of_the_built_in_models_hold_together():
    # smoke over the priors and guides pyrovae builds: finite parts, KL >= 0 where closed form,
    # active units within the latent size
    data = pyrovae.data.load("digits", "valid", binarize="threshold").images[:40]
    for kw in ({}, {"prior": "vampprior"}, {"model": "hvae"}, {"guide": "flow"}):
        vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3, **kw))
        parts = elbo_parts(vae.model, vae.guide, data)
        assert torch.isfinite(parts["reconstruction"]).all() and torch.isfinite(parts["kl"]).all()
        units = 3 * (2 if kw.get("model") == "hvae" else 1)  # an HVAE's z1 is z_dim wide too
        assert 0 <= active_units(vae.guide, data) <= units
