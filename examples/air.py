"""Attend-Infer-Repeat on generated multi-object canvases, trained by pyrovae.fit (TraceGraph_ELBO).

AIR [1] explains a canvas as a variable number of objects, found one at a time: at each of up to
three steps a Bernoulli ``z_pres`` says whether there is one more object, ``z_where`` (scale,
x, y) where it is, and ``z_what`` what it looks like; a spatial transformer places the decoded
window on the canvas. ``z_pres`` is discrete, so its gradient is a score-function estimate,
whose variance the guide's baselines (a recurrent network trained alongside, passed as
``infer={"baseline": {"baseline_value": ...}}``) reduce: pyrovae trains them with
``loss=TraceGraph_ELBO()``, captured and replayed on its fast path.

The model and guide are Pyro's ``examples/air`` (air.py and modules.py), shrunk for a CPU and
with the data plate over the batch pyrovae hands the pair (Pyro's guide subsamples its data
itself). The data are 50×50 canvases holding 0–2 objects, squares or scikit-learn's 8×8 digits
upscaled, generated from ``--seed``: nothing is downloaded. Every epoch prints the count
accuracy as Pyro's ``main.py`` computes it (the number of present steps in one draw of the guide
against the true count); the figures are the accuracy curve and a few canvases with the
inferred boxes drawn over them beside their reconstructions.

    python examples/air.py --epochs 20                  # squares, about a minute an epoch
    python examples/air.py --objects digits --no-baselines

Adapted from pyro/examples/air (Copyright (c) 2017-2019 Uber Technologies, Inc.), Apache-2.0.

References:
  [1] S. M. A. Eslami, N. Heess, T. Weber, Y. Tassa, D. Szepesvari, K. Kavukcuoglu,
      G. E. Hinton, "Attend, Infer, Repeat: Fast Scene Understanding with Generative Models",
      NeurIPS 2016.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from torch import nn

import pyrovae

__all__ = ["build_parser", "main", "make_canvases", "AIR", "count_accuracy", "FitPath"]

SIZE = 50  # canvas side in pixels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--objects", choices=["squares", "digits"], default="squares",
                   help="what the canvases hold: squares, or upscaled 8×8 digits")  # fmt: skip
    p.add_argument("--n", type=int, default=2000, help="training canvases")
    p.add_argument("--test-n", type=int, default=500, help="held-out canvases scored")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training canvases")
    p.add_argument("--batch-size", type=int, default=64, help="canvases per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--baseline-lr", type=float, default=1e-2,
                   help="the baseline networks' learning rate (Pyro's AIR: its -blr)")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="AIR's steps (most objects found)")
    p.add_argument("--window", type=int, default=16, help="attention window side in pixels")
    p.add_argument("--rnn", type=int, default=128, help="LSTM hidden size")
    p.add_argument("--hidden", type=int, default=100, help="encoder and decoder hidden size")
    p.add_argument("--z-what", type=int, default=10, help="z_what size")
    p.add_argument("--pres-prior", type=float, default=0.01,
                   help="k: the prior gives n objects probability ∝ k^n")  # fmt: skip
    p.add_argument("--window-bias", type=float, default=-2.0,
                   help="added to the decoder's output before its sigmoid (Pyro's "
                        "--decoder-output-bias)")  # fmt: skip
    p.add_argument("--no-baselines", action="store_true",
                   help="no baselines: train with Trace_ELBO (the plain score-function "
                        "estimator)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=100,
                   help="K importance samples for the test log p(x)")  # fmt: skip
    p.add_argument("--out", default="air-out", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the canvases, weights, data order and draws")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --- data ----------------------------------------------------------------------------------


def _shapes(objects: str) -> list[np.ndarray]:
    # The objects' images in [0, 1]: squares of side 10-14, or the 8×8 digits upscaled to 16×16.
    if objects == "squares":
        return [np.ones((s, s), np.float32) for s in range(10, 15)]
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    return list(np.kron(digits, np.ones((2, 2), np.float32)))


def make_canvases(
    n: int, objects: str = "squares", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases ``(n, 50, 50)`` in [0, 1] holding 0, 1 or 2 objects at random positions
    (overlaps add, clipped at 1), and their counts ``(n,)``.

    :param int n: canvases.
    :param str objects: ``"squares"`` or ``"digits"``.
    :param int seed: the generator's seed.
    """
    rng = np.random.default_rng(seed)
    shapes = _shapes(objects)
    counts = rng.integers(0, 3, n)  # (n,)
    x = np.zeros((n, SIZE, SIZE), np.float32)
    for i, count in enumerate(counts):
        for _ in range(count):
            shape = shapes[rng.integers(len(shapes))]
            r, c = rng.integers(0, SIZE - shape.shape[0] + 1, 2)
            x[i, r : r + shape.shape[0], c : c + shape.shape[1]] += shape
    return torch.from_numpy(np.clip(x, 0.0, 1.0)), torch.from_numpy(counts)


# --- networks (pyro/examples/air/modules.py) -----------------------------------------------


def mlp(sizes: list[int], nl=nn.ReLU) -> nn.Sequential:
    """Linear layers between ``sizes`` with ``nl`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nl()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


# --- spatial transformer (pyro/examples/air/air.py) ----------------------------------------


def expand_z_where(z_where: torch.Tensor) -> torch.Tensor:
    """``(n, 3)`` [s, x, y] → ``(n, 2, 3)`` [[s, 0, x], [0, s, y]]."""
    n = z_where.shape[0]
    out = torch.cat((z_where.new_zeros(n, 1), z_where), 1)  # (n, 4): [0, s, x, y]
    return out[:, [1, 0, 2, 0, 1, 3]].view(n, 2, 3)


def z_where_inv(z_where: torch.Tensor) -> torch.Tensor:
    """``(n, 3)`` [s, x, y] → [1/s, -x/s, -y/s], the inverse transform."""
    out = torch.cat((torch.ones_like(z_where[:, :1]), -z_where[:, 1:]), 1)
    return out / z_where[:, 0:1]


def window_to_image(z_where: torch.Tensor, window: int, windows: torch.Tensor) -> torch.Tensor:
    """Windows ``(n, window²)`` placed on canvases ``(n, 50, 50)``."""
    n = windows.shape[0]
    grid = F.affine_grid(expand_z_where(z_where), [n, 1, SIZE, SIZE], align_corners=False)
    out = F.grid_sample(windows.view(n, 1, window, window), grid, align_corners=False)
    return out.view(n, SIZE, SIZE)


def image_to_window(z_where: torch.Tensor, window: int, images: torch.Tensor) -> torch.Tensor:
    """The windows ``(n, window²)`` that ``z_where`` points at on canvases ``(n, 50, 50)``."""
    n = images.shape[0]
    theta = expand_z_where(z_where_inv(z_where))  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, window, window], align_corners=False)
    return F.grid_sample(images.view(n, 1, SIZE, SIZE), grid, align_corners=False).view(n, -1)


# --- the pair (pyro/examples/air/air.py) ---------------------------------------------------

GuideState = namedtuple("GuideState", ["h", "c", "bl_h", "bl_c", "z_pres", "z_where", "z_what"])


class AIR(nn.Module):
    """Pyro's AIR, shrunk: ``model(data)`` and ``guide(data)`` on canvases ``(n, 50, 50)``.

    :param int steps: the most objects a canvas is explained by.
    :param int window: the attention window's side.
    :param int z_what: the size of each object's code.
    :param int rnn: the guide's (and the baseline's) LSTM size.
    :param int hidden: the encoder's and decoder's hidden size.
    :param bool baselines: give ``z_pres`` a neural baseline (``baseline_value``).
    :param float pres_prior: k, the prior gives n objects probability ∝ k^n.
    :param float window_bias: added to the decoder's output before its sigmoid.
    """

    def __init__(self, steps: int = 3, window: int = 16, z_what: int = 10, rnn: int = 128,
                 hidden: int = 100, baselines: bool = True, pres_prior: float = 0.01,
                 window_bias: float = -2.0):  # fmt: skip
        super().__init__()
        self.steps, self.window, self.z_what, self.baselines = steps, window, z_what, baselines
        self.window_bias = window_bias
        self.likelihood_sd = 0.3
        # the priors and decoder of the settings Pyro's AIR tutorial trains with: z_where ~
        # N([3, 0, 0], [0.2, 1, 1]); z_pres a truncated geometric (make_prior(k) in its
        # main.py, --z-pres-prior 0.01); windows through a sigmoid, biased dark (-2)
        self.register_buffer("where_loc", torch.tensor([3.0, 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([0.2, 1.0, 1.0]))
        self.pres_prior = _truncated_geometric(pres_prior, steps)
        rnn_in = SIZE * SIZE + 3 + z_what + 1
        self.rnn = nn.LSTMCell(rnn_in, rnn)
        self.encode = mlp([window * window, hidden, 2 * z_what])
        self.decode = mlp([z_what, hidden, window * window])
        self.predict = mlp([rnn, 1 + 2 * 3])
        self.bl_rnn = nn.LSTMCell(rnn_in, rnn)
        self.bl_predict = mlp([rnn, 1])
        self.h_init = nn.Parameter(torch.zeros(1, rnn))
        self.c_init = nn.Parameter(torch.zeros(1, rnn))
        self.bl_h_init = nn.Parameter(torch.zeros(1, rnn))
        self.bl_c_init = nn.Parameter(torch.zeros(1, rnn))
        self.z_where_init = nn.Parameter(torch.zeros(1, 3))
        self.z_what_init = nn.Parameter(torch.zeros(1, z_what))

    def model(self, data):
        pyro.module("air", self)
        n = data.shape[0]
        with pyro.plate("data", n):
            x = self.prior(n, data)
            pyro.sample("obs", dist.Normal(x.view(n, -1), self.likelihood_sd).to_event(1),
                        obs=data.view(n, -1))  # fmt: skip

    def prior(self, n: int, data) -> torch.Tensor:
        """The canvases ``(n, 50, 50)`` the prior's steps draw (inside the data plate); replayed
        on a guide's trace, the reconstruction: the mean of p(x|z) at the guide's z."""
        x, z_pres = data.new_zeros(n, SIZE, SIZE), data.new_ones(n, 1)
        for t in range(self.steps):
            x, z_pres = self.prior_step(t, n, x, z_pres)
        return x

    def prior_step(self, t: int, n: int, x, prev_pres):
        """One step of the prior: the canvas ``x`` with one more object if ``z_pres`` says so."""
        pres = dist.Bernoulli(self.pres_prior[t] * prev_pres).to_event(1)
        z_pres = pyro.sample(f"z_pres_{t}", pres)  # (n, 1)
        on = z_pres.squeeze(-1).bool()  # (n,): an absent object's other sites are masked out
        where = dist.Normal(self.where_loc.expand(n, 3), self.where_scale.expand(n, 3))
        z_where = pyro.sample(f"z_where_{t}", where.to_event(1).mask(on))  # (n, 3)
        what = dist.Normal(x.new_zeros(n, self.z_what), 1.0)
        z_what = pyro.sample(f"z_what_{t}", what.to_event(1).mask(on))  # (n, z_what)
        window = torch.sigmoid(self.decode(z_what) + self.window_bias)  # (n, window²)
        y = window_to_image(z_where, self.window, window)  # (n, 50, 50)
        return x + y * z_pres.view(-1, 1, 1), z_pres

    def guide(self, data):
        pyro.module("air", self)
        n = data.shape[0]
        with pyro.plate("data", n):
            flat = data.reshape(n, -1)  # (n, 2500)
            state = GuideState(
                h=self.h_init.expand(n, -1), c=self.c_init.expand(n, -1),
                bl_h=self.bl_h_init.expand(n, -1), bl_c=self.bl_c_init.expand(n, -1),
                z_pres=data.new_ones(n, 1), z_where=self.z_where_init.expand(n, -1),
                z_what=self.z_what_init.expand(n, -1),
            )  # fmt: skip
            z_where, z_pres = [], []
            for t in range(self.steps):
                state = self.guide_step(t, state, data, flat)
                z_where.append(state.z_where)
                z_pres.append(state.z_pres)
        return z_where, z_pres

    def guide_step(self, t: int, prev: GuideState, data, flat) -> GuideState:
        """One step of the guide: attend (``z_pres``, ``z_where``), then encode (``z_what``)."""
        rnn_input = torch.cat((flat, prev.z_where, prev.z_what, prev.z_pres), 1)
        h, c = self.rnn(rnn_input, (prev.h, prev.c))
        out = self.predict(h)  # (n, 7)
        pres_p = torch.sigmoid(out[:, :1])
        where_loc, where_scale = out[:, 1:4], F.softplus(out[:, 4:])
        infer, bl_h, bl_c = self.baseline_step(prev, flat)
        z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(pres_p * prev.z_pres).to_event(1),
                             infer=infer)  # fmt: skip
        on = z_pres.squeeze(-1).bool()  # (n,)
        where = dist.Normal(where_loc + self.where_loc, where_scale * self.where_scale)
        z_where = pyro.sample(f"z_where_{t}", where.to_event(1).mask(on))  # (n, 3)
        code = self.encode(image_to_window(z_where, self.window, data))  # (n, 2 z_what)
        what_loc, what_scale = code[:, : self.z_what], F.softplus(code[:, self.z_what :])
        z_what = pyro.sample(f"z_what_{t}",
                             dist.Normal(what_loc, what_scale).to_event(1).mask(on))  # fmt: skip
        return GuideState(h, c, bl_h, bl_c, z_pres, z_where, z_what)

    def baseline_step(self, prev: GuideState, flat):
        """``z_pres``'s baseline from its own LSTM, on inputs cut from the guide's graph (the
        baseline's loss must not train the guide), zero for canvases already finished."""
        if not self.baselines:
            return {}, prev.bl_h, prev.bl_c
        rnn_input = torch.cat(
            (flat, prev.z_where.detach(), prev.z_what.detach(), prev.z_pres.detach()), 1
        )
        bl_h, bl_c = self.bl_rnn(rnn_input, (prev.bl_h, prev.bl_c))
        value = self.bl_predict(bl_h) * prev.z_pres  # (n, 1)
        return {"baseline": {"baseline_value": value.squeeze(-1)}}, bl_h, bl_c


def _truncated_geometric(k: float, steps: int) -> list[float]:
    # pyro/examples/air/main.py's make_prior, for any number of steps: each step's success
    # probability, so that a canvas holds n objects with probability ∝ k^n (n = 0..steps)
    weights = [k**n for n in range(steps + 1)]
    return [sum(weights[t + 1 :]) / sum(weights[t:]) for t in range(steps)]


def adam_with_baseline_lr(air: AIR, baseline_lr: float):
    """An optimizer for ``pyrovae.fit(optimizer=...)``: Adam with the baseline networks
    (``bl_*``) at their own learning rate, as Pyro's AIR example sets them."""
    baseline = {id(p) for name, p in air.named_parameters() if name.startswith("bl_")}

    def build(params, lr: float, **kwargs) -> torch.optim.Optimizer:
        params = list(params)
        rest = [p for p in params if id(p) not in baseline]
        groups = [{"params": rest}, {"params": [p for p in params if id(p) in baseline],
                                     "lr": baseline_lr}]  # fmt: skip
        return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, **kwargs)

    return build


# --- counting, the path fit took, figures ----------------------------------------------------


@torch.no_grad()
def count_accuracy(air: AIR, x: torch.Tensor, counts: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Pyro's main.py's count accuracy: the share of canvases whose number of present steps in
    one draw of the guide equals the true count; and the ``(3, steps + 1)`` table of true
    against inferred counts."""
    z_pres = air.guide(x)[1]
    inferred = sum(z.squeeze(-1) for z in z_pres).long()  # (n,)
    table = torch.zeros(3, air.steps + 1, dtype=torch.long)
    table.index_put_((counts.long(), inferred), torch.ones_like(inferred), accumulate=True)
    return float((inferred == counts).float().mean()), table


class FitPath(logging.Handler):
    """Which path :func:`pyrovae.fit` took, from the ``pyrovae`` log while the block runs:
    :attr:`path` is ``"captured"`` or ``"eager: <the reason>"``; other warnings are printed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.path = "eager"
        self._logger = logging.getLogger("pyrovae")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "replaying the captured loss" in message:
            self.path = "captured"
        elif "cannot be replayed: " in message:
            self.path = "eager: " + message.split("cannot be replayed: ", 1)[1]
        elif record.levelno >= logging.WARNING:
            print(message, file=sys.stderr)

    def __enter__(self) -> FitPath:
        self._level = self._logger.level
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def _box(z_where) -> tuple[tuple[float, float], float]:
    # pyro/examples/air/viz.py's bounding_box: the window's corner and side on the canvas
    s, x, y = (float(v) for v in z_where)
    side = SIZE / s
    return ((SIZE - side) / 2 - x / s * SIZE / 2, (SIZE - side) / 2 - y / s * SIZE / 2), side


@torch.no_grad()
def plot_reconstructions(air: AIR, x: torch.Tensor, path: Path) -> None:
    """Canvases with the boxes of one draw of the guide over them, above the reconstructions
    (the mean of p(x|z) at that draw)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    trace = pyro.poutine.trace(air.guide).get_trace(x)
    z_where, z_pres = trace.nodes["_RETURN"]["value"]
    with pyro.plate("data", len(x)):
        recon = pyro.poutine.replay(air.prior, trace=trace)(len(x), x)  # (n, 50, 50)
    fig, axes = plt.subplots(2, len(x), figsize=(1.5 * len(x), 3.4), squeeze=False)
    for i in range(len(x)):
        present = [t for t in range(air.steps) if z_pres[t][i, 0] > 0]
        axes[0, i].imshow(x[i], cmap="gray", vmin=0, vmax=1)
        for k, t in enumerate(present):
            corner, side = _box(z_where[t][i])
            axes[0, i].add_patch(Rectangle(corner, side, side, fill=False, lw=1.2,
                                           color=("r", "lime", "c", "y")[k % 4]))  # fmt: skip
        axes[0, i].set_title(f"{len(present)} found", fontsize=8)
        axes[1, i].imshow(recon[i].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[], xlim=(-0.5, SIZE - 0.5), ylim=(SIZE - 0.5, -0.5))
    axes[0, 0].set_ylabel("data, boxes", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    fig.suptitle("held-out canvases: boxes of one draw of z ~ q(z|x); reconstructions: the mean "
                 "of p(x|z) at that draw", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(accuracy: list[float], n: int, label: str, path: Path) -> None:
    """The count accuracy after every epoch."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(range(1, len(accuracy) + 1), accuracy, marker="o", ms=3, label=label)
    ax.axhline(1 / 3, color="grey", lw=0.8, ls=":", label="1/3: a guess among 0, 1, 2")
    ax.set(xlabel="epoch", ylabel="count accuracy", ylim=(0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"count accuracy, {n} held-out canvases\n(one draw of q per canvas)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the experiment --------------------------------------------------------------------------


def train(air: AIR, x, test, args, say=print):
    """Train ``air`` on canvases ``x`` with pyrovae.fit (TraceGraph_ELBO with the baselines, or
    Trace_ELBO without), printing the count accuracy on ``test`` (canvases, counts) after every
    epoch. Returns the history, the accuracies and the path fit took."""
    accuracy: list[float] = []

    def after_epoch(record: dict) -> None:
        acc, _ = count_accuracy(air, *test)
        accuracy.append(acc)
        say(f"epoch {record['epoch']:3d}  train ELBO {record['train_elbo']:9.2f}  "
            f"count accuracy {acc:.3f}  ({record['seconds']:.1f} s)")  # fmt: skip

    loss = Trace_ELBO() if not air.baselines else TraceGraph_ELBO()
    with FitPath() as path:
        history = pyrovae.fit(air.model, air.guide, x, loss=loss, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, device="cpu",
                              seed=args.seed, callback=after_epoch,
                              optimizer=adam_with_baseline_lr(air, args.baseline_lr),
                              progress=not args.no_progress)  # fmt: skip
    return history, accuracy, path.path


def main(args: argparse.Namespace) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, counts = make_canvases(args.n + args.test_n, args.objects, args.seed)
    train_x, test = x[: args.n], (x[args.n :], counts[args.n :])
    pyro.set_rng_seed(args.seed)
    air = AIR(args.steps, args.window, args.z_what, args.rnn, args.hidden, not args.no_baselines,
              args.pres_prior, args.window_bias)  # fmt: skip
    name = "TraceGraph_ELBO, baselines" if air.baselines else "Trace_ELBO, no baselines"
    print(f"AIR on {args.n} canvases of {args.objects} ({name})")
    history, accuracy, path = train(air, train_x, test, args)
    print(f"pyrovae.fit took the {path} path; {np.mean(history.seconds[1:] or history.seconds):.2f}"
          " s per epoch")  # fmt: skip
    acc, table = count_accuracy(air, *test)
    print(f"count accuracy {acc:.3f}; rows: true count 0-2, columns: inferred 0-{air.steps}")
    print("\n".join("  " + " ".join(f"{v:5d}" for v in row) for row in table.tolist()))
    test_x = test[0]
    log_px = pyrovae.log_likelihood(air.model, air.guide, test_x, num_samples=args.num_samples)
    elbo = pyrovae.elbo(air.model, air.guide, test_x)
    print(f"held-out (n={len(test_x)}): ELBO {float(elbo.mean()):.2f}, importance-sampled log p(x) "
          f"{float(log_px.mean()):.2f} nats (K={args.num_samples})")  # fmt: skip
    plot_reconstructions(air, test_x[:8], out / "reconstructions.png")
    plot_accuracy(accuracy, len(test_x), name, out / "count_accuracy.png")
    return {"accuracy": accuracy, "train_elbo": history.train_elbo, "seconds": history.seconds,
            "path": path, "test_elbo": float(elbo.mean()), "test_log_px": float(log_px.mean()),
            "table": table.tolist()}  # fmt: skip


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
