"""The guides: the flow posterior is a normalized density whose own samples it scores exactly,
it trains inside a VAE, survives a checkpoint, and refuses sizes it cannot use."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

import pyrovae
from pyrovae.guides import GUIDES, FlowPosterior, GaussianPosterior, make_posterior


def _flow(z_dim=2, seed=0):
    torch.manual_seed(seed)
    q = FlowPosterior(z_dim, flows=3, hidden=(16, 16))
    with torch.no_grad():  # move the transforms well away from their near-identity start
        for p in q.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return q


def test_flow_posterior_integrates_to_one_and_scores_its_samples():
    q = _flow()
    loc, scale = torch.tensor([[0.3, -0.5]]), torch.tensor([[0.8, 1.3]])
    d = q(loc, scale)  # batch (1,) event (2,)
    assert d.batch_shape == (1,) and d.event_shape == (2,)
    t = torch.linspace(-10, 10, 801)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 1, 2)  # (n², 1, 2)
    with torch.no_grad():
        # values the guide did not sample: scored through the (sequential) inverse
        p = d.log_prob(zz).double().exp().sum() * float(t[1] - t[0]) ** 2
    assert abs(float(p) - 1) < 2e-3
    z = d.rsample((500,))  # (500, 1, 2): cached log-density of its own samples...
    cached = d.log_prob(z)
    fresh = d.log_prob(z.detach().clone())  # ...equals the inverse's
    assert torch.allclose(cached, fresh, atol=1e-4)
    assert not torch.allclose(cached, GaussianPosterior()(loc, scale).log_prob(z), atol=0.1)


def test_flow_guide_sites_and_vectorized_particles():
    config = pyrovae.Config(x_shape=(1, 8, 8), hidden=(32,), z_dim=3, guide="flow", flows=2)
    vae = pyrovae.build_vae(config)
    assert isinstance(vae.posterior, FlowPosterior)
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    tr = poutine.trace(vae.guide).get_trace(x)
    site = tr.nodes["z"]
    assert site["value"].shape == (5, 3) and site["fn"].has_rsample
    assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    with torch.no_grad():
        lw = pyrovae.evaluation.log_weights(vae.model, vae.guide, x, num_particles=7,
                                            max_plate_nesting=1)  # fmt: skip
    assert lw.shape == (7, 5) and torch.isfinite(lw).all()


def test_flow_guide_trains_and_round_trips(tmp_path):
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    test = pyrovae.data.load("digits", "test", binarize="threshold").images[:60]
    config = pyrovae.Config(x_shape=data.x_shape, hidden=(64,), z_dim=4, guide="flow",
                            binarize="threshold")  # fmt: skip
    vae = pyrovae.build_vae(config)
    before = float(pyrovae.elbo(vae.model, vae.guide, test, num_particles=5).mean())
    pyrovae.fit(vae.model, vae.guide, data, epochs=4, batch_size=64, lr=3e-3, progress=False,
                seed=0)  # fmt: skip
    after = pyrovae.elbo(vae.model, vae.guide, test, num_particles=5)
    assert float(after.mean()) > before + 10  # it learns
    flow_grads = [p.grad for p in vae.posterior.parameters()]
    assert flow_grads and all(g is not None and g.abs().sum() > 0 for g in flow_grads)
    ll = pyrovae.log_likelihood(vae.model, vae.guide, test, num_samples=200)
    assert float(ll.mean()) > float(after.mean())  # the ELBO sits below log p(x)
    pyrovae.save_run(tmp_path, vae, config)
    loaded, _ = pyrovae.load_run(tmp_path)
    pyro.set_rng_seed(3)
    a = pyrovae.log_likelihood(vae.model, vae.guide, test, num_samples=30)
    pyro.set_rng_seed(3)
    b = pyrovae.log_likelihood(loaded.model, loaded.guide, test, num_samples=30)
    assert torch.equal(a, b)


def test_bad_guide_settings():
    with pytest.raises(ValueError, match="unknown guide 'iaf'; choose from normal, flow"):
        make_posterior("iaf", 3)
    with pytest.raises(ValueError, match="flows need z_dim >= 2"):
        FlowPosterior(1)
    with pytest.raises(ValueError, match=r"hidden sizes >= z_dim=5, got \(4,\)"):
        FlowPosterior(5, hidden=(4,))
    with pytest.raises(ValueError, match=r"flows \(the number of flow transforms\) must"):
        FlowPosterior(3, flows=0)
    with pytest.raises(ValueError, match="the flow guide needs z_dim >= 2"):
        pyrovae.Config(guide="flow", z_dim=1).validate()
    with pytest.raises(ValueError, match=r"hidden sizes \(8,\), which must each be >= z_dim=16"):
        pyrovae.Config(guide="flow", z_dim=16, hidden=(8,)).validate()
    with pytest.raises(ValueError, match="unknown guide 'iaf'"):
        pyrovae.Config(guide="iaf").validate()
    assert set(GUIDES) == {"normal", "flow"}
