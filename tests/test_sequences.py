"""Variable-length sequences (pyrovae.sequences): a DMM-style pair trained on both engines and
scored with rows in the order of the data, the preparation shared by training and scoring, and
every bad input refused in one line before any step."""

import logging

import pyro
import pyro.contrib.examples.polyphonic_data_loader as poly
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

import pyrovae
from pyrovae.sequences import Sequences, dmm_mini_batch

T, F, Z, H = 7, 6, 2, 8  # padded steps, features per step, latent size, GRU state


class _DMM(nn.Module):
    # Pyro's Deep Markov Model in miniature (examples/dmm.py's layout and signatures): a Markov
    # chain of latents z_t with Bernoulli emissions; the guide reads each sequence backwards
    # with a GRU over the reversed PackedSequence and combines its state with z_{t-1}.
    def __init__(self):
        super().__init__()
        self.trans, self.emit = nn.Linear(Z, 2 * Z), nn.Linear(Z, F)
        self.rnn, self.lin_z = nn.GRU(F, H, batch_first=True), nn.Linear(Z, H)
        self.lin_h = nn.Linear(H, 2 * Z)
        self.z_0, self.z_q_0 = nn.Parameter(torch.zeros(Z)), nn.Parameter(torch.zeros(Z))

    def model(self, mini_batch, mini_batch_reversed, mask, lengths, annealing_factor=1.0):
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(len(mini_batch), Z)  # (B, Z)
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(mini_batch.size(1))):
                loc, scale = self.trans(z_prev).chunk(2, -1)  # (B, Z) each
                p_z = dist.Normal(loc, nn.functional.softplus(scale) + 1e-3)
                with poutine.scale(scale=annealing_factor):
                    z = pyro.sample(f"z_{t}", p_z.mask(mask[:, t : t + 1]).to_event(1))
                p_x = dist.Bernoulli(logits=self.emit(z)).mask(mask[:, t : t + 1]).to_event(1)
                pyro.sample(f"obs_x_{t}", p_x, obs=mini_batch[:, t])  # event dim 1: (F,)
                z_prev = z

    def guide(self, mini_batch, mini_batch_reversed, mask, lengths, annealing_factor=1.0):
        pyro.module("dmm", self)
        out, _ = self.rnn(mini_batch_reversed)
        h = poly.pad_and_reverse(out, lengths)  # (B, T_max, H), in the batch's order
        z_prev = self.z_q_0.expand(len(mini_batch), Z)
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(mini_batch.size(1))):
                combined = 0.5 * (torch.tanh(self.lin_z(z_prev)) + h[:, t])  # (B, H)
                loc, scale = self.lin_h(combined).chunk(2, -1)
                q_z = dist.Normal(loc, nn.functional.softplus(scale) + 1e-3)
                with poutine.scale(scale=annealing_factor):
                    z_prev = pyro.sample(f"z_{t}", q_z.mask(mask[:, t : t + 1]).to_event(1))


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)  # (n,)
    steps = torch.arange(T) < lengths.unsqueeze(-1)  # (n, T)
    x = (torch.rand(n, T, F, generator=g) < 0.3).float() * steps.unsqueeze(-1)  # (n, T, F)
    return x, lengths


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_dmm_mini_batch_is_pyros_get_mini_batch_in_the_batchs_order():
    x, lengths = _data(10)
    mini, packed, mask, lens = dmm_mini_batch((x, lengths))
    order = torch.arange(10)
    s_mini, s_packed, s_mask, s_lens = poly.get_mini_batch(order, x, lengths)  # sorted
    _, by_length = torch.sort(lengths)
    by_length = by_length.flip(0)  # the sort get_mini_batch makes
    assert torch.equal(mini[by_length], s_mini) and torch.equal(mask[by_length], s_mask)
    assert torch.equal(lens[by_length], s_lens) and mini.shape == (10, int(lengths.max()), F)
    ours = nn.utils.rnn.pad_packed_sequence(packed, batch_first=True)[0]  # input order
    theirs = nn.utils.rnn.pad_packed_sequence(s_packed, batch_first=True)[0]
    assert torch.equal(ours[by_length], theirs)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda x, n: Sequences(x, n + T),
            "sequence 0 has length 1[0-9], longer than the padded "
            r"time axis \(T=7; 24 of 24 are longer\)",
        ),
        (
            lambda x, n: Sequences(x, n.index_fill(0, torch.tensor([3]), 0)),
            r"lengths: sequence 3 has length 0 \(1 of 24 have length < 1\)",
        ),
        (lambda x, n: Sequences(x, -n), "sequence 0 has length -"),
        (lambda x, n: Sequences(x, n.float()), r"lengths must be whole numbers .*float32"),
        (lambda x, n: Sequences(x, n[:20]), r"entry per sequence \(24 padded\): .*got \(20,\)"),
        (
            lambda x, n: Sequences(x, mask=torch.ones(24, T).index_fill(0, torch.tensor([3]), 0)),
            r"the mask's lengths: sequence 3 has length 0",
        ),
        (lambda x, n: Sequences(x, mask=torch.full((24, T), 0.5)), "mask must hold 0/1"),
        (
            lambda x, n: Sequences(x, n, mask=torch.ones(24, T)),
            "the mask disagrees with the lengths at sequence 0",
        ),
        (
            lambda x, n: Sequences(x, mask=torch.ones(24, T).index_fill(1, torch.tensor([2]), 0)),
            "the mask disagrees with the lengths at sequence 0 .*24 of 24 rows disagree",
        ),
        (lambda x, n: Sequences(x, n, mask=torch.ones(24, T + 1)), r"mask must have the shape"),
        (lambda x, n: Sequences(x), "give the sequences' lengths"),
        (lambda x, n: Sequences(x[:, 0, 0], n), r"a tensor \(N, T, ...\) with a time axis"),
    ],
)
def test_bad_sequences_are_one_line_before_any_step(make, message):
    x, lengths = _data()
    with pytest.raises(ValueError, match=message) as info:
        make(x, lengths)
    assert "\n" not in str(info.value)


def test_lengths_given_as_a_tuple_are_checked_at_the_first_batch_before_any_update():
    x, lengths = _data()
    dmm = _DMM()
    before = _params(dmm)
    bad = lengths.index_fill(0, torch.tensor([5]), T + 2)
    with pytest.raises(ValueError, match=r"a batch's lengths: sequence \d+ has length 9, longer"):
        pyrovae.fit(dmm.model, dmm.guide, (x, bad), batch_transform=dmm_mini_batch, epochs=1,
                    batch_size=24, progress=False)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, _params(dmm), strict=True))


def test_a_mask_alone_gives_the_lengths():
    x, lengths = _data()
    data = Sequences(x, mask=torch.arange(T) < lengths.unsqueeze(-1))
    assert torch.equal(data.lengths, lengths) and data.steps == int(lengths.sum())
    assert len(data) == 24 and data[3][1] == lengths[3]


@pytest.mark.statistical
def test_a_dmm_trains_eagerly_with_fit_and_scores_with_rows_in_input_order(caplog):
    x, lengths = _data()
    data, dmm = Sequences(x, lengths), _DMM()
    before = _params(dmm)
    with caplog.at_level(logging.WARNING, logger="pyrovae"):
        history = pyrovae.fit(dmm.model, dmm.guide, data, epochs=2, batch_size=8, lr=0.01,
                              progress=False)  # fmt: skip
    eager = [r.getMessage() for r in caplog.records if "trains eagerly" in r.getMessage()]
    assert len(eager) == 1 and "the batch holds a PackedSequence" in eager[0]
    assert len(history) == 2 and all(v < 0 for v in history.train_elbo)
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(dmm), strict=True))
    # statistical (seeded): K=2000 per sequence, in blocks of 5 (each cut to its own longest
    # sequence); the reversed data's rows are the data's reversed, within Monte-Carlo error (a
    # median: a guide trained for 2 epochs gives heavy-tailed weights, a row may be off by a
    # nat or two), while rows out of order are nats apart
    flip = torch.arange(23, -1, -1)
    ll = pyrovae.log_likelihood(dmm.model, dmm.guide, data, num_samples=2000, batch_size=5)
    back = pyrovae.log_likelihood(dmm.model, dmm.guide, Sequences(x[flip], lengths[flip]),
                                  num_samples=2000, batch_size=5)  # fmt: skip
    assert ll.shape == (24,) and (ll[flip] - back).abs().median() < 0.15, ll[flip] - back
    assert (ll - back).abs().median() > 2.0, (ll - back).abs().median()
    # log p(x) bounds the ELBO from above, on average
    assert pyrovae.elbo(dmm.model, dmm.guide, data, num_particles=20).mean() < ll.mean()


def test_a_dmm_trains_with_lightning():
    pytest.importorskip("lightning")
    from pyrovae.lightning import fit

    x, lengths = _data()
    dmm = _DMM()
    before = _params(dmm)
    trainer = fit(dmm.model, dmm.guide, Sequences(x, lengths), epochs=2, batch_size=8, lr=0.01,
                  accelerator="cpu", devices=1, enable_progress_bar=False)  # fmt: skip
    assert trainer.lightning_module.state.epoch == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(dmm), strict=True))


@pytest.mark.parametrize("engine", ["fit", "lightning"])
def test_held_out_sequences_are_scored_each_epoch_as_they_are_trained(engine):
    # val_data=Sequences: the validation ELBO reads each batch through the data's preparation,
    # as training and pyrovae.elbo do (the same number on both engines, one implementation)
    x, lengths = _data()
    val = Sequences(*_data(12, seed=1))
    dmm, records = _DMM(), []
    if engine == "fit":
        pyrovae.fit(dmm.model, dmm.guide, Sequences(x, lengths), val_data=val, epochs=2,
                    batch_size=8, lr=0.01, progress=False, callback=records.append)  # fmt: skip
    else:
        from pyrovae.lightning import EpochCallback, fit

        fit(dmm.model, dmm.guide, Sequences(x, lengths), val_data=val, epochs=2, batch_size=8,
            lr=0.01, accelerator="cpu", devices=1, enable_progress_bar=False,
            callbacks=[EpochCallback(records.append)])  # fmt: skip
    assert len(records) == 2 and all(r["val_elbo"] < 0 for r in records)
    assert all(r["val_elbo"] > -200 for r in records), records


class _Annealed(_DMM):
    # The DMM noting the annealing factor its model is given on every call.
    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def model(self, *batch, annealing_factor=1.0):
        self.seen.append(float(annealing_factor))
        super().model(*batch, annealing_factor=annealing_factor)


@pytest.mark.parametrize("engine", ["fit", "lightning"])
def test_the_kl_annealing_factor_rises_step_by_step_as_in_pyros_example(engine):
    # 24 sequences in batches of 8: 3 steps an epoch; Pyro's DMM factor at step s of epoch e,
    # 0.2 + 0.8 · min(1, (3e + s + 1) / (2 · 3)): 1 from the last step of epoch 2 on
    x, lengths = _data()
    dmm = _Annealed()
    kwargs = {"step_kwargs": {"annealing_factor": pyrovae.schedules.Ramp(0.2, 1.0, epochs=2)},
              "epochs": 3, "batch_size": 8}  # fmt: skip
    if engine == "fit":
        pyrovae.fit(dmm.model, dmm.guide, Sequences(x, lengths), progress=False, **kwargs)
    else:
        pytest.importorskip("lightning")
        from pyrovae.lightning import fit

        fit(dmm.model, dmm.guide, Sequences(x, lengths), accelerator="cpu", devices=1,
            enable_progress_bar=False, **kwargs)  # fmt: skip
    expected = [0.2 + 0.8 * min(1.0, (k + 1) / 6) for k in range(9)]
    assert len(dmm.seen) == (9 if engine == "fit" else 10)  # Lightning builds on a batch first
    steps = dmm.seen[-9:]
    assert steps == pytest.approx(expected, abs=1e-6), steps


def test_streamed_sequences_collate_their_lengths():
    x, lengths = _data()
    dmm = _DMM()
    history = pyrovae.fit(dmm.model, dmm.guide, Sequences(x, lengths), epochs=1, batch_size=8,
                          stream=True, progress=False)  # fmt: skip
    assert len(history) == 1 and history.train_elbo[0] < 0


@pytest.mark.parametrize("score", ["elbo", "iwae", "log_likelihood"])
def test_scoring_applies_the_datas_preparation_as_training_does(score):
    x, lengths = _data()
    dmm = _DMM()
    fn = {"elbo": lambda *a, **k: pyrovae.elbo(*a, num_particles=3, **k),
          "iwae": lambda *a, **k: pyrovae.iwae(*a, 3, **k),
          "log_likelihood": lambda *a, **k: pyrovae.log_likelihood(*a, num_samples=3,
                                                                   **k)}[score]  # fmt: skip
    ours = fn(dmm.model, dmm.guide, Sequences(x, lengths), batch_size=7, seed=1)
    given = fn(dmm.model, dmm.guide, (x, lengths), batch_transform=dmm_mini_batch,
               batch_size=7, seed=1)  # fmt: skip
    assert ours.shape == (24,) and torch.equal(ours, given)


def test_a_datasets_training_transform_is_not_applied_in_scoring(digits_vae):
    vae, images = digits_vae

    def training_only(batch):
        raise AssertionError("scoring applied a training-only batch_transform")

    data = pyrovae.data.ImageDataset(images, batch_transform=training_only)
    scores = pyrovae.elbo(vae.model, vae.guide, data)
    assert scores.shape == (40,) and torch.isfinite(scores).all()


def test_a_preparation_that_sorts_by_length_is_refused():
    x, lengths = _data()
    dmm = _DMM()

    def sorted_like_pyros_example(batch):  # get_mini_batch sorts the batch by length
        return poly.get_mini_batch(torch.arange(len(batch[0])), batch[0], batch[1])

    data = Sequences(x, lengths, prepare=sorted_like_pyros_example)
    with pytest.raises(ValueError, match=r"reorders the datapoints of a batch .*enforce_sorted"):
        pyrovae.log_likelihood(dmm.model, dmm.guide, data, num_samples=3)
