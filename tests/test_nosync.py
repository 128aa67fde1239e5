"""Pyro's losses in fit, every one: trained as its no-sync twin (Pyro's values and gradients,
on the fast path), or refused before the first step with one line naming the loss, as the user
wrote it, and what to use; on both engines."""

import pyro
import pytest
import torch
from air_pair import SmallAIR, canvases
from pairs import VAE
from pyro.contrib.gp.kernels import RBF
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    RenyiELBO,
    Trace_ELBO,
    Trace_MMD,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
    TraceTMC_ELBO,
)
from test_tracegraph import Present, _data

import pyrovae
from pyrovae.nosync import (
    NoSyncTrace_ELBO,
    NoSyncTrace_MMD,
    NoSyncTraceGraph_ELBO,
    NoSyncTraceTMC_ELBO,
    no_sync,
    spelled,
)


def _pair(name: str):
    # a VAE, the AIR pair (written for one particle at a time), or a one-object pair whose
    # neural baseline sees the data only (written to broadcast over vectorized particles)
    if name == "vae":
        torch.manual_seed(1)
        return VAE(x_dim=16, z_dim=2, hidden=8), (torch.rand(32, 16) < 0.3).float()
    if name == "present":
        return Present(), _data(32)
    return SmallAIR(), canvases(32)[0]


REFUSED = [
    (RenyiELBO(alpha=0.5), "vae", r"RenyiELBO\(...\) cannot train .*; use pyrovae\.IWAE\(k\)"),
    (TraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True), "vae",
     r"TraceTailAdaptive_ELBO\(num_particles=4, vectorize_particles=True\) cannot train a pair "
     r"here: it estimates gradients only .*; use pyrovae\.IWAE\(k\)"),
    (TraceMeanField_ELBO(), "air",
     r"TraceMeanField_ELBO\(\) needs reparameterized latent sites, and these have no rsample: "
     r"guide 'z_pres_0' \(Bernoulli\), guide 'z_pres_1' \(Bernoulli\); use TraceGraph_ELBO\(\)"),
    (Trace_MMD(kernel=RBF(4), vectorize_particles=False), "air",
     r"Trace_MMD\(num_particles=10\) needs reparameterized latent sites, and these have no "
     r"rsample: model 'z_pres_0' \(Bernoulli\).*use TraceGraph_ELBO"),
    (Trace_MMD(kernel=RBF(4)), "air",  # the pair's reshapes do not broadcast over particles
     r"Trace_MMD\(num_particles=10, vectorize_particles=True\): the pair fails with its "
     r"particles vectorized \(RuntimeError: stack expects .*pass vectorize_particles=False$"),
    (Trace_ELBO(max_plate_nesting=0), "vae",
     r'Trace_ELBO\(max_plate_nesting=0\): at site "latent", plate stack overflow; pass '
     r"max_plate_nesting=1, or leave it out for Pyro to guess$"),
    (TraceEnum_ELBO(max_plate_nesting=0), "vae",
     r'TraceEnum_ELBO\(max_plate_nesting=0\): at site "latent", plate stack overflow; pass '
     r"max_plate_nesting=1"),
    (TraceGraph_ELBO(num_particles=2, vectorize_particles=True), "present",
     r"TraceGraph_ELBO\(num_particles=2, vectorize_particles=True\): Expected baseline at site "
     r"present to be \(2, 32\) instead got torch.Size\(\[32\]\); .*pass "
     r"vectorize_particles=False"),
]  # fmt: skip


def _lightning_fit(pair, x, loss):
    from pyrovae.lightning import fit

    fit(pair.model, pair.guide, x, loss=loss, epochs=1, batch_size=32, accelerator="cpu",
        devices=1, enable_progress_bar=False)  # fmt: skip


def _fit(pair, x, loss):
    pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=1, batch_size=32, progress=False,
                device="cpu")  # fmt: skip


def _ids(value) -> str:
    return spelled(value) if isinstance(value, pyro.infer.ELBO) else ""


@pytest.mark.parametrize("engine", [_fit, _lightning_fit], ids=["fit", "lightning"])
@pytest.mark.parametrize("loss, pair, message", REFUSED, ids=_ids)
def test_losses_that_cannot_train_are_refused_in_one_line_before_any_step(loss, pair, message,
                                                                          engine):  # fmt: skip
    pair, x = _pair(pair)
    before = [p.detach().clone() for p in pair.parameters()]
    with pytest.raises(ValueError, match=f"^loss={message}") as info:
        engine(pair, x, loss)
    assert "\n" not in str(info.value)
    assert all(torch.equal(b, p) for b, p in zip(before, pair.parameters(), strict=True))


def test_a_mean_field_loss_refuses_a_discrete_guide_also_without_validation():
    # Pyro checks reparameterization only under validation: without it, a Bernoulli site's
    # score-function term would silently be dropped from the gradient
    pair, x = _pair("air")
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="needs reparameter"):
        _fit(pair, x, TraceMeanField_ELBO())


TRAINED = [  # (loss, pair, its twin, the Pyro loss whose values the twin gives)
    (TraceTMC_ELBO(strict_enumeration_warning=False), "vae", NoSyncTraceTMC_ELBO, None),
    (Trace_MMD(kernel=RBF(2), num_particles=3), "vae", NoSyncTrace_MMD, None),
    (Trace_ELBO(num_particles=3, vectorize_particles=True), "vae", NoSyncTrace_ELBO, None),
    (TraceGraph_ELBO(num_particles=2), "air", NoSyncTraceGraph_ELBO, None),
    (JitTrace_ELBO(num_particles=2), "vae", NoSyncTrace_ELBO, Trace_ELBO(num_particles=2)),
    (JitTraceGraph_ELBO(), "air", NoSyncTraceGraph_ELBO, TraceGraph_ELBO()),
]


def _value_and_grads(pair, x, step):
    pair.zero_grad(set_to_none=True)
    pyro.set_rng_seed(5)
    value = step()
    return torch.as_tensor(value).detach().double(), torch.cat(
        [p.grad.flatten() for p in pair.parameters() if p.grad is not None]
    )


def _stock_step(loss, pair, x):
    if isinstance(loss, TraceGraph_ELBO):  # Pyro's has no differentiable_loss
        return lambda: loss.loss_and_grads(pair.model, pair.guide, x)

    def step():
        value = loss.differentiable_loss(pair.model, pair.guide, x)
        value.backward()
        return value

    return step


@pytest.mark.parametrize("loss, pair, twin, pyros", TRAINED, ids=_ids)
def test_the_other_losses_train_on_the_fast_path_with_pyros_values(loss, pair, twin, pyros,
                                                                   caplog):  # fmt: skip
    # (a Jit loss is compared with its plain class: fit captures the loss itself)
    pair, x = _pair(pair)
    ours = no_sync(loss)
    assert type(ours) is twin and ours.num_particles == loss.num_particles
    stock = _value_and_grads(pair, x, _stock_step(pyros or loss, pair, x))
    mine = _value_and_grads(
        pair, x, lambda: _backward(ours.differentiable_loss(pair.model, pair.guide, x))
    )
    torch.testing.assert_close(stock, mine)
    with caplog.at_level("INFO", logger="pyrovae"):
        history = pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=2, batch_size=16,
                              progress=False, device="cpu")  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.name == "pyrovae"]
    assert any("replaying the captured loss" in m for m in said), said
    assert torch.isfinite(torch.tensor(history.train_elbo)).all()


def _backward(loss):
    loss.backward()
    return loss


def test_a_vectorized_loss_that_cannot_be_replayed_keeps_its_reason(caplog):
    # the capture's own refusal (a decaying-average baseline) is not reworded as a failure to
    # vectorize: the pair trains eagerly, saying why
    pair, x = Present("decaying"), _data(40)
    loss = TraceGraph_ELBO(num_particles=2, vectorize_particles=True)
    with caplog.at_level("INFO", logger="pyrovae"):
        history = pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=2, batch_size=20,
                              progress=False, device="cpu")  # fmt: skip
    (eager,) = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert "'present' use a decaying-average baseline" in eager
    assert torch.isfinite(torch.tensor(history.train_elbo)).all()
