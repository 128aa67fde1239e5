import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovae
from pyrovae.likelihoods import (
    LIKELIHOODS,
    ContinuousBernoulli,
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
    bits_per_dim,
    make_likelihood,
)

VALUES = torch.arange(256, dtype=torch.float64) / 255  # every value of an 8-bit pixel


def _all_pixels(channels: int) -> torch.Tensor:
    # every value of a 1×1 pixel with 1 or 2 channels: (256**C, C, 1, 1)
    grids = torch.meshgrid(*[VALUES] * channels, indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=-1)[:, :, None, None]


def test_discretized_gaussian_masses_sum_to_one():
    lik = DiscretizedGaussian()
    for loc, raw in [(0.3, -3.0), (0.5, 2.0), (1.4, -9.0), (-0.2, 0.0), (0.5001, -12.0)]:
        params = torch.tensor([loc, raw], dtype=torch.float64).reshape(2, 1, 1, 1)
        p = lik(params, 3)
        total = p.log_prob(VALUES.reshape(256, 1, 1, 1)).logsumexp(0)
        assert abs(total.item()) < 1e-12, (loc, raw, total.item())


@pytest.mark.parametrize("channels", [1, 2])
def test_discretized_logistic_mixture_masses_sum_to_one(channels):
    # two channels exercise the coupling (channel 1's location moves with channel 0's value)
    lik = DiscretizedLogisticMixture(mixtures=4)
    g = torch.Generator().manual_seed(0)
    for spread in (0.5, 3.0):
        params = spread * torch.randn(12, channels, 1, 1, generator=g, dtype=torch.float64)
        total = lik(params, 3).log_prob(_all_pixels(channels)).logsumexp(0)
        assert abs(total.item()) < 1e-12, (channels, spread, total.item())


@pytest.mark.slow
def test_discretized_logistic_mixture_rgb_masses_sum_to_one():
    # all 256**3 colours of one RGB pixel, in 256 chunks (about a minute on one core)
    lik = DiscretizedLogisticMixture(mixtures=3)
    params = 2 * torch.randn(9, 3, 1, 1, dtype=torch.float64)
    p, rest = lik(params, 3), _all_pixels(2)[:, :, 0, 0]  # (65536, 2)
    chunks = [
        p.log_prob(
            torch.cat([torch.full((len(rest), 1), float(r)), rest], 1)[..., None, None]
        ).logsumexp(0)
        for r in VALUES
    ]
    assert abs(torch.stack(chunks).logsumexp(0).item()) < 1e-10


@pytest.mark.parametrize("lik", [DiscretizedGaussian(), DiscretizedLogisticMixture(3)])
def test_discretized_gradients_reach_every_parameter(lik):
    g = torch.Generator().manual_seed(1)
    params = torch.randn(2, lik.num_params, 3, 4, 5, generator=g, requires_grad=True)
    x = torch.randint(1, 255, (2, 3, 4, 5), generator=g) / 255  # no 0: couplings get gradients
    lik(params, 3).log_prob(x).sum().backward()
    assert torch.isfinite(params.grad).all() and (params.grad != 0).all()


def test_discretized_logistic_extremes_are_finite():
    lik = DiscretizedLogisticMixture(2)
    params = torch.tensor([50.0, -50.0, 3.0, -2.0, 20.0, -20.0]).reshape(6, 1, 1, 1)
    params.requires_grad_(True)
    lp = lik(params, 3).log_prob(torch.tensor([0.0, 1 / 255, 0.5, 1.0]).reshape(4, 1, 1, 1))
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all() and (lp <= 0).all()


@pytest.mark.parametrize("name", ["discretized-logistic", "discretized-gaussian"])
def test_particles_sampling_and_means(name):
    lik = make_likelihood(name)
    params = torch.randn(7, 5, lik.num_params, 3, 6, 4)  # (K particles, N, P, C, H, W)
    p = lik(params, 3)
    assert p.batch_shape == (7, 5) and p.event_shape == (3, 6, 4)
    x = p.sample()
    assert x.shape == (7, 5, 3, 6, 4) and torch.equal(x, (x * 255).round() / 255)
    assert 0 <= x.min() and x.max() <= 1
    assert p.log_prob(x[0]).shape == (7, 5) and p.sample((2,)).shape == (2, 7, 5, 3, 6, 4)
    mean = lik.mean(params, 3)
    assert mean.shape == (7, 5, 3, 6, 4) and 0 <= mean.min() and mean.max() <= 1
    assert p.expand((3, 7, 5)).log_prob(x[0]).shape == (3, 7, 5)


def test_logistic_mixture_mean_follows_its_samples():
    lik = DiscretizedLogisticMixture(2)
    params = torch.randn(1, 6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = lik(params, 3).sample((40000,))  # (40000, 1, 1, 4, 4)
    assert torch.allclose(draws.mean(0), lik.mean(params, 3), atol=0.01)


def test_uniform_mass_scores_exactly_eight_bits_per_dim():
    # p(x|z) uniform on the 256 values of each of the 3·4·4 pixels, q(z|x) = p(z): every
    # importance weight is p(x) exactly, so log p(x) = −48 log 256.
    class Uniform8bit(dist.TorchDistribution):
        arg_constraints, support = {}, dist.constraints.unit_interval

        def __init__(self, batch_shape):
            super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

        def log_prob(self, x):
            return torch.full(x.shape, -math.log(256), dtype=x.dtype)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", Uniform8bit(x.shape).to_event(3), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.randint(0, 256, (6, 3, 4, 4)).double() / 255
    log_px = pyrovae.log_likelihood(model, guide, x, num_samples=10)
    assert torch.equal(bits_per_dim(log_px, (3, 4, 4)), torch.full((6,), 8.0, dtype=torch.float64))


def test_continuous_bernoulli_density_integrates_to_one():
    lik = ContinuousBernoulli()
    u = torch.linspace(0, 1, 200001, dtype=torch.float64)  # trapezoid rule on [0, 1]
    for logit in (-6.0, -1.0, 0.0, 1e-4, 2.5):
        params = torch.full((1, 1), logit, dtype=torch.float64)
        density = lik(params, 1).base_dist.log_prob(u[:, None]).exp()[:, 0]
        assert abs(torch.trapezoid(density, u).item() - 1) < 1e-8, logit
        mean = torch.trapezoid(u * density, u).item()
        assert lik.mean(params, 1).item() == pytest.approx(mean, abs=1e-6)


def test_support_checks_name_the_likelihood():
    digits = pyrovae.data.load("digits", "test").images  # k/16: not on the 8-bit grid
    for name in ("discretized-logistic", "discretized-gaussian"):
        with pytest.raises(ValueError, match=f"the {name} likelihood needs 8-bit pixels"):
            make_likelihood(name).check_support(digits)
        make_likelihood(name).check_support(torch.arange(256.0) / 255)
    with pytest.raises(ValueError, match=r"continuous-bernoulli likelihood needs .* \[0, 1\]"):
        ContinuousBernoulli().check_support(torch.tensor([0.5, 1.2]))
    ContinuousBernoulli().check_support(digits)
    with pytest.raises(ValueError, match="mixtures must be an integer >= 1"):
        DiscretizedLogisticMixture(0)
    assert {"continuous-bernoulli", "discretized-gaussian", "discretized-logistic"} <= set(
        LIKELIHOODS
    )
    assert DiscretizedLogisticMixture(5).num_params == 15 and DiscretizedGaussian.levels == 256


@pytest.mark.parametrize("name", ["discretized-logistic", "discretized-gaussian"])
def test_colour_conv_vae_trains_and_scores_a_mass(name):
    train = pyrovae.data.load("photo-patches", "valid")
    cfg = pyrovae.Config(x_shape=train.x_shape, net="conv", hidden=(32,), z_dim=4,
                         likelihood=name)  # fmt: skip
    vae = pyrovae.build_vae(cfg)
    vae.check_data(train.images)
    pyrovae.fit(vae.model, vae.guide, train.images[:64], epochs=1, batch_size=32)
    log_px = pyrovae.log_likelihood(vae.model, vae.guide, train.images[:4], num_samples=8)
    bpd = bits_per_dim(log_px, train.x_shape)
    assert log_px.shape == (4,) and (log_px < 0).all() and (bpd > 0).all()
    assert vae.sample(3).shape == (3, 3, 32, 32)


def test_support_checks_work_chunk_by_chunk(monkeypatch):
    # the checks look at CHECK_CHUNK values at a time (no temporary the size of the data) and
    # still find a bad value in any chunk, the last one included
    from pyrovae import likelihoods

    monkeypatch.setattr(likelihoods, "CHECK_CHUNK", 7)
    x = torch.arange(256.0).repeat(3) / 255  # (768,) on the 8-bit grid
    likelihoods.check_8bit(x, "discretized-logistic")
    assert likelihoods.first_bad(x, lambda c: c > 1) is None
    x[-1] = 0.5  # off the grid, in the last chunk
    with pytest.raises(ValueError, match="8-bit pixels .* such as 0.5;"):
        likelihoods.check_8bit(x, "discretized-logistic")
    x[-1], x[9] = 1.0, float("nan")
    with pytest.raises(ValueError, match="values in \\[0, 1\\].* such as nan"):
        likelihoods.ContinuousBernoulli().check_support(x)


def _reference_log_prob():
    # the mixture's log-density as pyrovae computed it before (benchmarks/scoring.py keeps it)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_log_prob


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logistic_mixture_matches_the_old_formula(channels, dtype):
    # the fast log-density (one component at a time, one logarithm per pixel) equals the old
    # one, values and gradients, on every kind of bin (both ends and inside) and scale
    reference = _reference_log_prob()
    g = torch.Generator().manual_seed(3)
    lik = DiscretizedLogisticMixture(mixtures=5)
    spread = torch.tensor([2.0, 1.0, 6.0]).repeat_interleave(5)[:, None, None, None]  # by part
    params = spread * torch.randn(7, 15, channels, 4, 5, generator=g, dtype=torch.float64)
    params = params.to(dtype).requires_grad_(True)  # (particles, 3K, C, H, W)
    x = torch.randint(0, 256, (7, channels, 4, 5), generator=g).to(dtype) / 255
    x[:, :, 0] = 0.0  # the end bins
    x[:, :, 1, :2] = 1.0
    new, old = lik(params, 3).log_prob(x), reference(lik(params, 3), x)
    (grad_new,) = torch.autograd.grad(new.sum(), params)
    (grad_old,) = torch.autograd.grad(old.sum(), params)
    exact = dtype == torch.float64  # float64: the formulas agree to rounding
    tol = {"rtol": 1e-8, "atol": 1e-8} if exact else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(new, old, **tol)
    # float32 gradients: both formulas' rounding, of up to about 1e-3 on gradients of about 100
    torch.testing.assert_close(
        grad_new, grad_old, **(tol if exact else {"rtol": 1e-4, "atol": 2e-3})
    )
