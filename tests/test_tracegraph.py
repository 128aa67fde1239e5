"""TraceGraph_ELBO in :func:`pyrovae.fit`: a discrete latent trained with score-function
gradients and the guide's baselines (neural and decaying-average), as Pyro's AIR example does;
Pyro losses that cannot train a pair refused up front; baselines under a loss that ignores them
warned about."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import (
    JitTraceGraph_ELBO,
    RenyiELBO,
    ReweightedWakeSleep,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
)
from torch import nn

import pyrovae
from pyrovae.capture import NoSyncTraceGraph_ELBO, capture, no_sync

D = 6


class Baseline(nn.Module):
    """A neural baseline: one number per datapoint, the shape of the site's downstream cost."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(D, 1)

    def forward(self, x):
        return self.net(x).squeeze(-1)  # (N,)


class Present(nn.Module):
    """An object is present or not (a Bernoulli, not reparameterizable, as AIR's ``z_pres``);
    if present, x is decoded from a Gaussian z."""

    def __init__(self, baseline: str = "neural"):
        super().__init__()
        self.encode = nn.Linear(D, 1 + 2 * 2)
        self.decode = nn.Linear(2, D)
        self.baseline = Baseline()
        self.kind = baseline

    def model(self, x):
        pyro.module("present", self)
        with pyro.plate("data", x.shape[0]):
            present = pyro.sample("present", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            loc = self.decode(z) * present.unsqueeze(-1)  # (N, D)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("present", self)
        out = self.encode(x)  # (N, 5)
        if self.kind == "neural":
            baseline = {"nn_baseline": self.baseline, "nn_baseline_input": x}
        else:
            baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("present", dist.Bernoulli(logits=out[:, 0]),
                        infer={"baseline": baseline})  # fmt: skip
            pyro.sample("z", dist.Normal(out[:, 1:3], out[:, 3:].exp()).to_event(1))


def _data(n=60):
    torch.manual_seed(1)
    present = torch.rand(n, 1) < 0.5
    return torch.randn(n, D) * 0.3 + 2.0 * present  # (n, D)


def _grad(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)  # a loss ignoring the baseline


def _value_and_grads(step, pair, x):
    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(7)
    value = step(x)
    value = torch.as_tensor(value).detach().double()
    return value, torch.cat([_grad(p).flatten() for p in pair.parameters()])


def test_the_twin_gives_pyros_value_and_gradients_with_a_neural_baseline():
    pair, x = Present(), _data(20)
    stock = TraceGraph_ELBO(num_particles=3)
    twin = no_sync(stock)
    assert type(twin) is NoSyncTraceGraph_ELBO and twin.num_particles == 3

    def ours(x):
        loss = twin.differentiable_loss(pair.model, pair.guide, x)
        loss.backward()
        return loss

    a = _value_and_grads(lambda x: stock.loss_and_grads(pair.model, pair.guide, x), pair, x)
    b = _value_and_grads(ours, pair, x)
    torch.testing.assert_close(a, b)
    assert a[1].abs().sum() > 0 and pair.baseline.net.weight.grad.abs().sum() > 0
    with torch.no_grad():  # scoring: −ELBO, as Pyro's loss
        pyro.set_rng_seed(7)
        score = float(twin.differentiable_loss(pair.model, pair.guide, x))
    pyro.set_rng_seed(7)
    assert score == pytest.approx(stock.loss(pair.model, pair.guide, x), rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [TraceGraph_ELBO(), Trace_ELBO(),
     TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)],
    ids=["tracegraph", "trace", "traceenum"],
)  # fmt: skip
def test_the_replayed_loss_gives_the_eager_value_and_gradients(loss):
    # score-function terms live on stop-gradients (a surrogate less its detached self, Dice's
    # exp(log q − log q.detach()), the baseline's detached cost): the replay keeps every one;
    # TraceGraph_ELBO's with the provenance noted on the eager step
    pair, x = Present(), _data(20)
    elbo_module = no_sync(loss)(pair.model, pair.guide)
    elbo_module(x)  # the first, eager step
    replayed = capture(elbo_module, [pair], (x,))

    a = _value_and_grads(lambda x: _backward(elbo_module(x)), pair, x)
    b = _value_and_grads(lambda x: _backward(replayed(x)), pair, x)
    torch.testing.assert_close(a, b)
    assert pair.encode.weight.grad.abs().sum() > 0


def _backward(loss):
    loss.backward()
    return loss


def _fit(pair, x, loss, caplog, **kwargs):
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        history = pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=3, batch_size=20,
                              lr=0.01, progress=False, device="cpu", seed=0, **kwargs)  # fmt: skip
    return history, [r.getMessage() for r in caplog.records if r.name == "pyrovae"]


def test_tracegraph_trains_its_neural_baseline_on_the_fast_path(caplog):
    pair, x = Present(), _data()
    before = [p.detach().clone() for p in pair.baseline.parameters()]
    history, said = _fit(pair, x, TraceGraph_ELBO(), caplog)
    assert any("replaying the captured loss" in m for m in said), said
    assert not any("eagerly" in m for m in said), said
    assert all(torch.isfinite(torch.tensor(history.train_elbo)))
    after = pair.baseline.parameters()
    assert all(not torch.equal(b, p) for b, p in zip(before, after, strict=True))


def test_a_decaying_average_baseline_trains_eagerly_with_one_reason(caplog):
    pair, x = Present("decaying"), _data()
    history, said = _fit(pair, x, JitTraceGraph_ELBO(), caplog)
    eager = [m for m in said if "trains eagerly" in m]
    assert len(eager) == 1 and "decaying-average baseline" in eager[0], said
    name = "__baseline_avg_downstream_cost_present"
    assert name in pyro.get_param_store()  # Pyro's average, updated every step
    assert len(history.train_elbo) == 3


@pytest.mark.parametrize(
    "loss, instead",
    [(RenyiELBO(alpha=0.0), "pyrovae.IWAE"), (ReweightedWakeSleep(), "TraceGraph_ELBO"),
     (object(), "Trace_ELBO")],
)  # fmt: skip
def test_losses_that_cannot_train_are_refused_before_the_first_step(loss, instead):
    pair, x = Present(), _data()
    before = [p.detach().clone() for p in pair.parameters()]
    name = type(loss).__name__
    with pytest.raises(ValueError, match=rf"^loss={name}\(...\) cannot train .*use {instead}"):
        pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=1, progress=False, device="cpu")
    assert all(torch.equal(b, p) for b, p in zip(before, pair.parameters(), strict=True))


def test_baselines_under_a_loss_that_ignores_them_are_warned_about_once(caplog):
    pair, x = Present(), _data()
    _, said = _fit(pair, x, Trace_ELBO(), caplog)
    warned = [m for m in said if "infer={'baseline': ...}" in m]
    assert len(warned) == 1 and "'present'" in warned[0] and "TraceGraph_ELBO" in warned[0]
