"""Tests of pyrovae.diagnostics: the vectorized Pareto fit against Pyro's (exact, row by row), k̂
on generalized-Pareto samples of known shape (statistical, seeded), the diagnostics of importance
weights on the linear-Gaussian pair (closed-form posterior), and `pyrovae evaluate`'s columns,
bands and verdict (smoke)."""

import json
import math

import numpy as np
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.ops.stats import fit_generalized_pareto as pyro_fit

import pyrovae
from pyrovae import cli
from pyrovae.diagnostics import (
    WeightStats,
    fit_generalized_pareto,
    khat_bands,
    khat_threshold,
    tail_length,
    verdict,
)


def _pareto(shape: float, rows: int, n: int, seed: int = 0) -> torch.Tensor:
    # generalized Pareto (σ = 1) by inversion: ((1 − u)^(−k) − 1) / k, (rows, n)
    u = torch.rand(rows, n, dtype=torch.double, generator=torch.Generator().manual_seed(seed))
    return ((1 - u) ** (-shape) - 1) / shape


def test_vectorized_fit_equals_pyros_on_each_row():
    x = _pareto(0.4, 6, 300).sort(-1).values  # (6, 300)
    k, sigma = fit_generalized_pareto(x)
    for i in range(6):
        k_row, sigma_row = pyro_fit(x[i])
        assert k[i].item() == pytest.approx(k_row, rel=1e-9)
        assert sigma[i].item() == pytest.approx(sigma_row, rel=1e-9)


@pytest.mark.parametrize("shape", [0.2, 0.5, 0.8])
def test_khat_recovers_known_tail_indices(shape):
    # weights drawn from a generalized Pareto of shape k: its tail is one of the same shape, so
    # k̂ from the largest 213 of K=5000 weights estimates k. Over 40 datapoints the mean is
    # within 0.05 of k (its standard error is about 0.02 here) and each within 0.3.
    w = _pareto(shape, 40, 5000, seed=int(shape * 10))  # (datapoints, K)
    stats = WeightStats(5000)
    for chunk in w.log().T.split(1700):  # (k_chunk, 40): streamed in three chunks
        stats.update(chunk)
    khat = stats.finish()[3]
    assert abs(khat.mean().item() - shape) < 0.05
    assert (khat - shape).abs().max().item() < 0.3


def test_streamed_statistics_equal_the_whole_set():
    lw = torch.randn(1000, 7, dtype=torch.double) * 2  # (K, datapoints)
    whole, parts = WeightStats(1000), WeightStats(1000)
    whole.update(lw)
    for chunk in lw.split(97):
        parts.update(chunk)
    assert torch.allclose(whole.finish(), parts.finish(), rtol=1e-12, atol=1e-12)
    log_px, stderr, ess, _ = whole.finish()
    w = lw.exp()
    assert torch.allclose(log_px, w.mean(0).log())
    assert torch.allclose(ess, w.sum(0) ** 2 / (w**2).sum(0))
    # delta method: sd(mean w) / mean w, with the weights' sample variance (divisor K)
    se = (w.var(0, unbiased=False) / 1000).sqrt() / w.mean(0)
    assert torch.allclose(stderr, se)


def test_equal_and_degenerate_weights():
    stats = WeightStats(100)
    lw = torch.zeros(100, 2, dtype=torch.double)
    lw[0, 1] = 50.0  # one weight dominates the second datapoint's
    stats.update(lw)
    log_px, stderr, ess, khat = stats.finish()
    assert ess[0].item() == pytest.approx(100) and stderr[0].item() == pytest.approx(0, abs=1e-7)
    assert khat[0].item() == -math.inf  # all weights equal: no tail
    assert ess[1].item() == pytest.approx(1, rel=1e-9) and log_px[1] == pytest.approx(
        50 - math.log(100)
    )


def test_tail_length_and_thresholds():
    assert tail_length(5000) == 213 and tail_length(100) == 20
    assert khat_threshold(5000) == 0.7 and khat_threshold(100) == pytest.approx(0.5)
    bands = khat_bands(torch.tensor([0.1, 0.6, 0.9, math.nan]), 5000)
    assert bands == {"good": 0.25, "ok": 0.25, "bad": 0.25, "unknown": 0.25}
    assert verdict(torch.tensor([0.1, 0.2]), 5000).startswith("reliable")
    assert verdict(torch.tensor([0.1, 0.6]), 5000).startswith("usable")
    line = verdict(torch.tensor([0.1, 0.9]), 5000)
    assert line.startswith("unreliable for 50.0%") and "--method ais" in line


def test_few_samples_give_no_khat():
    lw = torch.randn(20, 3)
    report = pyrovae.diagnostics.WeightStats(20)
    report.update(lw)
    assert torch.isnan(report.finish()[3]).all()
    assert "not estimated" in verdict(torch.full((3,), math.nan), 20)


def test_khat_on_the_linear_gaussian_pair():
    # q = p(z|x): every weight equals p(x), no tail (k̂ = −inf); a guide wider than the
    # posterior has bounded weights (k̂ < 0.5); one made too narrow has heavy-tailed weights
    lg = LinearGaussian()
    x = lg.data(40)
    exact = pyrovae.log_likelihood_report(lg.model, lg.exact_guide, x, num_samples=1000, seed=0)
    assert (exact.khat < 0.5).all() and torch.allclose(exact.log_px, lg.log_px(x))
    assert exact.stderr.max() < 1e-6 and exact.bands()["good"] == 1.0
    wide = LinearGaussian(widen=1.5)
    r = pyrovae.log_likelihood_report(lg.model, wide.guide, x, num_samples=1000, seed=0)
    assert (r.khat < 0.5).all() and r.verdict().startswith("reliable")
    narrow = LinearGaussian(widen=0.3)
    r = pyrovae.log_likelihood_report(lg.model, narrow.guide, x, num_samples=1000, seed=0)
    assert r.khat.median() > 0.7 and r.bands()["bad"] > 0.5
    assert r.verdict().startswith("unreliable")
    # where k̂ is high the estimates are biased low, by far more than their standard errors
    # allow: the mean error is ten of its standard errors (from each datapoint's) below 0
    error = r.log_px - lg.log_px(x)  # (40,)
    assert error.mean() < -5 * r.stderr.pow(2).mean().sqrt() / 40**0.5


def test_report_is_log_likelihood_from_the_same_weights():
    # the same seed, batches and chunks of particles (here 50 per chunk): the same draws
    lg = LinearGaussian(shift=0.5, widen=0.8)
    x = lg.data(30)
    kw = dict(num_samples=300, seed=3, batch_size=7, max_chunk_elements=7 * 4 * 50)
    ll = pyrovae.log_likelihood(lg.model, lg.guide, x, **kw)
    r = pyrovae.log_likelihood_report(lg.model, lg.guide, x, **kw)
    assert torch.equal(r.log_px, ll)
    assert r.log_px.shape == r.stderr.shape == r.ess.shape == r.khat.shape == (30,)
    assert ((r.ess >= 1) & (r.ess <= 300)).all()
    with pytest.raises(ValueError, match="method must be"):
        pyrovae.log_likelihood_report(lg.model, lg.guide, x, method="mcmc")


def test_plot_log_likelihood_reliability(tmp_path):
    lg = LinearGaussian(widen=0.5)
    x = lg.data(50)
    r = pyrovae.log_likelihood_report(lg.model, lg.guide, x, num_samples=200, seed=0)
    pyrovae.plots.plot_log_likelihood_reliability(r, tmp_path / "r.png", title="t")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_diagnostics(tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["--dataset", "digits", "--epochs", "1", "--hidden", "16", "--z-dim", "2",
            "--train-limit", "200", "--no-progress"]  # fmt: skip
    assert cli.main(["train", "--out", str(run), *fast]) == 0
    argv = ["evaluate", str(run), "--num-samples", "100", "--limit", "30", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads((run / "eval.json").read_text())
    assert result["method"] == "is" and set(result["khat_bands"]) == {"good", "ok", "bad",
                                                                      "unknown"}  # fmt: skip
    assert sum(result["khat_bands"].values()) == pytest.approx(1.0)
    assert 0 < result["stderr_mean"] < 1 and out[-1] == result["verdict"]
    lines = (run / "log_px.csv").read_text().splitlines()
    assert lines[1] == "# log_px,stderr,ess,khat"
    table = np.loadtxt(run / "log_px.csv", delimiter=",")  # (30, 4)
    assert table.shape == (30, 4)
    assert table[:, 0].mean() == pytest.approx(result["log_likelihood"], abs=1e-5)
    assert table[:, 1].mean() == pytest.approx(result["stderr_mean"], abs=1e-5)
    assert ((table[:, 2] >= 1) & (table[:, 2] <= 100)).all()
    assert (run / "log_px.png").read_bytes()[:4] == b"\x89PNG"
    # AIS: the same files, its budget in eval.json; BDMC: bdmc.json with the gap
    argv = ["evaluate", str(run), "--method", "ais", "--chains", "4", "--steps", "3",
            "--limit", "6", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((run / "eval.json").read_text())
    assert (result["method"], result["chains"], result["steps"], result["n"]) == ("ais", 4, 3, 6)
    assert result["num_samples"] == 4 and "--method bdmc" in capsys.readouterr().out
    assert np.loadtxt(run / "log_px.csv", delimiter=",").shape == (6, 4)
    argv[argv.index("ais")] = "bdmc"
    assert cli.main(argv) == 0
    bounds = json.loads((run / "bdmc.json").read_text())
    assert bounds["n"] == 6 and bounds["gap"] == pytest.approx(
        bounds["upper"] - bounds["lower"], abs=1e-4
    )
    assert "BDMC on 6 images simulated from the model" in capsys.readouterr().out
    assert cli.main([*argv[:4], "--steps", "0", "--limit", "2"]) == 1
    assert capsys.readouterr().err.strip() == "pyrovae evaluate: error: --steps must be >= 1, got 0"
