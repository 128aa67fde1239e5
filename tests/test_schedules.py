"""KL warm-up: the schedule's values are exact, and fit trains each epoch with its β."""

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyrovae
from pyrovae.schedules import KLSchedule


class _Target:
    beta = None


def test_warmup_values_are_exact():
    s = KLSchedule(_Target(), warmup=4, beta=1.0)
    assert [s.value(e) for e in range(1, 8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    s = KLSchedule(_Target(), warmup=100, beta=1.0)
    assert [s.value(e) for e in (1, 2, 50, 99, 100, 2000)] == [0.01, 0.02, 0.5, 0.99, 1.0, 1.0]
    assert all(s.value(e) == min(1.0, e / 100) for e in range(1, 300))
    s = KLSchedule(_Target(), warmup=0, beta=4.0)  # β-VAE, no warm-up
    assert [s.value(e) for e in (1, 2, 3)] == [4.0, 4.0, 4.0]
    s = KLSchedule(_Target(), warmup=3, beta=0.5)
    assert [s.value(e) for e in (1, 2, 3, 4)] == [0.5 / 3, 0.5 * 2 / 3, 0.5, 0.5]


def test_fit_trains_each_epoch_with_its_beta():
    # A VAE whose guide is (numerically) deterministic and whose parameters do not move, trained
    # one full batch per epoch with the closed-form KL: each epoch's training objective is then
    # exactly E log p(x|z=μ) − β_e KL, which reads off the β that fit's steps saw, however fit
    # runs them (eagerly or replaying a captured loss).
    data = pyrovae.data.load("digits", "valid", binarize="threshold")
    x = data.images
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(16,), z_dim=2))
    with torch.no_grad():
        vae.encoder.head.scale.weight.zero_()
        vae.encoder.head.scale.bias.fill_(-40.0)  # σ = softplus(-40) + 1e-5 ≈ 1e-5
        loc, scale = vae.encoder(x)
        rec = vae.likelihood(vae.decoder(loc), vae.event_dim).log_prob(x).sum()
        q = dist.Normal(loc, scale).to_event(1)
        kl = torch.distributions.kl_divergence(q, vae.prior()).sum()
    schedule = KLSchedule(vae, warmup=3, beta=1.0)
    assert vae.beta == pytest.approx(1 / 3)  # set for epoch 1 on construction
    records = []

    def callback(record):
        schedule(record)
        records.append(dict(record))

    pyrovae.fit(vae.model, vae.guide, x, epochs=5, batch_size=len(x), lr=1e-12, progress=False,
                loss=TraceMeanField_ELBO(), callback=callback)  # fmt: skip
    betas = [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert [r["beta"] for r in records] == betas and vae.beta == 1.0
    expected = [float(rec - b * kl) / len(x) for b in betas]
    assert [r["train_elbo"] for r in records] == pytest.approx(expected, rel=1e-4)
    assert kl / len(x) > 10  # so a wrong β would be far off


def test_bad_schedules():
    with pytest.raises(ValueError, match="warmup must be a whole number of epochs >= 0"):
        KLSchedule(_Target(), warmup=-1)
    with pytest.raises(ValueError, match="beta \\(the KL weight\\) must be a finite number > 0"):
        KLSchedule(_Target(), beta=0)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -5"):
        pyrovae.Config(warmup=-5).validate()
