"""The VAE pair and its pieces: priors, likelihoods, networks."""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

import pyrovae
from pyrovae.likelihoods import Bernoulli, Gaussian, LearnedGaussian, make_likelihood
from pyrovae.nets import ConvDecoder, ConvEncoder, GatedDense, MLPDecoder, MLPEncoder
from pyrovae.priors import StandardNormal, make_prior


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned"])
def test_model_and_guide_traces(net, likelihood):
    x_shape = (1, 28, 28) if net == "conv" else (1, 8, 8)
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=x_shape, net=net, hidden=(32,), z_dim=3,
                                           likelihood=likelihood))  # fmt: skip
    x = torch.bernoulli(torch.full((5, *x_shape), 0.3))
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    z, obs = guide_tr.nodes["z"], model_tr.nodes["x"]
    assert z["value"].shape == (5, 3) and z["fn"].event_shape == (3,)
    assert obs["fn"].batch_shape == (5,) and obs["fn"].event_shape == x_shape
    for site in (z, model_tr.nodes["z"], obs):
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    model_tr.compute_log_prob()
    assert model_tr.nodes["x"]["log_prob"].shape == (5,)


def test_vae_methods_shapes():
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=2))
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.5))
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (6, 2) and (scale > 0).all()
    assert vae.decode(loc).shape == (6, 1, 8, 8)
    assert vae.decode(torch.zeros(4, 6, 2)).shape == (4, 6, 1, 8, 8)  # extra batch dims
    assert vae.reconstruct(x).shape == (6, 1, 8, 8)
    s = vae.sample(7)
    assert s.shape == (7, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
    assert set(vae.sample(3, mean=False).unique().tolist()) <= {0.0, 1.0}
    path = vae.interpolate(x[0], x[1], steps=5)
    assert path.shape == (5, 1, 8, 8)
    assert torch.allclose(path[0], vae.reconstruct(x[:1])[0], atol=1e-6)
    assert vae.interpolate(x[:3], x[3:], steps=4).shape == (4, 3, 1, 8, 8)


def test_user_prior_callable_plugs_in():
    # Any callable returning a distribution over z: here a Student-t prior.
    def student_t():
        return dist.StudentT(3.0, torch.zeros(2), torch.ones(2)).to_event(1)

    enc, dec = MLPEncoder((1, 8, 8), 2, (16,)), MLPDecoder((1, 8, 8), 2, (16,))
    vae = pyrovae.VAE(enc, dec, prior=student_t)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    tr = poutine.trace(vae.model).get_trace(x)
    assert isinstance(tr.nodes["z"]["fn"].base_dist, dist.StudentT)
    assert torch.isfinite(pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=10)).all()


@pytest.mark.parametrize("prior, match", [
    (lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1), r"event shape is \(3,\).*z_dim=2"),
    (lambda: dist.Normal(torch.zeros(2), 1.0), r"event shape is \(\)"),
    (lambda: torch.zeros(2), "must return a distribution"),
])  # fmt: skip
def test_bad_user_prior(prior, match):
    enc, dec = MLPEncoder((1, 8, 8), 2, (16,)), MLPDecoder((1, 8, 8), 2, (16,))
    with pytest.raises(ValueError, match=match):
        pyrovae.VAE(enc, dec, prior=prior)


def test_mismatched_pieces():
    enc, dec = MLPEncoder((1, 8, 8), 2, (16,)), MLPDecoder((1, 8, 8), 2, (16,))
    with pytest.raises(ValueError, match="z_dim=3 does not match the decoder's z_dim=2"):
        pyrovae.VAE(enc, dec, prior=StandardNormal(3), z_dim=3)
    with pytest.raises(ValueError, match="needs 2 decoder outputs per pixel, the decoder makes 1"):
        pyrovae.VAE(enc, dec, likelihood=LearnedGaussian())


def test_standard_normal_prior():
    prior = StandardNormal(4)
    d = prior()
    assert d.event_shape == (4,) and d.batch_shape == ()
    z = d.sample((20000,))
    assert z.mean(0).abs().max() < 0.05 and (z.std(0) - 1).abs().max() < 0.05
    expected = -0.5 * (z**2).sum(-1) - 2 * math.log(2 * math.pi)
    assert torch.allclose(d.log_prob(z), expected, atol=1e-5)
    assert not list(prior.parameters())  # nothing learned
    with pytest.raises(ValueError, match="unknown prior 'vamp'; choose from normal"):
        make_prior("vamp", 4)
    with pytest.raises(ValueError, match="z_dim must be a positive integer"):
        StandardNormal(0)


def test_likelihood_densities_match_closed_forms():
    params = torch.randn(3, 2, 1, 4, 4)  # (N, P, *x_shape)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5))
    logits = params[:, 0]
    bern = Bernoulli()(params[:, :1], 3).log_prob(x)
    expected = (x * torch.nn.functional.logsigmoid(logits)
                + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum((1, 2, 3))  # fmt: skip
    assert torch.allclose(bern, expected, atol=1e-5)
    c = 0.3
    gauss = Gaussian(c)(params[:, :1], 3).log_prob(x)
    expected = (-0.5 * (x - logits) ** 2 / c - 0.5 * math.log(2 * math.pi * c)).sum((1, 2, 3))
    assert torch.allclose(gauss, expected, atol=1e-4)
    learned = LearnedGaussian()(params, 3)
    assert learned.event_shape == (1, 4, 4)
    assert torch.allclose(learned.base_dist.scale,
                          torch.nn.functional.softplus(params[:, 1]) + 1e-3)  # fmt: skip


def test_likelihood_checks():
    with pytest.raises(ValueError, match="binary pixels.*0.5"):
        Bernoulli().check_support(torch.tensor([0.0, 0.5, 1.0]))
    Bernoulli(allow_non_binary=True).check_support(torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        Bernoulli(allow_non_binary=True).check_support(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="variance must be > 0"):
        Gaussian(0.0)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'; choose from bernoulli"):
        make_likelihood("poisson")


def test_networks_handle_leading_batch_dims():
    enc, dec = ConvEncoder((1, 28, 28), 5), ConvDecoder((1, 28, 28), 5, num_params=2)
    loc, scale = enc(torch.rand(2, 3, 1, 28, 28))
    assert loc.shape == scale.shape == (2, 3, 5)
    assert dec(torch.randn(4, 2, 5)).shape == (4, 2, 2, 1, 28, 28)
    gated = GatedDense(6, 3)
    h = gated(torch.randn(7, 6))
    assert h.shape == (7, 3)
    expected = gated.h(torch.ones(6)) * torch.sigmoid(gated.g(torch.ones(6)))
    assert torch.allclose(gated(torch.ones(6)), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvEncoder((1, 30, 30), 2)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLPEncoder((1, 8, 8), 2, (8,), activation="swish")
    with pytest.raises(ValueError, match="hidden sizes must be positive"):
        MLPEncoder((1, 8, 8), 2, (0,))


def test_config_json_round_trip_and_validation():
    cfg = pyrovae.Config(hidden=(300, 300), gated=True, x_shape=(1, 28, 28))
    import json

    assert pyrovae.Config.from_dict(json.loads(cfg.to_json())) == cfg
    cases = [
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"z_dim": 0}, "z_dim must be a positive integer"),
        ({"likelihood": "poisson"}, "unknown likelihood"),
        ({"net": "resnet"}, "unknown net 'resnet'; choose from mlp, conv"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pyrovae.Config(**kwargs).validate()
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        pyrovae.Config.from_dict({"colour": "red"})
    assert pyro.get_param_store().keys() == set()


def test_stock_pyro_svi_trains_the_vae():
    # vae.model / vae.guide register their networks with Pyro (pyro_method), so plain SVI, as in
    # Pyro's own VAE example, trains them.
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    x = pyrovae.data.load("digits", "train", binarize="threshold").images
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(64,), z_dim=4))
    before = pyrovae.elbo(vae.model, vae.guide, x[:300], num_particles=10).mean()
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    for i in range(150):
        svi.step(x[(i * 64) % 1152 : (i * 64) % 1152 + 64])
    after = pyrovae.elbo(vae.model, vae.guide, x[:300], num_particles=10).mean()
    assert after > before + 10
    names = pyro.get_param_store().keys()
    assert any(n.startswith("encoder") for n in names) and any(
        n.startswith("decoder") for n in names
    )
