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
itself). The data are 32×32 canvases holding 0–2 non-overlapping objects of one size (10 px),
white squares or scikit-learn's 8×8 digits resized, generated from ``--seed``: nothing is
downloaded. Every epoch prints the count accuracy as Pyro's ``main.py`` computes it (the number
of present steps in one draw of the guide against the true count); the figures are the accuracy
curve and a few canvases with the inferred boxes drawn over them beside their reconstructions.

AIR's known trap is to explain one object by several dim windows stacked on it, every step
present. Three of Pyro's own settings avoid it here: z_where's scale prior matched to the
objects (``--scale-prior-mean 3``: a window covers 32/3 ≈ 11 px), windows that start bright
(``--window-bias 2``: two stacked windows overshoot the object) and a z_pres prior strong enough
that an extra window never pays (``--log-pres-prior -60``: about 60 nats an object, far below
the 0.01 of Pyro's tutorial; kept as log-odds, since ``Bernoulli(probs)`` clamps a probability
at float32's 1.2e-7, i.e. at most 16 nats).

    python examples/air.py                              # about a minute and a half on one core
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
from pyrovae.schedules import Ramp

__all__ = ["build_parser", "main", "make_canvases", "AIR", "build_air", "count_accuracy", "FitPath"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--objects", choices=["squares", "digits"], default="squares",
                   help="what the canvases hold: white squares, or scikit-learn's 8×8 digits "
                        "resized")  # fmt: skip
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    p.add_argument("--object-size", type=int, default=10,
                   help="every object's side in pixels (objects never overlap)")  # fmt: skip
    p.add_argument("--n", type=int, default=2000, help="training canvases")
    p.add_argument("--test-n", type=int, default=500, help="held-out canvases scored")
    p.add_argument("--epochs", type=int, default=50, help="passes over the training canvases")
    p.add_argument("--batch-size", type=int, default=64, help="canvases per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--baseline-lr", type=float, default=1e-2,
                   help="the baseline networks' learning rate (Pyro's AIR: its -blr)")  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="AIR's steps (most objects found)")
    p.add_argument("--window", type=int, default=10, help="attention window side in pixels")
    p.add_argument("--rnn", type=int, default=128, help="LSTM hidden size")
    p.add_argument("--hidden", type=int, default=100, help="encoder and decoder hidden size")
    p.add_argument("--z-what", type=int, default=5, help="z_what size")
    p.add_argument("--log-pres-prior", type=float, default=-60.0,
                   help="log k: the prior gives n objects probability ∝ k^n, so each object "
                        "costs about -log k nats (Pyro's --z-pres-prior is k; below float32's "
                        "smallest probability, so kept as log-odds)")  # fmt: skip
    p.add_argument("--anneal-prior-epochs", type=int, default=0,
                   help="if > 0, log k moves linearly, step by step, from --anneal-prior-from to "
                        "--log-pres-prior over this many epochs, then stays (Pyro's "
                        "--anneal-prior lin, fed by fit's step_kwargs); 0: none")  # fmt: skip
    p.add_argument("--anneal-prior-from", type=float, default=-30.0,
                   help="log k at the first step when annealing")  # fmt: skip
    p.add_argument("--scale-prior-mean", type=float, default=3.0,
                   help="z_where's scale prior mean (Pyro's --scale-prior-mean): a window "
                        "covers size/scale pixels, matched to --object-size")  # fmt: skip
    p.add_argument("--scale-prior-sd", type=float, default=0.1,
                   help="z_where's scale prior sd (Pyro's --scale-prior-sd)")  # fmt: skip
    p.add_argument("--window-bias", type=float, default=2.0,
                   help="added to the decoder's output before its sigmoid (Pyro's "
                        "--decoder-output-bias): positive, windows start bright, so two "
                        "windows stacked on one object overshoot it")  # fmt: skip
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


def _shapes(objects: str, side: int) -> list[np.ndarray]:
    # The objects' images (side, side) in [0, 1]: a white square, or the 8×8 digits resized
    # (nearest neighbour).
    if objects == "squares":
        return [np.ones((side, side), np.float32)]
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    rows = np.arange(side) * 8 // side  # (side,)
    return list(digits[:, rows][:, :, rows])


def _places(rng: np.random.Generator, count: int, size: int, side: int) -> list[tuple]:
    # ``count`` top-left corners of non-overlapping side×side boxes on a size×size canvas
    for _ in range(1000):
        corners = [tuple(rng.integers(0, size - side + 1, 2)) for _ in range(count)]
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= side
               for i, a in enumerate(corners) for b in corners[:i]):  # fmt: skip
            return corners
    raise ValueError(f"--object-size {side} leaves no room for {count} objects on a {size}×{size}"
                     " canvas: use a smaller --object-size or a larger --size")  # fmt: skip


def make_canvases(
    n: int, objects: str = "squares", seed: int = 0, size: int = 32, side: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` canvases ``(n, size, size)`` in [0, 1] holding 0, 1 or 2 non-overlapping objects
    of side ``side`` at random positions, and their counts ``(n,)``.

    :param int n: canvases.
    :param str objects: ``"squares"`` or ``"digits"``.
    :param int seed: the generator's seed.
    :param int size: the canvas side in pixels.
    :param int side: every object's side in pixels.
    :raises ValueError: if two objects cannot fit side by side.
    """
    if not 0 < side <= size:
        raise ValueError(f"--object-size must lie in 1..--size ({size}), got {side}")
    rng = np.random.default_rng(seed)
    shapes = _shapes(objects, side)
    counts = rng.integers(0, 3, n)  # (n,)
    x = np.zeros((n, size, size), np.float32)
    for i, count in enumerate(counts):
        for r, c in _places(rng, int(count), size, side):
            x[i, r : r + side, c : c + side] = shapes[rng.integers(len(shapes))]
    return torch.from_numpy(x), torch.from_numpy(counts)


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


def window_to_image(
    z_where: torch.Tensor, window: int, windows: torch.Tensor, size: int
) -> torch.Tensor:
    """Windows ``(n, window²)`` placed on canvases ``(n, size, size)``."""
    n = windows.shape[0]
    grid = F.affine_grid(expand_z_where(z_where), [n, 1, size, size], align_corners=False)
    out = F.grid_sample(windows.view(n, 1, window, window), grid, align_corners=False)
    return out.view(n, size, size)


def image_to_window(z_where: torch.Tensor, window: int, images: torch.Tensor) -> torch.Tensor:
    """The windows ``(n, window²)`` that ``z_where`` points at on canvases ``(n, size, size)``."""
    n, size = images.shape[0], images.shape[-1]
    theta = expand_z_where(z_where_inv(z_where))  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, window, window], align_corners=False)
    return F.grid_sample(images.view(n, 1, size, size), grid, align_corners=False).view(n, -1)


# --- the pair (pyro/examples/air/air.py) ---------------------------------------------------

GuideState = namedtuple("GuideState", ["h", "c", "bl_h", "bl_c", "z_pres", "z_where", "z_what"])


class AIR(nn.Module):
    """Pyro's AIR, shrunk: ``model(data)`` and ``guide(data)`` on canvases ``(n, size, size)``.

    :param int size: the canvas side in pixels.

    :param int steps: the most objects a canvas is explained by.
    :param int window: the attention window's side.
    :param int z_what: the size of each object's code.
    :param int rnn: the guide's (and the baseline's) LSTM size.
    :param int hidden: the encoder's and decoder's hidden size.
    :param bool baselines: give ``z_pres`` a neural baseline (``baseline_value``).
    :param float log_pres_prior: log k, the prior gives n objects probability ∝ k^n.
    :param tuple scale_prior: the mean and sd of z_where's scale (the window covers
        ``size / scale`` pixels of the canvas).
    :param float window_bias: added to the decoder's output before its sigmoid.
    """

    def __init__(self, size: int = 32, steps: int = 3, window: int = 10, z_what: int = 5,
                 rnn: int = 128, hidden: int = 100, baselines: bool = True,
                 log_pres_prior: float = -60.0, scale_prior: tuple[float, float] = (3.0, 0.1),
                 window_bias: float = 2.0):  # fmt: skip
        super().__init__()
        self.size, self.steps, self.window, self.z_what = size, steps, window, z_what
        self.baselines, self.window_bias = baselines, window_bias
        self.likelihood_sd = 0.3
        # Pyro's AIR's priors and decoder: z_where ~ N([scale, 0, 0], [scale sd, 1, 1]); z_pres
        # a truncated geometric (make_prior(k) in its main.py) as log-odds, so that k can lie
        # far below float32's smallest probability (Bernoulli(probs) clamps at 1.2e-7, capping
        # an object's cost at 16 nats); windows through a sigmoid with a bias
        self.register_buffer("where_loc", torch.tensor([scale_prior[0], 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([scale_prior[1], 1.0, 1.0]))
        self.register_buffer("pres_logits", _truncated_geometric(log_pres_prior, steps))
        rnn_in = size * size + 3 + z_what + 1
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

    def model(self, data, log_pres_prior=None):
        """:param log_pres_prior: log k for this step (a per-step keyword, ``fit(...,
        step_kwargs=...)``, as Pyro's ``--anneal-prior`` feeds its model); default the pair's."""
        pyro.module("air", self)
        n = data.shape[0]
        logits = None
        if log_pres_prior is not None:
            logits = _truncated_geometric(log_pres_prior, self.steps)  # (steps,)
        with pyro.plate("data", n):
            x = self.prior(n, data, logits)
            pyro.sample("obs", dist.Normal(x.view(n, -1), self.likelihood_sd).to_event(1),
                        obs=data.view(n, -1))  # fmt: skip

    def prior(self, n: int, data, pres_logits=None) -> torch.Tensor:
        """The canvases ``(n, size, size)`` the prior's steps draw (inside the data plate); replayed
        on a guide's trace, the reconstruction: the mean of p(x|z) at the guide's z."""
        pres_logits = self.pres_logits if pres_logits is None else pres_logits  # (steps,)
        x, z_pres = data.new_zeros(n, self.size, self.size), data.new_ones(n, 1)
        for t in range(self.steps):
            x, z_pres = self.prior_step(t, n, x, z_pres, pres_logits[t])
        return x

    def prior_step(self, t: int, n: int, x, prev_pres, pres_logit):
        """One step of the prior: the canvas ``x`` with one more object if ``z_pres`` says so."""
        # Pyro's Bernoulli(p_t · z_pres_{t-1}): no object after an absent one
        logits = torch.where(prev_pres > 0, pres_logit, -1e4)  # (n, 1)
        z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(logits=logits).to_event(1))  # (n, 1)
        on = z_pres.squeeze(-1).bool()  # (n,): an absent object's other sites are masked out
        where = dist.Normal(self.where_loc.expand(n, 3), self.where_scale.expand(n, 3))
        z_where = pyro.sample(f"z_where_{t}", where.to_event(1).mask(on))  # (n, 3)
        what = dist.Normal(x.new_zeros(n, self.z_what), 1.0)
        z_what = pyro.sample(f"z_what_{t}", what.to_event(1).mask(on))  # (n, z_what)
        window = torch.sigmoid(self.decode(z_what) + self.window_bias)  # (n, window²)
        y = window_to_image(z_where, self.window, window, self.size)  # (n, size, size)
        return x + y * z_pres.view(-1, 1, 1), z_pres

    def guide(self, data, log_pres_prior=None):
        """:param log_pres_prior: unused (Pyro calls model and guide with the same keywords)."""
        pyro.module("air", self)
        n = data.shape[0]
        with pyro.plate("data", n):
            flat = data.reshape(n, -1)  # (n, size²)
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


def _truncated_geometric(log_k, steps: int) -> torch.Tensor:
    # pyro/examples/air/main.py's make_prior, for any number of steps, in log space: each
    # step's log-odds of one more object ``(steps,)``, so that a canvas holds n objects with
    # probability ∝ k^n (n = 0..steps); log_k a number or a 0-dim tensor (a step's keyword)
    log_k = torch.as_tensor(log_k, dtype=torch.float64)
    log_w = torch.arange(steps + 1, dtype=torch.float64, device=log_k.device) * log_k  # (steps+1,)
    odds = [torch.logsumexp(log_w[t + 1 :], 0) - log_w[t] for t in range(steps)]
    return torch.stack(odds).float()


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


def _box(z_where, size: int) -> tuple[tuple[float, float], float]:
    # pyro/examples/air/viz.py's bounding_box: the window's corner and side on the canvas, in
    # imshow's coordinates (pixel i spans i - 0.5 .. i + 0.5)
    s, x, y = (float(v) for v in z_where)
    side = size / s
    corner = [(size - side) / 2 - v / s * size / 2 - 0.5 for v in (x, y)]
    return (corner[0], corner[1]), side


@torch.no_grad()
def plot_reconstructions(air: AIR, x: torch.Tensor, path: Path) -> None:
    """Canvases with the boxes of one draw of the guide over them, above the reconstructions
    (the mean of p(x|z) at that draw)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    trace = pyro.poutine.trace(air.guide).get_trace(x)
    z_where, z_pres = trace.nodes["_RETURN"]["value"]
    with pyro.plate("data", len(x)):
        recon = pyro.poutine.replay(air.prior, trace=trace)(len(x), x)  # (n, size, size)
    fig, axes = plt.subplots(2, len(x), figsize=(1.5 * len(x), 3.4), squeeze=False)
    for i in range(len(x)):
        present = [t for t in range(air.steps) if z_pres[t][i, 0] > 0]
        axes[0, i].imshow(x[i], cmap="gray", vmin=0, vmax=1)
        for k, t in enumerate(present):
            corner, side = _box(z_where[t][i], air.size)
            axes[0, i].add_patch(Rectangle(corner, side, side, fill=False, lw=1.2,
                                           color=("r", "lime", "c", "y")[k % 4]))  # fmt: skip
        axes[0, i].set_title(f"{len(present)} found", fontsize=8)
        axes[1, i].imshow(recon[i].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[], xlim=(-0.5, air.size - 0.5), ylim=(air.size - 0.5, -0.5))
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


def build_air(args: argparse.Namespace, baselines: bool | None = None) -> AIR:
    """The :class:`AIR` pair the parsed ``args`` describe (``baselines`` overrides
    ``--no-baselines``)."""
    baselines = not args.no_baselines if baselines is None else baselines
    return AIR(args.size, args.steps, args.window, args.z_what, args.rnn, args.hidden, baselines,
               args.log_pres_prior, (args.scale_prior_mean, args.scale_prior_sd),
               args.window_bias)  # fmt: skip


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
    step_kwargs = None
    if args.anneal_prior_epochs:  # Pyro's --anneal-prior lin, in log k, through fit
        ramp = Ramp(args.anneal_prior_from, args.log_pres_prior, epochs=args.anneal_prior_epochs)
        step_kwargs = {"log_pres_prior": ramp}
    with FitPath() as path:
        history = pyrovae.fit(air.model, air.guide, x, loss=loss, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, device="cpu",
                              seed=args.seed, callback=after_epoch,
                              optimizer=adam_with_baseline_lr(air, args.baseline_lr),
                              progress=not args.no_progress, step_kwargs=step_kwargs)  # fmt: skip
    return history, accuracy, path.path


def main(args: argparse.Namespace) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, counts = make_canvases(args.n + args.test_n, args.objects, args.seed, args.size,
                              args.object_size)  # fmt: skip
    train_x, test = x[: args.n], (x[args.n :], counts[args.n :])
    pyro.set_rng_seed(args.seed)
    air = build_air(args)
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
            "table": table.tolist(), "step_kwargs": history.step_kwargs}  # fmt: skip


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
