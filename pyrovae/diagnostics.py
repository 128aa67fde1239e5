"""How far to trust an importance-sampled log p(x): per-datapoint diagnostics of the log weights.

From the K log weights log w_k = log p(x, z_k) − log q(z_k | x) of one datapoint (the same
numbers :func:`pyrovae.log_likelihood` reduces, so at no extra model evaluations):

    log p̂(x) = logsumexp_k log w_k − log K
    ESS      = (Σ_k w_k)² / Σ_k w_k²                    (Kish's effective sample size, 1 … K)
    stderr   = sqrt(1/ESS − 1/K)                         (delta method: sd(p̂)/p̂, in nats)
    k̂        = the shape of a generalized Pareto fitted to the largest weights (PSIS [1])

The standard error is itself estimated from the weights, so it is only meaningful when their
variance is finite: k̂ says whether it is. With k̂ < 0.5 the weights have a finite variance and
the estimate converges at the usual rate (reliable); up to min(1 − 1/log10 K, 0.7) it converges
slowly but is usable; above, the weights' tail is so heavy that log p̂(x) is biased low by an
amount no number of samples one can afford reveals [1, 2].

Everything is computed in one pass over chunks of particles (:class:`WeightStats`) with memory
bounded by the tail length, and vectorized over datapoints: :func:`fit_generalized_pareto` is
the Zhang & Stephens estimator of :func:`pyro.ops.stats.fit_generalized_pareto` over the last
dimension of a batch of samples.

References:
  [1] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance
      Sampling", JMLR 25 (2024), arXiv:1507.02646.
  [2] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating
      Variational Inference", ICML 2018.
  [3] J. Zhang, M. A. Stephens, "A new and efficient estimation method for the generalized
      Pareto distribution", Technometrics 51 (2009).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "fit_generalized_pareto",
    "tail_length",
    "khat_threshold",
    "khat_bands",
    "WeightStats",
    "LogLikelihoodReport",
    "verdict",
]

#: Below this k̂ the importance weights have finite variance: the estimate is reliable [1].
GOOD_KHAT = 0.5


def tail_length(k: int) -> int:
    """Weights in the tail the Pareto is fitted to: ceil(min(0.2 K, 3 √K)) [1]."""
    return int(math.ceil(min(0.2 * k, 3.0 * math.sqrt(k))))


def khat_threshold(k: int) -> float:
    """The largest k̂ at which K samples still give a usable estimate: min(1 − 1/log10 K, 0.7)
    [1, section 3.2.4]."""
    return min(1.0 - 1.0 / math.log10(k), 0.7) if k > 10 else 0.0


def fit_generalized_pareto(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a generalized Pareto distribution to each row of ``x`` (Zhang & Stephens [3], with
    the weakly informative prior of PSIS [1]), as :func:`pyro.ops.stats.fit_generalized_pareto`
    does for one row.

    :param x: samples ``(..., n)``, positive, sorted ascending along the last dimension.
    :returns: ``(k, sigma)``, each of shape ``(...)``: the shape and scale, in float64.
    """
    x = x.double()  # (..., n)
    n = x.shape[-1]
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=torch.double, device=x.device)
    quartile = x[..., int(n / 4 - 0.5), None]  # (..., 1)
    bs = (1.0 - math.sqrt(m) / (j - 0.5).sqrt()) / (3.0 * quartile) + 1.0 / x[..., -1:]  # (..., m)
    ks = torch.log1p(-bs.unsqueeze(-1) * x.unsqueeze(-2)).mean(-1)  # (..., m)
    profile = n * (torch.log(-bs / ks) - (ks + 1.0))  # profile log-likelihood, (..., m)
    weights = torch.softmax(profile, dim=-1)  # = 1 / Σ_j exp(L_j − L_i), (..., m)
    b = (bs * weights).sum(-1)  # (...)
    k = torch.log1p(-b.unsqueeze(-1) * x).mean(-1)  # (...)
    sigma = -k / b
    return k * n / (n + 10.0) + 5.0 / (n + 10.0), sigma


def _khat(top: torch.Tensor, k: int) -> torch.Tensor:
    # k̂ of each column from its largest log weights top (M + 1, b), sorted descending: the
    # Pareto is fitted to the M largest weights' excess over the (M + 1)-th, scaled by the
    # largest weight, as Pyro's psis_diagnostic does (which also drops tail weights below
    # 1e-15 of the largest; here the tail keeps all M). NaN where M < 10 (K < 50).
    m = tail_length(k)
    if m < 10 or top.shape[0] < m + 1:
        return torch.full(top.shape[1:], math.nan, dtype=torch.double, device=top.device)
    top = top.double() - top[0].double()  # log w − max log w, (M + 1, b)
    tail = (top[:m].exp() - top[m].exp()).flip(0).T  # ascending excesses, (b, M)
    flat = tail[:, -1] <= 1e-12  # weights equal to rounding: no tail to fit
    khat, _ = fit_generalized_pareto(tail.clamp(min=1e-300))  # (b,)
    return torch.where(flat, torch.full_like(khat, -math.inf), khat)


class WeightStats:
    """The diagnostics of :mod:`pyrovae.diagnostics` accumulated over chunks of particles: the
    log of Σ w and of Σ w², and the M + 1 largest log weights, per datapoint.

    :param int k: K, the total number of particles that :meth:`update` will see.
    """

    def __init__(self, k: int):
        self.k, self.keep = int(k), tail_length(int(k)) + 1
        self.lse = self.lse2 = self.top = None

    def update(self, lw: torch.Tensor) -> None:
        """Add a chunk of log weights ``(k_chunk, b)``."""
        lse, lse2 = lw.logsumexp(0), (2 * lw).logsumexp(0)  # (b,)
        if self.lse is None:
            self.lse, self.lse2, both = lse, lse2, lw
        else:
            self.lse = torch.logaddexp(self.lse, lse)
            self.lse2 = torch.logaddexp(self.lse2, lse2)
            both = torch.cat([self.top, lw])  # (keep + k_chunk, b)
        self.top = both.topk(min(self.keep, both.shape[0]), dim=0).values  # descending

    def finish(self) -> torch.Tensor:
        """``(4, b)``: log p̂(x), its standard error, the ESS and k̂ of each datapoint."""
        log_px = self.lse - math.log(self.k)  # (b,)
        ess = (2 * self.lse - self.lse2).exp()  # (b,)
        stderr = (1.0 / ess - 1.0 / self.k).clamp(min=0).sqrt()
        khat = _khat(self.top, self.k).to(log_px.dtype)
        return torch.stack([log_px, stderr, ess, khat])


def khat_bands(khat: torch.Tensor, k: int) -> dict[str, float]:
    """The share of datapoints in each k̂ band for K samples: ``good`` (k̂ < 0.5), ``ok`` (up
    to :func:`khat_threshold`), ``bad`` (above), and ``unknown`` (K < 50: too few to fit)."""
    n, limit = max(1, khat.numel()), khat_threshold(k)
    unknown = torch.isnan(khat)
    good = khat < GOOD_KHAT
    ok = (khat >= GOOD_KHAT) & (khat <= limit)
    bad = ~(good | ok | unknown)
    return {name: float(mask.sum()) / n for name, mask in
            (("good", good), ("ok", ok), ("bad", bad), ("unknown", unknown))}  # fmt: skip


def verdict(khat: torch.Tensor, k: int, method: str = "is") -> str:
    """One line: whether the set's estimate can be trusted, and if not what to do."""
    bands = khat_bands(khat, k)
    if bands["unknown"] == 1.0 and method == "ais":
        return (f"AIS over {k} chains (k̂ needs 50 or more): judge its standard errors, and how "
                "tight AIS is for this model with --method bdmc")  # fmt: skip
    if bands["unknown"] == 1.0:
        return f"k̂ not estimated (K={k} < 50): raise K to judge the estimate"
    limit = khat_threshold(k)
    if bands["bad"] == 0 and bands["ok"] == 0:
        return f"reliable: k̂ < {GOOD_KHAT} for every image (K={k})"
    if bands["bad"] == 0:
        return (f"usable: k̂ ≤ {limit:.2f} for every image, {bands['ok']:.1%} above "
                f"{GOOD_KHAT} (K={k}); a larger K or a richer guide would tighten it")  # fmt: skip
    remedy = ("more chains or steps" if method == "ais"
              else "raise K, use a richer guide, or --method ais")  # fmt: skip
    return (f"unreliable for {bands['bad']:.1%} of images (k̂ > {limit:.2f}, K={k}): their "
            f"log p(x) may be biased low; {remedy}")  # fmt: skip


@dataclass(frozen=True)
class LogLikelihoodReport:
    """Per-datapoint log p(x) and how far to trust it, each a tensor ``(N,)``.

    ``stderr`` is the Monte-Carlo standard error of each log p̂(x) in nats, ``ess`` the
    effective sample size out of ``num_samples``, ``khat`` the Pareto k̂ of the weights' tail
    (NaN when ``num_samples`` < 50; −inf where all weights are equal).
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    num_samples: int
    method: str = "is"

    def bands(self) -> dict[str, float]:
        """The share of datapoints per k̂ band (see :func:`khat_bands`)."""
        return khat_bands(self.khat, self.num_samples)

    def verdict(self) -> str:
        """One line on whether the estimate can be trusted (see :func:`verdict`)."""
        return verdict(self.khat, self.num_samples, self.method)
