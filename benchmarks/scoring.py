"""Scoring cost of the discretized logistic mixture: seconds per image of importance-sampled
log p(x) (``pyrovae evaluate``'s work) with the mixture's log-density as pyrovae computed it
before (:func:`reference_log_prob`, every component at once with several temporaries of size
particles × mixtures × pixels) and as it computes it now (one component at a time), beside the
decoder's own time for the same particles::

    pyrovae train --dataset fashion-mnist --data-dir DATA --binarize none \\
        --likelihood discretized-logistic --mixtures 5 --hidden 256 --z-dim 16 --epochs 1 \\
        --train-limit 2000 --out runs/fm8
    python benchmarks/scoring.py runs/fm8 --n 8 --num-samples 1000 --rounds 3

The run is the own-images MLP (docs/own-images.md's command; a short one will do: the cost does
not depend on the weights). Both versions score the same test images with the same seed, in one
process, in interleaved rounds; the medians are reported, and the largest difference between
their log p(x) values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from pyrovae.checkpoint import load_run
from pyrovae.data import spread
from pyrovae.evaluation import log_likelihood
from pyrovae.likelihoods import (
    _HALF_BIN,
    DiscretizedLogisticMixtureDistribution,
    _edges,
)
from pyrovae.runs import load_split

__all__ = ["reference_log_prob", "main"]


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    # log(1 − exp(−d)) for d > 0, two branches (Mächler 2012), as the reference had it
    return torch.where(
        d < 0.6931471805599453,
        torch.log(-torch.expm1(-d)),
        torch.log1p(-torch.exp(-d.clamp(min=1e-30))),
    )


def reference_log_prob(d: DiscretizedLogisticMixtureDistribution, value: torch.Tensor):
    """The mixture's log-density as pyrovae computed it before: every component at once, each
    term a tensor ``(..., K, C, S)``. The values the current one must reproduce."""
    c = d.locs.shape[-2]
    x = value.reshape(*value.shape[: value.dim() - len(d.event_shape)], 1, c, -1)
    locs = d.locs + F.pad(d.coeffs * x[..., :-1, :], (0, 0, 1, 0))  # (..., K, C, S)
    a = (x - locs + _HALF_BIN) / d.scales
    b = (x - locs - _HALF_BIN) / d.scales
    low, high = _edges(x)
    interior = -F.softplus(-a) - F.softplus(b) + _log1mexp(2 * _HALF_BIN / d.scales)
    per_channel = torch.where(low, -F.softplus(-a), torch.where(high, -F.softplus(b), interior))
    joint = per_channel.sum(-2) + d.logits.log_softmax(-2)  # (..., K, S)
    return joint.logsumexp(-2).sum(-1)


def _score(vae, x, k: int, old: bool) -> tuple[float, torch.Tensor]:
    patch = mock.patch.object(
        DiscretizedLogisticMixtureDistribution, "log_prob", reference_log_prob
    )
    with patch if old else mock.MagicMock():
        start = time.perf_counter()
        ll = log_likelihood(vae.model, vae.guide, x, num_samples=k, seed=0)
        return time.perf_counter() - start, ll


def _parts_seconds(vae, x, k: int) -> dict:
    # per image: the decoder alone on K codes (what scoring cannot avoid), and the mixture's
    # log-density of an image under its K outputs, before and now
    z = torch.randn(k, vae.z_dim)
    times = {"decoder": 0.0, "density before": 0.0, "density now": 0.0}
    with torch.no_grad():
        for image in x:
            start = time.perf_counter()
            d = vae.likelihood(vae.decoder(z), vae.event_dim)
            times["decoder"] += time.perf_counter() - start
            start = time.perf_counter()
            reference_log_prob(d, image)
            times["density before"] += time.perf_counter() - start
            start = time.perf_counter()
            d.log_prob(image)
            times["density now"] += time.perf_counter() - start
    return {key: value / len(x) for key, value in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run trained with --likelihood discretized-logistic")
    p.add_argument("--data-dir", default=None, help="where the run's data is now")
    p.add_argument("--n", type=int, default=8, help="test images (spread over the split)")
    p.add_argument("--num-samples", type=int, default=1000, help="K")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    vae, config = load_run(args.run_dir, torch.device("cpu"))
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    test = load_split(config, "test")
    x = test.images[spread(len(test), args.n)]
    times: dict[str, list] = {"before": [], "after": []}
    diff = 0.0
    for _ in range(args.rounds):  # interleaved
        t_old, ll_old = _score(vae, x, args.num_samples, old=True)
        t_new, ll_new = _score(vae, x, args.num_samples, old=False)
        times["before"].append(t_old / len(x))
        times["after"].append(t_new / len(x))
        for key, value in _parts_seconds(vae, x, args.num_samples).items():
            times.setdefault(key, []).append(value)
        diff = max(diff, float((ll_old - ll_new).abs().max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.run_dir}: {len(x)} test images, K={args.num_samples}, {args.rounds} rounds, "
          f"torch {torch.__version__} on one CPU thread; seconds per image (median):")  # fmt: skip
    print(f"  log p(x), mixture log-density before   {med['before']:.3f}")
    print(f"  log p(x), mixture log-density now      {med['after']:.3f}")
    print(f"  the decoder alone (K forward passes)   {med['decoder']:.3f}")
    print(f"  the log-density alone, before          {med['density before']:.3f}")
    print(f"  the log-density alone, now             {med['density now']:.3f}")
    print(f"  largest |difference| of log p(x): {diff:.2e} nats")
    return med | {"max_abs_diff": diff}


if __name__ == "__main__":
    main()
