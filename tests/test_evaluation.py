"""Exact tests of the ELBO, IWAE and log p(x) estimators on a linear-Gaussian model, where
log p(x) and p(z|x) are closed form (see linear_gaussian.py)."""

import logging
import math
import os
import pkgutil
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import Trace_ELBO
from torch import nn

import pyrovae
from pyrovae.evaluation import inspect_pair, log_weights, plan_chunks


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


# --- small things real client code hit (issue 23) -------------------------------------------


def _fresh(code: str) -> str:
    # Run code in a fresh interpreter that imports this checkout's pyrovae; its stdout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _submodules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(pyrovae.__path__) if m.name[0] != "_"]


def test_a_submodule_is_an_attribute_after_a_plain_import():
    # pyrovae is a lazy package (PEP 562): pyrovae.evaluation.inspect_pair after a plain
    # `import pyrovae`, in a fresh interpreter; every module is listed by dir(pyrovae)
    code = (
        "import sys, pyrovae; assert 'pyrovae.evaluation' not in sys.modules; "
        "print(pyrovae.evaluation.inspect_pair.__name__, *dir(pyrovae))"
    )
    name, *listed = _fresh(code).split()
    assert name == "inspect_pair"
    assert {"evaluation", "capture", "training", "plates"} <= set(_submodules()) <= set(listed)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pyrovae.nothing  # noqa: B018


@pytest.mark.slow
def test_every_submodule_is_an_attribute_after_a_plain_import():
    # every module, each loaded through the package's attribute (Lightning's and matplotlib's
    # imports included: slow)
    code = (
        "import sys, pyrovae\n"
        f"for name in {_submodules()!r}:\n"
        "    assert getattr(pyrovae, name) is sys.modules['pyrovae.' + name], name\n"
        "print('ok')"
    )
    assert _fresh(code) == "ok"


def test_inspect_pair_takes_a_bare_tensor_as_a_one_tensor_batch():
    lg = LinearGaussian()
    x = lg.data(301)
    assert inspect_pair(lg.model, lg.guide, x) == inspect_pair(lg.model, lg.guide, (x,))


class _ModePair(nn.Module):
    # A decoder with batch norm (bound: the model is its method) and an encoder with dropout
    # (registered with pyro.module by a plain-function guide, as Pyro's tutorials do).
    def __init__(self, dropout=nn.Dropout):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.encoder = nn.Sequential(nn.Linear(4, 8), dropout(0.5), nn.Linear(8, 4))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self):
        def guide(x):
            pyro.module("encoder", self.encoder)
            loc, scale = self.encoder(x).chunk(2, -1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, scale.exp()).to_event(1))

        return guide


def _said(caplog, text):
    return [
        r.getMessage() for r in caplog.records if r.name == "pyrovae" and text in r.getMessage()
    ]


@pytest.mark.parametrize("score", ["elbo", "iwae", "log_likelihood"])
def test_modules_in_training_mode_are_scored_in_eval_mode_and_restored(score, caplog):
    # a dropout class of its own per case: the note is said once per process and layer kinds
    dropout = {"elbo": nn.Dropout, "iwae": nn.AlphaDropout, "log_likelihood": nn.Dropout1d}
    pair, x = _ModePair(dropout[score]), LinearGaussian().data(30).float()
    pair.train()
    guide = pair.guide()
    stats = pair.decoder[1].running_mean.clone()
    run = {"elbo": lambda: pyrovae.elbo(pair.model, guide, x, num_particles=5),
           "iwae": lambda: pyrovae.iwae(pair.model, guide, x, 5),
           "log_likelihood": lambda: pyrovae.log_likelihood(pair.model, guide, x,
                                                           num_samples=5)}[score]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        torch.manual_seed(0)
        ours = run()
        run()
    assert all(m.training for m in pair.modules())  # restored
    assert torch.equal(pair.decoder[1].running_mean, stats)  # batch norm's statistics untouched
    pair.eval()
    torch.manual_seed(0)
    assert torch.equal(ours, run())  # what scoring in eval mode gives
    said = _said(caplog, "in eval mode")
    assert len(said) == 1 and "BatchNorm1d" in said[0] and dropout[score].__name__ in said[0]


def test_a_guide_with_observed_or_factor_sites_gets_a_note_and_log_px_alone(caplog):
    lg = LinearGaussian(shift=0.3)
    x = lg.data(7)

    def guide(x):  # CEVAE / scANVI style: auxiliary terms in the guide
        loc, scale = lg.q(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.factor("classifier_term", x.sum(-1), has_rsample=False)
            pyro.sample("aux_observed", dist.Normal(0.0, 1.0), obs=x[:, 0],
                        infer={"is_auxiliary": True})  # fmt: skip

    with caplog.at_level(logging.INFO, logger="pyrovae"):
        torch.manual_seed(0)
        ours = pyrovae.elbo(lg.model, guide, x, num_particles=3)
        pyrovae.log_likelihood(lg.model, guide, x, num_samples=3)
    torch.manual_seed(0)
    assert torch.equal(ours, pyrovae.elbo(lg.model, lg.guide, x, num_particles=3))
    (note,) = _said(caplog, "'classifier_term', 'aux_observed'")
    assert "Trace_ELBO adds their log-densities" in note and "log p(x) alone" in note


def test_a_plate_subsampling_more_than_the_data_gets_pyrovaes_message():
    # Pyro's AIR example: pyro.plate("data", N, subsample_size=batch_size) with a fixed size
    def model(x):
        with pyro.plate("data", x.shape[0], subsample_size=64) as idx:
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([len(idx), 4]).to_event(1), obs=x[idx])

    x = LinearGaussian().data(50)
    with pytest.raises(ValueError) as info:
        pyrovae.log_likelihood(model, model, x, num_samples=3)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "the pair subsamples its plate 'data' itself (size 50, subsample_size 64); pyrovae.elbo, "
        "iwae and log_likelihood hand the pair batches"
    )
    assert message.endswith("write pyro.plate('data', x.shape[0]) over the batch the model is "
                            "given, and pass batch_size=64 to them")  # fmt: skip


# --- sequences: data given as a tuple, prepared per batch, rows in the order given ----------

T, F = 5, 3  # time steps, features per step


class _Sequences(nn.Module):
    # Variable-length binary sequences, padded to T steps: one latent per sequence, the steps
    # past each sequence's length masked out (as Pyro's DMM masks them).
    def __init__(self, sort: bool = False):
        super().__init__()
        self.decode, self.encode = nn.Linear(2, F), nn.Linear(F, 4)
        self.sort = sort  # sort the batch by length inside the pair, as a careless DMM would

    def _batch(self, x, lengths, mask):
        if self.sort:
            order = lengths.argsort(descending=True)
            x, lengths, mask = x[order], lengths[order], mask[order]
        return x, lengths, mask

    def model(self, x, lengths, mask):
        x, lengths, mask = self._batch(x, lengths, mask)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            probs = torch.sigmoid(self.decode(z)).unsqueeze(-2).expand(*z.shape[:-1], T, F)
            seq = dist.Bernoulli(probs).mask(mask.unsqueeze(-1)).to_event(2)
            pyro.sample("x", seq, obs=x)

    def guide(self, x, lengths, mask):
        x, lengths, mask = self._batch(x, lengths, mask)
        mean = (x * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(-1)  # (N, F)
        loc, scale = self.encode(mean).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale.exp()).to_event(1))


def _sequences(n=20):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(n, T, F, generator=g) < 0.3).float()  # (n, T, F)
    lengths = torch.randint(1, T + 1, (n,), generator=g)  # (n,)
    return x, lengths


def _with_mask(batch):
    x, lengths = batch
    return x, lengths, torch.arange(T) < lengths.unsqueeze(-1)  # mask (B, T)


def _sorted_by_length(batch):  # Pyro's DMM get_mini_batch sorts its batch by length
    x, lengths, mask = _with_mask(batch)
    order = lengths.argsort(descending=True)
    return x[order], lengths[order], mask[order]


@pytest.mark.parametrize("score", ["elbo", "iwae", "log_likelihood"])
def test_a_batch_transform_prepares_each_batch_as_in_training(score):
    pair, (x, lengths) = _Sequences(), _sequences()
    fn = {"elbo": lambda *a, **k: pyrovae.elbo(*a, num_particles=3, **k),
          "iwae": lambda *a, **k: pyrovae.iwae(*a, 3, **k),
          "log_likelihood": lambda *a, **k: pyrovae.log_likelihood(*a, num_samples=3,
                                                                   **k)}[score]  # fmt: skip
    torch.manual_seed(0)
    ours = fn(pair.model, pair.guide, (x, lengths), batch_transform=_with_mask, batch_size=7)
    torch.manual_seed(0)
    prepared = fn(pair.model, pair.guide, _with_mask((x, lengths)), batch_size=7)
    assert ours.shape == (20,) and torch.equal(ours, prepared)


def test_a_pair_or_transform_that_reorders_its_batch_is_refused():
    pair, (x, lengths) = _Sequences(), _sequences()
    with pytest.raises(ValueError, match=r"reorders the datapoints of a batch .*sorted by len"):
        pyrovae.elbo(pair.model, pair.guide, (x, lengths), batch_transform=_sorted_by_length)
    sorting = _Sequences(sort=True)
    with pytest.raises(ValueError, match=r"enforce_sorted=False\) sorts inside"):
        pyrovae.log_likelihood(sorting.model, sorting.guide, _with_mask((x, lengths)),
                               num_samples=3)  # fmt: skip

    def binarized(batch):  # random: cannot be tested, and keeps the order
        x, lengths, mask = _with_mask(batch)
        return torch.bernoulli(x.clamp(0.1, 0.9)), lengths, mask

    scores = pyrovae.elbo(pair.model, pair.guide, (x, lengths), batch_transform=binarized)
    assert scores.shape == (20,) and torch.isfinite(scores).all()


def test_a_tuple_holding_a_packed_sequence_says_to_build_it_per_batch():
    pair, (x, lengths) = _Sequences(), _sequences()
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with pytest.raises(pyrovae.DataError, match=r"item 2 is a PackedSequence.*batch_transform="):
        pyrovae.log_likelihood(pair.model, pair.guide, (x, lengths, packed), num_samples=3)
    # fit and the Lightning engine say the same, before any step (not a list of batches)
    with pytest.raises(pyrovae.DataError, match=r"training data is a tuple whose item 2 is a Pa"):
        pyrovae.fit(pair.model, pair.guide, (x, lengths, packed), progress=False)
    from pyrovae.lightning import fit

    with pytest.raises(pyrovae.DataError, match=r"item 2 is a PackedSequence.*batch_transform="):
        fit(pair.model, pair.guide, (x, lengths, packed), accelerator="cpu", devices=1)


class _GRUSequences(_Sequences):
    # The guide reads each sequence with a GRU over a PackedSequence, as Pyro's DMM does; the
    # PackedSequence is built per batch, unsorted (it keeps the batch's order).
    def __init__(self):
        super().__init__()
        self.rnn, self.encode = nn.GRU(F, 8, batch_first=True), nn.Linear(8, 4)

    def model(self, x, lengths, mask, packed):
        super().model(x, lengths, mask)

    def guide(self, x, lengths, mask, packed):
        pyro.module("sequences", self)
        _, h = self.rnn(packed)  # (1, N, 8), in the batch's order
        loc, scale = self.encode(h[0]).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale.exp()).to_event(1))


def _packed(batch):
    x, lengths, mask = _with_mask(batch)
    pack = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return x, lengths, mask, pack


@pytest.mark.statistical
def test_a_packed_sequence_built_per_batch_trains_eagerly_and_scores_in_input_order(caplog):
    pair, (x, lengths) = _GRUSequences(), _sequences(30)
    with caplog.at_level(logging.INFO, logger="pyrovae"):
        history = pyrovae.fit(pair.model, pair.guide, (x, lengths), batch_transform=_packed,
                              epochs=1, batch_size=10, progress=False, device="cpu")  # fmt: skip
    (eager,) = _said(caplog, "trains eagerly")
    assert "the batch holds a PackedSequence, not a tensor" in eager
    assert len(history.train_elbo) == 1
    # statistical (seeded): 500 importance samples per sequence; the rows of the reversed data
    # are those of the data reversed, within Monte-Carlo error (rows out of order: nats away)
    flip = torch.arange(29, -1, -1)
    score = {"batch_transform": _packed, "num_samples": 500, "batch_size": 8}
    ll = pyrovae.log_likelihood(pair.model, pair.guide, (x, lengths), **score)
    back = pyrovae.log_likelihood(pair.model, pair.guide, (x[flip], lengths[flip]), **score)
    assert (ll[flip] - back).abs().mean() < 0.25, (ll[flip] - back).abs().mean()
    assert (ll - back).abs().mean() > 1.5, (ll - back).abs().mean()  # it can tell an order


def test_scoring_estimate_extrapolates_and_names_a_k_that_fits(monkeypatch):
    # the time is extrapolated from two timed calls, their fixed overhead dropping out; over
    # budget, it names the K that fits
    from pyrovae import evaluation

    lg = LinearGaussian()
    x = lg.data(40)
    # 4 datapoints × 100 particles take 2.1 s, × 400 take 8.1 s: 0.1 s a call, 5 ms a sample
    ticks = iter([0.0, 2.1, 10.0, 18.1])
    monkeypatch.setattr("time.perf_counter", lambda: next(ticks))
    state = torch.get_rng_state()
    seconds, note = evaluation.scoring_estimate(
        lg.model, lg.exact_guide, x, 1000, budget=60.0, probe=(4, 100)
    )
    assert torch.equal(torch.get_rng_state(), state)  # seeded: the caller's draws are untouched
    assert seconds == pytest.approx(0.1 + 0.005 * 40 * 1000)  # 200.1 s
    assert note == (
        "scoring 40 images × K=1,000: about 3.3 min (timed on 4 × K=100); K=200 would fit in 60 s"
    )
