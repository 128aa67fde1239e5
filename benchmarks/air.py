"""examples/air.py's AIR pair (TraceGraph_ELBO with its neural baselines) trained by stock Pyro
SVI in a hand-written loop and by pyrovae.fit, for the same epochs from the same initial
weights; the count accuracy with and without baselines; and log p(x) from
pyrovae.log_likelihood against an independent importance-sampling loop on the same trained pair.

Printed: the train ELBO per canvas of the last epoch (each step's −loss, summed over the epoch,
as both loops compute it), seconds per epoch (mean of epochs 2 onwards: the first holds
pyrovae's capture), the path pyrovae.fit took, and the count accuracy on the held-out canvases
(one draw of q per canvas, as Pyro's main.py counts)::

    OMP_NUM_THREADS=1 nice python benchmarks/air.py                 # six to eight minutes
    OMP_NUM_THREADS=1 nice python benchmarks/air.py --n 256 --epochs 2 --test-n 64 --k 20
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceGraph_ELBO

import pyrovae

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "air.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_air", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stock(air, x, epochs: int, batch_size: int, lr: float, baseline_lr: float, seed: int):
    """Pyro's own loop: SVI with TraceGraph_ELBO over shuffled batches, the baselines at their
    own learning rate as Pyro's main.py sets it. Returns the seconds of each epoch and the last
    epoch's train ELBO per canvas."""
    adam = pyro.optim.Adam(lambda name: {"lr": baseline_lr if "bl_" in name else lr})
    svi = SVI(air.model, air.guide, adam, TraceGraph_ELBO())
    g = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs):
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            total += svi.step(x[idx])
        seconds.append(time.perf_counter() - start)
    return seconds, -total / len(x)


@torch.no_grad()
def independent_log_px(air, x: torch.Tensor, k: int) -> torch.Tensor:
    """log p(x) per canvas ``(n,)`` by importance sampling written out: K draws of the guide,
    the model replayed on each, log w = Σ log p − Σ log q per canvas, logsumexp − log K."""
    log_w = []
    for _ in range(k):
        guide_trace = poutine.trace(air.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(air.model, trace=guide_trace)).get_trace(x)
        w = x.new_zeros(len(x))
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample" and site["name"] != "data":
                    w = w + sign * site["log_prob"]  # (n,): every site sits in the data plate
        log_w.append(w)
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)  # (n,)


def _fresh(ex, args, fit_args, baselines: bool):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    return ex.build_air(fit_args, baselines)


def main(args: argparse.Namespace) -> None:
    ex = _example()
    fit_args = ex.build_parser().parse_args(["--epochs", str(args.epochs), "--no-progress",
                                             "--seed", str(args.seed)])  # fmt: skip
    x, counts = ex.make_canvases(args.n + args.test_n, "squares", args.seed, fit_args.size,
                                 fit_args.object_size)  # fmt: skip
    train_x, test = x[: args.n], (x[args.n :], counts[args.n :])
    rows = []
    air = _fresh(ex, args, fit_args, True)
    seconds, elbo = stock(air, train_x, args.epochs, fit_args.batch_size, fit_args.lr,
                          fit_args.baseline_lr, args.seed)  # fmt: skip
    rows.append(("Pyro SVI", "TraceGraph_ELBO", "yes", elbo, seconds, "eager (SVI)",
                 ex.count_accuracy(air, *test)[0]))  # fmt: skip
    trained = None
    for baselines in (True, False):
        air = _fresh(ex, args, fit_args, baselines)
        history, _, path = ex.train(air, train_x, test, fit_args, say=lambda line: None)
        loss = "TraceGraph_ELBO" if baselines else "Trace_ELBO"
        rows.append(("pyrovae.fit", loss, "yes" if baselines else "no", history.train_elbo[-1],
                     history.seconds, path, ex.count_accuracy(air, *test)[0]))  # fmt: skip
        trained = trained or air
    print(f"AIR, {args.n} canvases ({fit_args.size}×{fit_args.size}, 0-2 squares of side "
          f"{fit_args.object_size}), {args.epochs} epochs, batches of "
          f"{fit_args.batch_size}, Adam lr {fit_args.lr} (baselines {fit_args.baseline_lr}); "
          f"count accuracy on {args.test_n} held-out canvases")  # fmt: skip
    print(f"{'trainer':12s} {'loss':16s} {'baselines':9s} {'train ELBO':>10s} {'s/epoch':>8s} "
          f"{'count acc':>9s}  path")  # fmt: skip
    for trainer, loss, bl, elbo, seconds, path, acc in rows:
        per_epoch = sum(seconds[1:]) / max(len(seconds) - 1, 1)
        print(f"{trainer:12s} {loss:16s} {bl:9s} {elbo:10.2f} {per_epoch:8.2f} {acc:9.3f}  "
              f"{path}")  # fmt: skip
    test_x = test[0]
    torch.manual_seed(args.seed)
    ours = pyrovae.log_likelihood(trained.model, trained.guide, test_x, num_samples=args.k)
    theirs = independent_log_px(trained, test_x, args.k)
    diff = ours - theirs  # (n,): independent draws, so the paired difference is noise alone
    print(f"log p(x) per canvas, the pyrovae.fit TraceGraph_ELBO pair, n={args.test_n}, "
          f"K={args.k}: pyrovae.log_likelihood {float(ours.mean()):.2f}, independent "
          f"importance-sampling loop {float(theirs.mean()):.2f}; difference "
          f"{float(diff.mean()):.2f} ± {float(diff.std() / math.sqrt(len(diff))):.2f} "
          "(one standard error)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=2000, help="training canvases")
    p.add_argument("--test-n", type=int, default=500, help="held-out canvases (the example's)")
    p.add_argument("--epochs", type=int, default=50,
                   help="epochs of each training run (the example's default)")  # fmt: skip
    p.add_argument("--k", type=int, default=100, help="importance samples for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="canvases, weights, data order, draws")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
