"""An Attend-Infer-Repeat pair (tests/air_pair.py: Bernoulli ``z_pres`` with a baseline,
``z_where``, ``z_what``, a spatial transformer) trained with TraceGraph_ELBO on both engines,
replayed with Pyro's values and gradients, and scored; its baselines train only under a loss
that reads them; the AIR example's subsampling plate scored with pyrovae's message."""

import logging

import pyro
import pytest
import torch
from air_pair import SmallAIR, canvases
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

import pyrovae
from pyrovae.capture import capture, no_sync


def _fit(pair, x, loss, caplog, epochs=3):
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        history = pyrovae.fit(pair.model, pair.guide, x, loss=loss, epochs=epochs, batch_size=16,
                              lr=3e-3, progress=False, device="cpu", seed=0)  # fmt: skip
    return history, [r.getMessage() for r in caplog.records if r.name == "pyrovae"]


def _copy(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module) -> list[bool]:
    return [not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True)]


def test_the_replayed_air_loss_has_pyros_value_and_gradients():
    # two z_pres sites, masks, a neural baseline and a spatial transformer: one step of Pyro's
    # own TraceGraph_ELBO against the captured twin, under the same draws
    pair, (x, _) = SmallAIR(), canvases(16)
    module = no_sync(TraceGraph_ELBO())(pair.model, pair.guide)
    module(x)  # the eager first step (notes the provenance)
    replayed = capture(module, [pair], (x,))
    results = []
    for step in (lambda: TraceGraph_ELBO().loss_and_grads(pair.model, pair.guide, x),
                 lambda: _backward(replayed(x))):  # fmt: skip
        pair.zero_grad(set_to_none=True)
        pyro.set_rng_seed(3)
        value = float(torch.as_tensor(step()).detach())
        results.append((value, torch.cat([p.grad.flatten() for p in pair.parameters()])))
    (stock, stock_grad), (ours, our_grad) = results
    assert ours == pytest.approx(stock, rel=1e-5)
    torch.testing.assert_close(our_grad, stock_grad, rtol=1e-4, atol=1e-5)
    assert pair.baseline.net[0].weight.grad.abs().sum() > 0  # the baseline's own loss


def _backward(loss):
    loss.backward()
    return loss


def test_air_trains_its_neural_baseline_on_the_fast_path_and_scores(caplog):
    pair, (x, _) = SmallAIR(), canvases(48)
    before = _copy(pair.baseline)
    history, said = _fit(pair, x, TraceGraph_ELBO(), caplog)
    assert any("replaying the captured loss" in m for m in said), said
    assert not any("eagerly" in m or "infer={'baseline'" in m for m in said), said
    assert all(_changed(before, pair.baseline))
    assert torch.isfinite(torch.tensor(history.train_elbo)).all()
    torch.manual_seed(0)
    log_px = pyrovae.log_likelihood(pair.model, pair.guide, x[:16], num_samples=64)
    elbo = pyrovae.elbo(pair.model, pair.guide, x[:16], num_particles=8)
    assert log_px.shape == (16,) and torch.isfinite(log_px).all()
    assert float(log_px.mean()) > float(elbo.mean())  # the bound sits below the estimate


def test_air_trains_its_baseline_with_lightning():
    from pyrovae.lightning import fit

    pair, (x, _) = SmallAIR(), canvases(32)
    before = _copy(pair.baseline)
    trainer = fit(pair.model, pair.guide, x, epochs=2, batch_size=16, loss=TraceGraph_ELBO(),
                  accelerator="cpu", devices=1, enable_progress_bar=False)  # fmt: skip
    module = trainer.lightning_module
    assert module.step_loss is not module.elbo  # the second epoch replayed
    assert all(_changed(before, pair.baseline))
    log_px = pyrovae.log_likelihood(pair.model, pair.guide, x[:8], num_samples=16)
    assert torch.isfinite(log_px).all()


def test_under_trace_elbo_the_baseline_never_trains_and_is_warned_about(caplog):
    pair, (x, _) = SmallAIR(), canvases(32)
    before = _copy(pair.baseline)
    _, said = _fit(pair, x, Trace_ELBO(), caplog, epochs=2)
    (warned,) = [m for m in said if "infer={'baseline': ...}" in m]
    assert "'z_pres_0', 'z_pres_1'" in warned and "Trace_ELBO ignores" in warned
    assert not any(_changed(before, pair.baseline))
    assert any(_changed(_copy(SmallAIR().predict), pair.predict))  # the rest trained


def test_a_decaying_average_baseline_trains_eagerly_with_one_reason(caplog):
    pair, (x, _) = SmallAIR("decaying"), canvases(32)
    history, said = _fit(pair, x, TraceGraph_ELBO(), caplog, epochs=2)
    (eager,) = [m for m in said if "eagerly" in m]
    assert "'z_pres_0', 'z_pres_1' use a decaying-average baseline" in eager
    averages = [f"__baseline_avg_downstream_cost_z_pres_{t}" for t in range(2)]
    assert all(name in pyro.get_param_store() for name in averages)
    assert len(history.train_elbo) == 2


@pytest.mark.parametrize("score", ["elbo", "iwae", "log_likelihood"])
def test_scoring_the_examples_subsampling_plate_gives_pyrovaes_message(score):
    # Pyro's AIR guide: pyro.plate("data", N, subsample_size=batch_size) with batch_size 64, on
    # 40 canvases: Pyro's own error would be "subsample_size does not match len(subsample)"
    pair, (x, _) = SmallAIR(subsample_size=64), canvases(40)
    kwargs = {"elbo": {}, "iwae": {"k": 4}, "log_likelihood": {"num_samples": 4}}[score]
    with pytest.raises(ValueError) as info:
        getattr(pyrovae, score)(pair.model, pair.guide, x, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "the pair subsamples its plate 'data' itself (size 40, subsample_size 64); pyrovae.elbo, "
        "iwae and log_likelihood hand the pair batches"
    ), message
    assert message.endswith("and pass batch_size=64 to them")


def test_fit_names_the_examples_subsampling_plate_with_its_sizes():
    pair, (x, _) = SmallAIR(subsample_size=64), canvases(40)
    with pytest.raises(ValueError, match=r"subsample_size 64\); pyrovae.fit hands .* to fit$"):
        pyrovae.fit(pair.model, pair.guide, x, epochs=1, progress=False, device="cpu")


@pytest.mark.statistical
def test_a_pair_that_subsamples_its_own_plate_like_pyros_air_is_scored_one_trace_at_a_time():
    # Pyro's AIR guide subsamples its plate itself and reshapes its batch (.view(n, ...)), so
    # particles neither vectorize nor repeat in the batch: scoring draws them one trace at a
    # time; its rows are those of the same pair scored on plain batches, in the same order
    # (seeded, K=200 per canvas; the untrained pair's weights are heavy-tailed, so a row can be
    # off by nats, the median by about 2; rows out of order are a hundred nats apart)
    from pyrovae.evaluation import inspect_pair

    x, _ = canvases(48)
    torch.manual_seed(0)
    pair = SmallAIR(subsample_size=16)
    layout = inspect_pair(pair.model, pair.guide, (x,))
    assert layout.subsample == 16 and layout.looped
    own = pyrovae.log_likelihood(pair.model, pair.guide, x, num_samples=200, seed=1)
    pair.subsample_size = None
    plain = pyrovae.log_likelihood(pair.model, pair.guide, x, num_samples=200, seed=2)
    assert own.shape == plain.shape == (48,) and torch.isfinite(own).all()
    assert float((own - plain).abs().median()) < 5.0, (own - plain).abs().median()
    assert float((own - plain.roll(1)).abs().median()) > 50.0
