"""A deep Markov model on polyphonic sequences, trained by pyrovae.fit and scored per timestep.

Krishnan et al.'s deep Markov model [1], written as Pyro's ``examples/dmm.py`` writes it (its
model and guide take the mini-batch, its time-reversed packed copy, the mask and the lengths,
and a KL ``annealing_factor``), on generated piano rolls: four-voice chord progressions (I, IV,
V, vi in a random key, each chord held for a random number of steps, the bass held or
arpeggiated) of random lengths over 88 keys, in the layout of the polyphonic music data sets
(JSB chorales) Pyro's example downloads. Nothing is downloaded.

The sequences are a :class:`pyrovae.Sequences` (padded tensors with their lengths), whose
preparation (:func:`pyrovae.sequences.dmm_mini_batch`: Pyro's ``get_mini_batch`` without its
sort) ``pyrovae.fit`` and ``pyrovae.log_likelihood`` apply to every batch alike. The KL terms
are annealed as in Pyro's example, the factor rising step by step from
``--minimum-annealing-factor`` to 1 over ``--annealing-epochs``
(``step_kwargs={"annealing_factor": pyrovae.schedules.Ramp(...)}``). It prints the
test ELBO and the importance-sampled log p(x) per timestep, and draws sequences from the trained
model beside the data (``draws.png``) and the train ELBO per sequence by epoch (``elbo.png``).

    python examples/dmm.py                      # 200 sequences, 30 epochs, a minute or two
    python examples/dmm.py --epochs 2 --train-n 40 --out /tmp/dmm

The model and guide are adapted from pyro/examples/dmm.py (Copyright (c) 2017-2019 Uber
Technologies, Inc., Apache-2.0), shrunk, without the inverse autoregressive flows.

References:
  [1] R. G. Krishnan, U. Shalit, D. Sontag, "Structured Inference Networks for Nonlinear State
      Space Models", AAAI 2017.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

import pyrovae
from pyrovae.sequences import Sequences, dmm_mini_batch

__all__ = ["build_parser", "main", "polyphonic", "DMM", "draw_sequences", "plot_piano_rolls"]

KEYS = 88  # piano keys: the data's features per step
MAJOR, MINOR = (0, 4, 7), (0, 3, 7)
PROGRESSION = ((0, MAJOR), (5, MAJOR), (7, MAJOR), (9, MINOR))  # I, IV, V, vi


def polyphonic(n: int, *, min_length: int = 8, max_length: int = 32, seed: int = 0) -> Sequences:
    """``n`` generated piano rolls of random lengths: a chord progression (I, IV, V, vi) in a
    random key, each chord held for 1-4 steps, three voices an octave above a bass that is
    held or arpeggiated; four keys down at every step.

    :param int n: sequences.
    :param int min_length: shortest length (steps).
    :param int max_length: longest length, the padded time axis.
    :param int seed: the generator's seed.
    :returns: :class:`pyrovae.Sequences` of binary ``(n, max_length, 88)`` piano rolls.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)  # (n,)
    x = torch.zeros(n, max_length, KEYS)  # (n, T, 88)
    for i in range(n):
        tonic = int(torch.randint(27, 52, (), generator=g))  # the key's lowest tonic
        hold = int(torch.randint(1, 5, (), generator=g))  # steps per chord
        start = int(torch.randint(0, len(PROGRESSION), (), generator=g))
        arpeggio = bool(torch.rand((), generator=g) < 0.5)
        for t in range(int(lengths[i])):
            degree, triad = PROGRESSION[(start + t // hold) % len(PROGRESSION)]
            root = tonic + degree
            bass = root + triad[t % 3] if arpeggio else root
            x[i, t, [bass, *(root + 12 + k for k in triad)]] = 1.0
    return Sequences(x, lengths)


class Emitter(nn.Module):
    """p(x_t | z_t): Bernoulli probabilities of the keys (adapted from Pyro's example)."""

    def __init__(self, input_dim: int, z_dim: int, emission_dim: int):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, input_dim)
        self.relu = nn.ReLU()

    def forward(self, z_t: torch.Tensor) -> torch.Tensor:
        h1 = self.relu(self.lin_z_to_hidden(z_t))
        h2 = self.relu(self.lin_hidden_to_hidden(h1))
        return torch.sigmoid(self.lin_hidden_to_input(h2))  # (..., input_dim)


class GatedTransition(nn.Module):
    """p(z_t | z_{t-1}): a gated mix of a linear and a nonlinear proposed mean (adapted from
    Pyro's example)."""

    def __init__(self, z_dim: int, transition_dim: int):
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(z_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, z_dim)
        self.lin_sig = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc = nn.Linear(z_dim, z_dim)
        self.lin_z_to_loc.weight.data = torch.eye(z_dim)  # starts as the identity
        self.lin_z_to_loc.bias.data = torch.zeros(z_dim)
        self.relu, self.softplus = nn.ReLU(), nn.Softplus()

    def forward(self, z_t_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(self.relu(self.lin_gate_z_to_hidden(z_t_1))))
        proposed_mean = self.lin_proposed_mean_hidden_to_z(
            self.relu(self.lin_proposed_mean_z_to_hidden(z_t_1))
        )
        loc = (1 - gate) * self.lin_z_to_loc(z_t_1) + gate * proposed_mean
        scale = self.softplus(self.lin_sig(self.relu(proposed_mean)))
        return loc, scale  # (..., z_dim) each


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, x_{t:T}): the RNN's state combined with z_{t-1} (adapted from Pyro's
    example)."""

    def __init__(self, z_dim: int, rnn_dim: int):
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(z_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, z_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, z_dim)
        self.tanh, self.softplus = nn.Tanh(), nn.Softplus()

    def forward(self, z_t_1: torch.Tensor, h_rnn: torch.Tensor):
        h_combined = 0.5 * (self.tanh(self.lin_z_to_hidden(z_t_1)) + h_rnn)
        return self.lin_hidden_to_loc(h_combined), self.softplus(
            self.lin_hidden_to_scale(h_combined)
        )


class DMM(nn.Module):
    """The deep Markov model and its guide, as Pyro's ``examples/dmm.py`` writes them (adapted:
    smaller defaults, no inverse autoregressive flows)."""

    def __init__(self, input_dim: int = KEYS, z_dim: int = 16, emission_dim: int = 32,
                 transition_dim: int = 32, rnn_dim: int = 64):  # fmt: skip
        super().__init__()
        self.emitter = Emitter(input_dim, z_dim, emission_dim)
        self.trans = GatedTransition(z_dim, transition_dim)
        self.combiner = Combiner(z_dim, rnn_dim)
        self.rnn = nn.RNN(input_size=input_dim, hidden_size=rnn_dim, nonlinearity="relu",
                          batch_first=True)  # fmt: skip
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    def model(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):  # fmt: skip
        """p(x_{1:T} | z_{1:T}) p(z_{1:T}), the KL terms scaled by ``annealing_factor``."""
        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        z_prev = self.z_0.expand(mini_batch.size(0), self.z_0.size(0))  # (B, z_dim)
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.trans(z_prev)
                with poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale)
                                      .mask(mini_batch_mask[:, t - 1 : t]).to_event(1))  # fmt: skip
                emission_probs_t = self.emitter(z_t)  # (B, 88)
                pyro.sample(f"obs_x_{t}", dist.Bernoulli(emission_probs_t)
                            .mask(mini_batch_mask[:, t - 1 : t]).to_event(1),
                            obs=mini_batch[:, t - 1, :])  # fmt: skip
                z_prev = z_t

    def guide(self, mini_batch, mini_batch_reversed, mini_batch_mask, mini_batch_seq_lengths,
              annealing_factor=1.0):  # fmt: skip
        """q(z_{1:T} | x_{1:T}): an RNN reads each sequence backwards (the packed reversed
        copy); its states, put back in forward order, feed the combiner step by step."""
        import pyro.contrib.examples.polyphonic_data_loader as poly

        T_max = mini_batch.size(1)
        pyro.module("dmm", self)
        h_0_contig = self.h_0.expand(1, mini_batch.size(0), self.rnn.hidden_size).contiguous()
        rnn_output, _ = self.rnn(mini_batch_reversed, h_0_contig)
        rnn_output = poly.pad_and_reverse(rnn_output, mini_batch_seq_lengths)  # (B, T_max, rnn)
        z_prev = self.z_q_0.expand(mini_batch.size(0), self.z_q_0.size(0))
        with pyro.plate("z_minibatch", len(mini_batch)):
            for t in pyro.markov(range(1, T_max + 1)):
                z_loc, z_scale = self.combiner(z_prev, rnn_output[:, t - 1, :])
                with pyro.poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale)
                                      .mask(mini_batch_mask[:, t - 1 : t]).to_event(1))  # fmt: skip
                z_prev = z_t


def draw_sequences(dmm: DMM, n: int, steps: int) -> torch.Tensor:
    """``n`` piano rolls of ``steps`` steps drawn from the model (latents and keys), by running
    the model with its observations unconditioned (:func:`pyro.poutine.uncondition`).

    :returns: binary draws ``(n, steps, 88)``.
    """
    device = dmm.z_0.device
    blank = torch.zeros(n, steps, dmm.emitter.lin_hidden_to_input.out_features, device=device)
    args = dmm_mini_batch((blank, torch.full((n,), steps, device=device)))
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(poutine.uncondition(dmm.model)).get_trace(*args)
    return torch.stack([trace.nodes[f"obs_x_{t}"]["value"] for t in range(1, steps + 1)], 1)


def plot_piano_rolls(data: Sequences, draws: torch.Tensor, path: Path) -> None:
    """Piano rolls (keys against steps) of data sequences above draws from the model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = len(draws)
    fig = Figure(figsize=(2.6 * m, 5.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, m, squeeze=False)
    rows = [(f"data, length {int(n)}", x[: int(n)]) for x, n in zip(*data.tensors, strict=False)]
    rows = rows[:m] + [("draw from the model", d) for d in draws]
    for ax, (label, roll) in zip(axes.flat, rows, strict=True):
        ax.imshow(roll.T.cpu().numpy(), aspect="auto", origin="lower", cmap="Greys",
                  interpolation="nearest", vmin=0, vmax=1)  # fmt: skip
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("key", fontsize=8)
    fig.suptitle("Piano rolls: test sequences (top) and one draw each from the trained DMM "
                 "(bottom; keys drawn, not their probabilities)", fontsize=10)  # fmt: skip
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--train-n", type=int, default=200, help="training sequences")
    p.add_argument("--test-n", type=int, default=100, help="test sequences")
    p.add_argument("--min-length", type=int, default=8, help="shortest sequence (steps)")
    p.add_argument("--max-length", type=int, default=32, help="longest sequence (steps)")
    p.add_argument("--z-dim", type=int, default=16, help="latent size per step")
    p.add_argument("--emission-dim", type=int, default=32, help="the emitter's hidden units")
    p.add_argument("--transition-dim", type=int, default=32,
                   help="the gated transition's hidden units")  # fmt: skip
    p.add_argument("--rnn-dim", type=int, default=64, help="the guide's RNN state size")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=20, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    p.add_argument("--annealing-epochs", type=int, default=10,
                   help="epochs the KL annealing factor takes to rise to 1 (0: none)")  # fmt: skip
    p.add_argument("--minimum-annealing-factor", type=float, default=0.2,
                   help="the KL annealing factor at the first step")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=500,
                   help="K importance samples per test sequence")  # fmt: skip
    p.add_argument("--draws", type=int, default=4, help="sequences drawn for the figure")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the data, the weights, the data order and every draw")  # fmt: skip
    p.add_argument("--out", default="dmm-out", help="folder for draws.png and elbo.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(args: argparse.Namespace) -> None:
    for key in ("train_n", "test_n", "min_length", "z_dim", "emission_dim", "transition_dim",
                "rnn_dim", "epochs", "batch_size", "num_samples", "draws"):  # fmt: skip
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.annealing_epochs < 0 or not 0 < args.minimum_annealing_factor <= 1:
        raise ValueError("--annealing-epochs must be >= 0 and --minimum-annealing-factor in "
                         f"(0, 1], got {args.annealing_epochs} and "
                         f"{args.minimum_annealing_factor}")  # fmt: skip
    if args.max_length < args.min_length:
        raise ValueError(f"--max-length must be >= --min-length ({args.min_length}), got "
                         f"{args.max_length}")  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    """Train, score and draw; returns the printed numbers as a dict."""
    _check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = {"min_length": args.min_length, "max_length": args.max_length}
    train = polyphonic(args.train_n, seed=args.seed, **shape)
    test = polyphonic(args.test_n, seed=args.seed + 1, **shape)
    print(f"polyphonic: {len(train)} training sequences ({train.steps:,} steps), {len(test)} "
          f"test ({test.steps:,} steps), lengths {args.min_length}-{args.max_length}")  # fmt: skip
    pyro.set_rng_seed(args.seed)
    dmm = DMM(KEYS, args.z_dim, args.emission_dim, args.transition_dim, args.rnn_dim)
    # Pyro's KL annealing: the factor rises step by step from the minimum to 1 (then held)
    ramp = pyrovae.schedules.Ramp(args.minimum_annealing_factor, 1.0, epochs=args.annealing_epochs)
    start = time.perf_counter()
    history = pyrovae.fit(dmm.model, dmm.guide, train, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                          step_kwargs={"annealing_factor": ramp},
                          progress=not args.no_progress)  # fmt: skip
    train_s = time.perf_counter() - start
    per_step = len(train) / train.steps  # an ELBO per sequence, as nats per step
    annealed = " (annealed)" if args.annealing_epochs > args.epochs else ""
    print(f"trained {args.epochs} epochs in {train_s:.1f} s: train ELBO per timestep "
          f"{history.train_elbo[-1] * per_step:.3f}{annealed}")  # fmt: skip
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    elbo = pyrovae.elbo(dmm.model, dmm.guide, test)  # (N,), in test's order
    log_px = pyrovae.log_likelihood(dmm.model, dmm.guide, test, num_samples=args.num_samples,
                                    progress=not args.no_progress)  # fmt: skip
    eval_s = time.perf_counter() - start
    result = {
        "train_elbo_per_step": history.train_elbo[-1] * per_step,
        "test_elbo_per_step": float(elbo.sum()) / test.steps,
        "test_log_px_per_step": float(log_px.sum()) / test.steps,
        "num_samples": args.num_samples,
        "train_seconds": train_s,
    }
    print(f"test: ELBO per timestep {result['test_elbo_per_step']:.3f}, log p(x) per timestep "
          f"{result['test_log_px_per_step']:.3f} nats (K={args.num_samples}, "
          f"{eval_s:.1f} s)")  # fmt: skip
    draws = draw_sequences(dmm, args.draws, args.max_length)
    plot_piano_rolls(test, draws, out / "draws.png")
    title = f"DMM: train ELBO per sequence (KL annealed over {args.annealing_epochs} epochs)"
    pyrovae.plots.plot_history(history.records(), out / "elbo.png", title=title)
    print(f"wrote {out}/draws.png and elbo.png")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
