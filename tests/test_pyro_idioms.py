"""Pairs written the way Pyro's own examples and tutorials write them, through fit, elbo, iwae
and log_likelihood: which path each takes (captured or eager; vectorized or repeated scoring),
and that every path computes the same thing."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoNormal
from regression import Regression, elbo_per_datapoint, regression_data
from torch import nn

import pyrovae
from pyrovae.capture import (
    NoSync,
    NoSyncTrace_ELBO,
    NoSyncTraceEnum_ELBO,
    NoSyncTraceGraph_ELBO,
    NoSyncTraceMeanField_ELBO,
    no_sync,
)
from pyrovae.evaluation import inspect_pair, log_weights

D = 64  # 8×8 digits, flattened


def _digits(n=120, split="train"):
    return pyrovae.data.load("digits", split, binarize="threshold").images[:n].reshape(n, D)


def _fast_log(caplog):
    messages = [r.getMessage() for r in caplog.records if r.name == "pyrovae"]
    replayed = any("replaying the captured loss" in m for m in messages)
    eager = [m for m in messages if "trains eagerly" in m]
    return replayed, eager


# --- Pyro's VAE tutorial: plain functions, pyro.module ------------------------------------


class Encoder(nn.Module):
    def __init__(self, z_dim=4, hidden=32):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (
            nn.Linear(D, hidden),
            nn.Linear(hidden, z_dim),
            nn.Linear(hidden, z_dim),
        )

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim=4, hidden=32):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, D)

    def forward(self, z):
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


def tutorial_pair(z_dim=4, plate="data"):
    encoder, decoder = Encoder(z_dim), Decoder(z_dim)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate(plate, x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                        obs=x.reshape(-1, D))  # fmt: skip

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate(plate, x.shape[0]):
            z_loc, z_scale = encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    return model, guide, encoder, decoder


LOSSES = {
    "elbo": None,
    "meanfield": TraceMeanField_ELBO(),
    "vectorized-3": Trace_ELBO(num_particles=3, vectorize_particles=True),
}


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
def test_tutorial_pair_trains_on_the_fast_path_and_scores(loss, caplog):
    model, guide, *_ = tutorial_pair()
    x = _digits()
    before = pyrovae.elbo(model, guide, x, num_particles=20).mean()
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        pyrovae.fit(model, guide, x, epochs=15, batch_size=40, loss=loss, progress=False,
                    device="cpu", seed=0)  # fmt: skip
    replayed, eager = _fast_log(caplog)
    assert replayed and not eager
    after = pyrovae.elbo(model, guide, x, num_particles=20).mean()
    assert after > before + 3
    ll = pyrovae.log_likelihood(model, guide, x, num_samples=200)
    assert ll.shape == (120,) and (ll >= pyrovae.elbo(model, guide, x, num_particles=50) - 1).all()
    assert inspect_pair(model, guide, (x,)).vectorized


def test_fast_and_eager_agree_for_the_tutorial_pair():
    results = []
    for fast in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide, encoder, _ = tutorial_pair()
        h = pyrovae.fit(model, guide, _digits(), epochs=3, batch_size=40, progress=False,
                        fast=fast, seed=3, device="cpu")  # fmt: skip
        results.append((h.train_elbo, encoder.fc1.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-3)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


class CausalEffectELBO(Trace_ELBO):
    """As CEVAE's TraceCausalEffect_ELBO: a Trace_ELBO subclass overriding ``loss``."""

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs):
        return float(self.differentiable_loss(model, guide, *args, **kwargs))


class NoSyncCausalEffectELBO(NoSync, CausalEffectELBO):
    """The twin the eager-fallback message suggests."""


def test_a_trace_elbo_subclass_trains_eagerly_saying_it_has_no_twin(caplog):
    model, guide, *_ = tutorial_pair()
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        pyrovae.fit(model, guide, _digits(40), epochs=1, batch_size=20, loss=CausalEffectELBO(),
                    progress=False, device="cpu")  # fmt: skip
    replayed, eager = _fast_log(caplog)
    assert not replayed and len(eager) == 1
    assert "the loss class CausalEffectELBO has no no-sync twin" in eager[0]
    assert "class NoSyncCausalEffectELBO(pyrovae.capture.NoSync, CausalEffectELBO)" in eager[0]
    assert "remove the value read" not in eager[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyrovae"):  # the suggested twin replays
        pyrovae.fit(model, guide, _digits(40), epochs=1, batch_size=20, progress=False,
                    loss=NoSyncCausalEffectELBO(), device="cpu")  # fmt: skip
    assert _fast_log(caplog) == (True, [])


def test_a_plate_of_another_name_is_found():
    model, guide, *_ = tutorial_pair(plate="batch")
    x = _digits(30)
    pyrovae.fit(model, guide, x, epochs=1, batch_size=10, progress=False, device="cpu")
    assert inspect_pair(model, guide, (x,)).plate == "batch"
    assert pyrovae.log_likelihood(model, guide, x, num_samples=10).shape == (30,)
    assert pyrovae.iwae(model, guide, x, 5).shape == (30,)


def test_no_plate_over_the_datapoints_names_the_plates_seen():
    def model(x):
        with pyro.plate("pixels", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[0], x.shape[1]]).to_event(0),
                        obs=x)  # fmt: skip

    with pytest.raises(ValueError, match=r"no plate over the \d+ datapoints.*'pixels' \(size 5\)"):
        pyrovae.log_likelihood(model, lambda x: None, torch.zeros(3, 5), num_samples=2)


# --- Pyro's CVAE example: boolean masks, .view(batch_size, -1), ys=None, a plate without size


class CVAE(nn.Module):
    """Pyro's examples/cvae model/guide, on 8×8 images: the lower half from the upper half."""

    def __init__(self, z_dim=4, hidden=32):
        super().__init__()
        self.prior_net = nn.Sequential(
            nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim)
        )
        self.recognition_net = nn.Sequential(nn.Linear(2 * D, hidden), nn.ReLU(),
                                             nn.Linear(hidden, 2 * z_dim))  # fmt: skip
        self.generation_net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(),
                                            nn.Linear(hidden, D), nn.Sigmoid())  # fmt: skip

    def _gauss(self, h):
        loc, s = h.chunk(2, -1)
        return loc, nn.functional.softplus(s) + 1e-3

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_scale = self._gauss(self.prior_net(xs))
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                mask_loc = loc[(xs == -1).view(-1, D)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1),
                            obs=mask_ys)  # fmt: skip
            else:
                pyro.deterministic("y", loc.detach())
        return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self._gauss(self.prior_net(xs))
            else:
                loc, scale = self._gauss(self.recognition_net(torch.cat([xs, ys], -1)))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _cvae_data(n=120):
    ys = _digits(n)
    xs = ys.clone()
    xs[:, D // 2 :] = -1  # the lower half is hidden: the model predicts it
    return xs, ys


def test_masked_cvae_trains_and_scores_on_the_repeated_path(caplog):
    cvae = CVAE()
    xs, ys = _cvae_data()
    before = pyrovae.log_likelihood(cvae.model, cvae.guide, (xs, ys), num_samples=50).mean()
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        pyrovae.fit(cvae.model, cvae.guide, (xs, ys), epochs=20, batch_size=40, progress=False,
                    device="cpu", seed=0)  # fmt: skip
    replayed, eager = _fast_log(caplog)
    # Boolean masks have data-dependent shapes: torch 2.14 traces them (replayed, the shapes
    # recomputed each step); torch 2.11 refuses, and the log then names the reason.
    assert (replayed and not eager) or (len(eager) == 1 and "data-dependent" in eager[0])
    layout = inspect_pair(cvae.model, cvae.guide, (xs, ys))
    assert not layout.vectorized and layout.plate == "data"
    after = pyrovae.log_likelihood(cvae.model, cvae.guide, (xs, ys), num_samples=50)
    assert after.shape == (120,) and after.mean() > before + 3
    elbo = pyrovae.elbo(cvae.model, cvae.guide, (xs, ys), num_particles=20)
    assert (after >= elbo - 1).all()
    assert pyrovae.iwae(cvae.model, cvae.guide, (xs, ys), 1).shape == (120,)


# --- both scoring paths compute the same estimator ----------------------------------------


def test_repeated_and_vectorized_paths_agree_exactly_with_the_exact_posterior():
    # With q = p(z|x) every weight is log p(x): both paths must give it to rounding.
    lg = LinearGaussian()
    x = lg.data(6)
    for vectorized in (True, False):
        lw = log_weights(lg.model, lg.exact_guide, x, num_particles=7, max_plate_nesting=1,
                         vectorized=vectorized)  # fmt: skip
        assert lw.shape == (7, 6)
        torch.testing.assert_close(lw, lg.log_px(x).expand(7, 6), atol=1e-9, rtol=0)


def test_repeated_and_vectorized_paths_agree_within_monte_carlo_error():
    lg = LinearGaussian(shift=0.5, widen=1.5)
    x = lg.data(5)
    means, ses = [], []
    for vectorized in (True, False):
        lw = log_weights(lg.model, lg.guide, x, num_particles=20000, max_plate_nesting=1,
                         vectorized=vectorized)  # fmt: skip
        means.append(lw.mean(0))
        ses.append(lw.std(0) / 20000**0.5)
    z = (means[0] - means[1]) / (ses[0] ** 2 + ses[1] ** 2).sqrt()
    assert z.abs().max() < 4.5  # 5 datapoints, two independent estimates of the ELBO


# --- a plate that subsamples the full data itself ------------------------------------------


def _subsample_pair(encoder, decoder, size=10):
    def model(data):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(data), subsample_size=size) as idx:
            z = pyro.sample("z", dist.Normal(data.new_zeros(len(idx), 4), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(decoder(z), validate_args=False).to_event(1),
                        obs=data[idx])  # fmt: skip

    def guide(data):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(data), subsample_size=size) as idx:
            loc, scale = encoder(data[idx])
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def test_subsample_plates_are_refused_by_fit_with_advice_and_scored():
    model, guide, encoder, decoder = tutorial_pair()
    sub_model, sub_guide = _subsample_pair(encoder, decoder)
    x = _digits(25)  # not a multiple of the subsample size: the last chunk is padded
    with pytest.raises(ValueError, match=r"subsamples its plate 'data'.*batch_size=10"):
        pyrovae.fit(sub_model, sub_guide, x, epochs=1, progress=False, device="cpu")
    assert inspect_pair(sub_model, sub_guide, (x,)).subsample == 10
    torch.manual_seed(0)
    ours = pyrovae.log_likelihood(sub_model, sub_guide, x, num_samples=3000)
    torch.manual_seed(1)
    batched = pyrovae.log_likelihood(model, guide, x, num_samples=3000)
    assert ours.shape == (25,)
    torch.testing.assert_close(ours, batched, atol=0.5, rtol=0)  # the same pair, IS error only


# --- M2: enumeration with TraceEnum_ELBO, several objectives, one optimizer ----------------


class M2(nn.Module):
    def __init__(self, z_dim=4, hidden=32, classes=10):
        super().__init__()
        self.classes, self.z_dim = classes, z_dim
        self.classify = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.encode = nn.Sequential(nn.Linear(D + classes, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 2 * z_dim))  # fmt: skip
        self.decode = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.ReLU(),
                                    nn.Linear(hidden, D))  # fmt: skip

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(self.z_dim), 1.0).to_event(1))
            alpha = xs.new_ones(self.classes) / self.classes
            ys = pyro.sample("y", dist.OneHotCategorical(alpha), obs=ys)
            logits = self.decode(_cat(z, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.classify(xs)))
            loc, s = self.encode(_cat(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))

    def model_classify(self, xs, ys):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]), poutine_scale(10.0):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.classify(xs)), obs=ys)

    def guide_classify(self, xs, ys):
        pass


def _cat(a, b):
    # [a, b] along the last dim, broadcasting the batch dims (y is enumerated on its own dim)
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


def poutine_scale(s):
    return pyro.poutine.scale(scale=s)


def _m2_data():
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    x = data.images.reshape(len(data), D)
    y = nn.functional.one_hot(torch.as_tensor(data.labels), 10).float()
    return x[:200], (x[:100], y[:100])


def test_m2_several_objectives_one_optimizer_enumerated_on_the_fast_path(caplog):
    m2 = M2()
    unlabelled, labelled = _m2_data()
    objectives = [
        pyrovae.Objective(m2.model, pyro.infer.config_enumerate(m2.guide), unlabelled,
                          loss=TraceEnum_ELBO(max_plate_nesting=1), name="unsup"),
        pyrovae.Objective(m2.model, m2.guide, labelled, loss=Trace_ELBO(), name="sup",
                          batch_size=25),
        pyrovae.Objective(m2.model_classify, m2.guide_classify, labelled, name="aux",
                          batch_size=25),
    ]  # fmt: skip
    state = pyrovae.TrainState()
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        history = pyrovae.fit(objectives, epochs=4, batch_size=50, progress=False, device="cpu",
                              optimizer=torch.optim.Adam, optim_args={"betas": (0.95, 0.999)},
                              state=state, seed=0)  # fmt: skip
    replayed, eager = _fast_log(caplog)
    assert replayed and not eager, eager
    assert set(history.parts[0]) == {"unsup", "sup", "aux"}
    assert history.train_elbo == [p["unsup"] for p in history.parts]
    assert history.train_elbo[-1] > history.train_elbo[0]
    # one optimizer across objectives, epochs and steps: 4 steps per epoch (200 / 50)
    steps = {float(s["step"]) for s in state.optimizer["state"].values()}
    assert steps == {16.0}
    assert state.optimizer["param_groups"][0]["betas"] == (0.95, 0.999)


def _loss_and_grads(loss, model, guide, x, params):
    for p in params:
        p.grad = None
    pyro.set_rng_seed(5)
    value = loss.differentiable_loss(model, guide, x)
    value.backward()
    return value.detach(), torch.cat([p.grad.flatten() for p in params])


def test_no_sync_losses_match_pyros_value_and_gradients():
    m2 = M2()
    unlabelled, _ = _m2_data()
    model, guide, encoder, decoder = tutorial_pair()
    tutorial_params = [*encoder.parameters(), *decoder.parameters()]
    cases = [
        (TraceEnum_ELBO(max_plate_nesting=1), m2.model, pyro.infer.config_enumerate(m2.guide),
         list(m2.parameters()), NoSyncTraceEnum_ELBO),
        (TraceMeanField_ELBO(), model, guide, tutorial_params, NoSyncTraceMeanField_ELBO),
        (Trace_ELBO(num_particles=4, vectorize_particles=True), model, guide, tutorial_params,
         NoSyncTrace_ELBO),
    ]  # fmt: skip
    for stock, model_, guide_, params, twin in cases:
        ours = no_sync(stock)
        assert type(ours) is twin and ours.num_particles == stock.num_particles
        a = _loss_and_grads(stock, model_, guide_, unlabelled[:20], params)
        b = _loss_and_grads(ours, model_, guide_, unlabelled[:20], params)
        torch.testing.assert_close(a, b)


def test_jit_variants_map_to_the_no_sync_twins():
    # fit captures the loss itself: a Jit loss copied from Pyro's examples gets the plain twin
    cases = [(JitTrace_ELBO(num_particles=2), NoSyncTrace_ELBO),
             (JitTraceEnum_ELBO(max_plate_nesting=1), NoSyncTraceEnum_ELBO),
             (JitTraceGraph_ELBO(), NoSyncTraceGraph_ELBO)]  # fmt: skip
    for jit, twin in cases:
        ours = no_sync(jit)
        assert type(ours) is twin and ours.num_particles == jit.num_particles
        assert ours.max_plate_nesting == jit.max_plate_nesting


# --- guides that are not amortized; Predictive ----------------------------------------------


def test_global_latents_in_a_minibatch_scaled_plate_train_with_an_autoguide():
    # an AutoNormal over global latents only is amortized enough: nothing per datapoint
    x, y = regression_data()
    pyro.set_rng_seed(0)
    model = Regression(len(x))
    guide = AutoNormal(model)
    history = pyrovae.fit(model, guide, (x, y), val_data=(x, y), epochs=30, batch_size=100,
                          lr=0.05, progress=False, device="cpu", seed=0)  # fmt: skip
    # within 0.1 of the truth: the posterior sd is under 0.01, but SVI's last iterate (one
    # particle, lr 0.05) wanders by a few hundredths
    median = guide.median()
    for name, truth in (("coeff", 2.0), ("bias", 0.5), ("scale", 0.3)):
        assert abs(float(median[name]) - truth) < 0.1, (name, float(median[name]))
    # the ELBO per datapoint is the whole data's over n, each batch's loss scaled back by
    # B / n (not the scaled-up batch loss over B, 20× as large): within 0.02 nats of a
    # 100-particle estimate on all the data at once (≈ the Gaussian log-density at the truth)
    exact = elbo_per_datapoint(model, guide, x, y)
    assert abs(history.val_elbo[-1] - exact) < 0.02, (history.val_elbo[-1], exact)
    assert abs(history.train_elbo[-1] - exact) < 0.05, (history.train_elbo[-1], exact)
    with pytest.raises(ValueError, match="a global latent needs another estimator"):
        pyrovae.log_likelihood(model, guide, (x[:10], y[:10]), num_samples=10)


def test_an_autoguide_is_refused_with_an_explanation():
    model, *_ = tutorial_pair()
    guide = AutoNormal(model)
    with pytest.raises(ValueError, match="not amortized"):
        pyrovae.fit(model, guide, _digits(30), epochs=1, batch_size=7, progress=False)


@pytest.mark.parametrize("kind", ["vae", "hvae"])
def test_predictive_samples_the_prior_and_the_posterior_predictive(kind):
    cfg = pyrovae.Config(x_shape=(1, 8, 8), hidden=(16,), z_dim=3, model=kind)
    vae = pyrovae.build_vae(cfg)
    z = "z" if kind == "vae" else "z2"
    prior = Predictive(vae.model, num_samples=5)()
    assert prior[z].shape == (5, 1, 3) and prior["x"].shape == (5, 1, 1, 8, 8)
    assert set(prior["x"].unique().tolist()) <= {0.0, 1.0}
    many = Predictive(vae.model, num_samples=2)(None, 7)  # model(x=None, n=7)
    assert many["x"].shape == (2, 7, 1, 8, 8)
    x = pyrovae.data.load("digits", "test", binarize="threshold").images[:4]
    post = Predictive(vae.model, guide=vae.guide, num_samples=6)(x)
    assert post[z].shape == (6, 4, 3)
    # the observed x is returned as observed; uncondition draws x ~ p(x|z), z ~ q(z|x)
    draws = Predictive(pyro.poutine.uncondition(vae.model), guide=vae.guide, num_samples=6)(x)
    assert draws["x"].shape == (6, 4, 1, 8, 8) and not torch.equal(draws["x"][0], x)
