"""Pyro's deep Markov model (examples/dmm.py's pair and generated piano rolls) trained by stock
Pyro SVI and by pyrovae.fit for the same epochs, then scored by pyrovae.log_likelihood and by an
independent importance-sampling loop.

Training, both paths from the same initial weights and seed (the same data order: one
``torch.randperm`` per epoch from the seeded generator), Trace_ELBO, Adam at the same learning
rate, the KL annealing factor rising step by step as Pyro's example computes it:

- stock: ``pyro.infer.SVI`` with ``pyro.optim.Adam``, batches built by Pyro's own
  ``poly.get_mini_batch`` (sorted by length), the loop as Pyro's example writes it;
- stock, unsorted: the same loop on the batches pyrovae builds (``dmm_mini_batch``: Pyro's
  ``get_mini_batch`` without the sort), so each row gets the same draws as in pyrovae: its
  ELBO should equal pyrovae's up to float rounding;
- pyrovae: ``pyrovae.fit`` on :class:`pyrovae.Sequences` with
  ``step_kwargs={"annealing_factor": Ramp(...)}``.

It prints, per path, seconds per epoch (mean of epochs 2..E over ``--repeats`` runs of each
path in ABBA order, the machine's load falling on both alike), the last epoch's training ELBO per
timestep (the annealed loss while the factor is below 1), the test ELBO per timestep from stock
``Trace_ELBO().loss`` on the whole test set, and which path pyrovae took. Then, on the pair
pyrovae trained, test log p(x) per timestep from ``pyrovae.log_likelihood`` (K samples) and from
a plain loop here: K times trace the guide on Pyro's sorted test batch, replay the model on it,
sum each sequence's log p − log q over the sites, then logsumexp over K − log K, unsorted
back to the data's order; per sequence, the two differ by about what two pyrovae estimates with
other draws differ by (printed beside).

    OMP_NUM_THREADS=1 nice python benchmarks/dmm.py            # about 2 min on one busy core
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import pathlib
import time

import pyro
import pyro.contrib.examples.polyphonic_data_loader as poly
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO

import pyrovae
from pyrovae.sequences import dmm_mini_batch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dmm.py"


def _example():
    spec = importlib.util.spec_from_file_location("dmm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def annealing(epoch: int, step: int, steps: int, args) -> float:
    """Pyro's examples/dmm.py's annealing factor, as it computes it."""
    if args.annealing_epochs > 0 and epoch < args.annealing_epochs:
        done = float(step + epoch * steps + 1) / float(args.annealing_epochs * steps)
        return args.minimum_annealing_factor + (1.0 - args.minimum_annealing_factor) * done
    return 1.0


def sorted_mini_batch(batch):
    """Pyro's ``get_mini_batch`` on a batch: sorted by length, as Pyro's example trains."""
    return poly.get_mini_batch(torch.arange(len(batch[0])), batch[0], batch[1])


def stock(dmm, train, args, prepare=sorted_mini_batch) -> tuple[list[float], float]:
    """Pyro's training loop: seconds per epoch and the last epoch's ELBO per timestep."""
    x, lengths = train.tensors
    n, steps = len(x), math.ceil(len(x) / args.batch_size)
    svi = SVI(dmm.model, dmm.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    seconds = []
    for epoch in range(args.epochs):
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(n)
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            batch = prepare((x[idx], lengths[idx]))
            total += svi.step(*batch, annealing_factor=annealing(epoch, step, steps, args))
        seconds.append(time.perf_counter() - start)
    return seconds, -total / train.steps


def with_pyrovae(dmm, train, args) -> tuple[list[float], float, str]:
    """pyrovae.fit: seconds per epoch, the last epoch's ELBO per timestep, the path it took."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("pyrovae").addHandler(handler)
    ramp = pyrovae.schedules.Ramp(args.minimum_annealing_factor, 1.0, args.annealing_epochs)
    try:
        history = pyrovae.fit(dmm.model, dmm.guide, train, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, device="cpu",
                              step_kwargs={"annealing_factor": ramp}, progress=False,
                              seed=args.seed)  # fmt: skip
    finally:
        logging.getLogger("pyrovae").removeHandler(handler)
    eager = [m for m in said if "trains eagerly" in m]
    path = "eager: " + eager[0].split("cannot be replayed: ")[-1] if eager else "captured"
    return history.seconds, history.train_elbo[-1] * len(train) / train.steps, path


def test_elbo(dmm, test) -> float:
    """Stock Pyro's Trace_ELBO on the whole test set (one batch, Pyro's sorted layout), per
    timestep."""
    x, lengths = test.tensors
    batch = poly.get_mini_batch(torch.arange(len(x)), x, lengths)
    with torch.no_grad():
        return -Trace_ELBO().loss(dmm.model, dmm.guide, *batch) / test.steps


def independent_log_px(dmm, test, k: int) -> torch.Tensor:
    """log p(x) of each test sequence (data order) by a plain importance-sampling loop."""
    x, lengths = test.tensors
    order = torch.arange(len(x))
    batch = poly.get_mini_batch(order, x, lengths)  # rows sorted by length
    sorted_rows = torch.sort(lengths)[1].flip(0)  # the sort get_mini_batch makes
    weights = []
    with torch.no_grad(), poutine.block():
        for _ in range(k):
            guide_tr = poutine.trace(dmm.guide).get_trace(*batch)
            model_tr = poutine.trace(poutine.replay(dmm.model, trace=guide_tr)).get_trace(*batch)
            lw = torch.zeros(len(x))
            for trace, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
                trace.compute_log_prob()
                for site in trace.nodes.values():
                    if site["type"] == "sample" and (sign > 0 or not site["is_observed"]):
                        lw = lw + sign * site["log_prob"]  # (N,), masked steps add 0
            weights.append(lw)
    log_px = torch.logsumexp(torch.stack(weights), 0) - math.log(k)  # (N,), sorted rows
    out = torch.empty_like(log_px)
    out[sorted_rows] = log_px  # back to the data's order
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--train-n", type=int, default=200, help="training sequences")
    p.add_argument("--test-n", type=int, default=100, help="test sequences")
    p.add_argument("--epochs", type=int, default=5, help="epochs on each path")
    p.add_argument("--batch-size", type=int, default=20, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    p.add_argument("--annealing-epochs", type=int, default=3, help="KL annealing epochs")
    p.add_argument("--minimum-annealing-factor", type=float, default=0.2,
                   help="the annealing factor at the first step")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=500, help="K for log p(x)")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and draws")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each path, in ABBA order (seconds: their mean)")  # fmt: skip
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    ex = _example()
    train = ex.polyphonic(args.train_n, seed=args.seed)
    test = ex.polyphonic(args.test_n, seed=args.seed + 1)
    runs: dict[str, list] = {"stock Pyro SVI": [], "stock, unsorted": [], "pyrovae.fit": []}
    order = []  # ABBA...: a load that drifts falls on both paths alike
    for r in range(args.repeats):
        order += list(runs)[:: 1 if r % 2 == 0 else -1]
    for name in order:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        dmm = ex.DMM()  # the same initial weights on both paths
        pyro.set_rng_seed(args.seed)  # the same data order
        if name == "pyrovae.fit":
            seconds, elbo, path = with_pyrovae(dmm, train, args)
            trained = dmm
        elif name == "stock, unsorted":  # pyrovae's batches: the same draws on the same rows
            seconds, elbo = stock(dmm, train, args, dmm_mini_batch)
            path = "eager (SVI), batches by pyrovae.sequences.dmm_mini_batch"
        else:
            (seconds, elbo), path = stock(dmm, train, args), "eager (SVI), Pyro's get_mini_batch"
        runs[name].append((sum(seconds[1:]) / max(len(seconds) - 1, 1), elbo, dmm, path))
    rows = []
    pyro.clear_param_store()  # each pair scores with its own module's weights
    for name, done in runs.items():
        per_epoch = sum(r[0] for r in done) / len(done)
        _, elbo, dmm, path = done[-1]  # seeded: every run of a path ends the same
        pyro.set_rng_seed(args.seed)  # the same test draws for both
        rows.append((name, per_epoch, elbo, test_elbo(dmm, test), path))
    print(f"DMM on generated piano rolls: {len(train)} training sequences ({train.steps:,} "
          f"steps), {len(test)} test ({test.steps:,} steps); {args.epochs} epochs, batches of "
          f"{args.batch_size}, Adam lr {args.lr}, KL annealed from "
          f"{args.minimum_annealing_factor} over {args.annealing_epochs} epochs")  # fmt: skip
    print(f"{'path':16s} {'s/epoch':>8s} {'train ELBO/step':>16s} {'test ELBO/step':>15s}  how")
    for name, per_epoch, elbo, tested, path in rows:
        print(f"{name:16s} {per_epoch:8.2f} {elbo:16.6f} {tested:15.3f}  {path}")
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    ours = pyrovae.log_likelihood(trained.model, trained.guide, test,
                                  num_samples=args.num_samples)  # fmt: skip
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = independent_log_px(trained, test, args.num_samples)
    theirs_s = time.perf_counter() - start
    k = args.num_samples
    print(f"\ntest log p(x) per timestep of pyrovae's pair, K={k}:")
    print(f"  pyrovae.log_likelihood      {float(ours.sum()) / test.steps:8.3f}  ({ours_s:.1f} s)")
    print(f"  independent poutine loop    {float(theirs.sum()) / test.steps:8.3f}  "
          f"({theirs_s:.1f} s)")  # fmt: skip
    again = pyrovae.log_likelihood(trained.model, trained.guide, test, num_samples=k)
    for what, a, b in (("pyrovae vs the loop", ours, theirs), ("pyrovae vs pyrovae", ours, again)):
        diff = (a - b).abs()  # (N,): per sequence, rows in the data's order
        print(f"  per sequence |difference|, {what:19s}: median {float(diff.median()):.3f}, "
              f"max {float(diff.max()):.3f} nats")  # fmt: skip
    print(f"  (a second pyrovae estimate, other draws: the Monte-Carlo error of K={k})")


if __name__ == "__main__":
    main()
