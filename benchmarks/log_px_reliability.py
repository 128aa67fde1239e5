"""How far to trust log p(x) on binarized MNIST: importance sampling at K=1000 and K=5000 with
its Pareto k̂ bands, annealed importance sampling at the same number of model evaluations as
K=5000, and the BDMC gap on images simulated from each model; seconds for each. Prints a
markdown table (the one in docs/evaluating.md)::

    python benchmarks/log_px_reliability.py --runs standard=RUN_DIR vampprior=RUN_DIR \\
        --data-dir /work/shared/data --n 300 --bdmc-n 100

Each run is a directory written by ``pyrovae train --dataset binarized-mnist``. All estimators
score the same ``--n`` test images, spread over the split (it is ordered by class), with
``--seed``; "± se" is the standard error of the mean over images, "vs IS K=5000" the mean of
the image-by-image difference from IS with K=5000 and its standard error, "stderr" the mean
Monte-Carlo standard error of one image's estimate (from its own weights).
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from pyrovae.ais import bdmc
from pyrovae.checkpoint import load_run
from pyrovae.data import spread
from pyrovae.evaluation import log_likelihood_report
from pyrovae.runs import load_split

HEADER = (
    "| model | estimator | model evaluations per image | mean log p(x) ± se | vs IS K=5000, "
    "paired | stderr | k̂ < 0.5 | usable | unreliable | seconds |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _se(values: torch.Tensor) -> float:
    return values.std().item() / len(values) ** 0.5


def row(name: str, estimator: str, evaluations: int, report, seconds: float, base) -> str:
    # base: IS K=5000's per-image values on the same images (None for that row itself)
    ll = report.log_px
    bands = report.bands()
    shares = ("n/a",) * 3 if bands["unknown"] == 1 else (
        f"{bands[b]:.0%}" for b in ("good", "ok", "bad"))  # fmt: skip
    diff = ll - base if base is not None else None  # image by image
    paired = "" if diff is None else f"{diff.mean():+.2f} ± {_se(diff):.2f}"
    return (f"| {name} | {estimator} | {evaluations:,} | {ll.mean():.2f} ± {_se(ll):.2f} | "
            f"{paired} | {report.stderr.mean():.3f} | {' | '.join(shares)} | "
            f"{seconds:.0f} |")  # fmt: skip


def score(name: str, run_dir: str, args) -> list[str]:
    vae, config = load_run(run_dir, "cpu")
    config.data_dir = args.data_dir or config.data_dir
    x = load_split(config, "test").images
    x = x[spread(len(x), args.n)]
    reports, seconds = {}, {}
    for k in (5000, 1000):
        start = time.perf_counter()
        reports[k] = log_likelihood_report(vae.model, vae.guide, x, num_samples=k, seed=args.seed)
        seconds[k] = time.perf_counter() - start
    base = reports[5000].log_px
    rows = [row(name, f"IS, K={k}", k, reports[k], seconds[k], None if k == 5000 else base)
            for k in (1000, 5000)]  # fmt: skip
    print("\n".join(rows), flush=True)
    budget = args.chains * args.steps * args.leapfrog  # with gradients
    start = time.perf_counter()
    r = log_likelihood_report(vae.model, vae.guide, x, method="ais", num_samples=args.chains,
                              steps=args.steps, leapfrog=args.leapfrog, seed=args.seed)  # fmt: skip
    label = f"AIS, {args.chains} chains × {args.steps} steps × {args.leapfrog} leapfrog"
    rows.append(row(name, label, budget, r, time.perf_counter() - start, base))
    print(rows[-1], flush=True)
    start = time.perf_counter()
    b = bdmc(vae.model, vae.guide, x[: args.bdmc_n], chains=args.chains, steps=args.steps,
             leapfrog=args.leapfrog, seed=args.seed)  # fmt: skip
    gap_se = _se(b.gap)
    rows.append(f"| {name} | BDMC on {len(b.gap)} simulated images, same AIS | {2 * budget:,} | "
                f"{b.lower.mean():.2f} (lower) … {b.upper.mean():.2f} (upper) | gap "
                f"{b.gap.mean():.2f} ± {gap_se:.2f} | | | | | "
                f"{time.perf_counter() - start:.0f} |")  # fmt: skip
    print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--data-dir", default=None, help="data root (default: each run's)")
    p.add_argument("--n", type=int, default=1000, help="test images scored")
    p.add_argument("--bdmc-n", type=int, default=100, help="simulated images for BDMC")
    p.add_argument("--chains", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--leapfrog", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pyro.enable_validation(False)
    torch.set_grad_enabled(False)
    rows = [r for spec in args.runs for r in score(*spec.split("=", 1), args)]
    print(f"\n{args.n} binarized-MNIST test images; torch threads {torch.get_num_threads()}\n")
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
