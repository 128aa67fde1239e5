"""TraceGraph_ELBO in pyrovae.fit on its fast path (the no-sync twin captured and replayed),
eagerly, and in stock Pyro SVI: seconds per epoch (mean of epochs 2-5) and the last epoch's
train ELBO per datapoint. The pair is tests/test_tracegraph.py's ``Present``: a Bernoulli site
(score-function gradients) with a neural baseline, on 4000 generated datapoints, batches of 100,
Adam lr 0.01, on the CPU::

    OMP_NUM_THREADS=1 python benchmarks/tracegraph.py
"""

import pathlib
import sys
import time

import pyro
import torch
from pyro.infer import SVI, TraceGraph_ELBO

import pyrovae

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
from test_tracegraph import Present, _data  # noqa: E402


def stock(pair, x, epochs=5, batch_size=100):
    svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 0.01}), TraceGraph_ELBO())
    seconds = []
    for _ in range(epochs):
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x)).split(batch_size):
            total += svi.step(x[idx])
        seconds.append(time.perf_counter() - start)
    return seconds, -total / len(x)


def main():
    x = _data(4000)
    for method in ("fast", "eager", "stock"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        pair = Present()
        if method == "stock":
            seconds, elbo = stock(pair, x)
        else:
            h = pyrovae.fit(pair.model, pair.guide, x, loss=TraceGraph_ELBO(), epochs=5,
                            batch_size=100, lr=0.01, progress=False, device="cpu", seed=0,
                            fast=method == "fast")  # fmt: skip
            seconds, elbo = h.seconds, h.train_elbo[-1]
        print(f"{method:6s} {sum(seconds[1:]) / 4:.3f} s/epoch, last train ELBO {elbo:.3f}")


if __name__ == "__main__":
    main()
