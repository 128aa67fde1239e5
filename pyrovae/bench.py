"""``pyrovae bench``: pyrovae against hand-written PyTorch and stock Pyro, in one process, on
the same data, networks and batch sizes.

Training (images/s): :func:`pyrovae.fit` on its fast path (the loss captured once and replayed)
and eagerly (``fast=False``); the same VAE written as plain functions with ``pyro.module``
(Pyro's tutorial idiom), trained by ``fit``; a hand-written PyTorch loop computing the same
single-sample ELBO (Monte-Carlo KL, as ``Trace_ELBO``) with the same Adam; and a stock Pyro
loop (``SVI.step`` per batch from a ``DataLoader``, as in Pyro's VAE example). Methods run in
interleaved rounds of one epoch each after a warm-up round, and the median round is reported, so
noise on a shared machine hits all of them alike. Pyro's validation is off for all of them (it is
a debugging aid that checks values on every step).

Evaluation (seconds): :func:`pyrovae.log_likelihood` against a hand-written importance-sampling
loop with the same chunks, on the same images and K, interleaved likewise; with the achieved
FLOP rate of the dense layers and the peak memory each run added.
"""

from __future__ import annotations

import copy
import math
import resource
import statistics
import threading
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F

from .config import Config, build_vae
from .evaluation import DEFAULT_CHUNK_ELEMENTS, log_likelihood, plan_chunks
from .training import TrainState, fit

__all__ = [
    "ARCHITECTURES",
    "plain_function_pair",
    "bench_training",
    "bench_evaluation",
    "handwritten_epoch",
    "handwritten_log_likelihood",
    "stock_pyro_epoch",
]

#: Networks by name: config fields.
ARCHITECTURES = {
    "mlp": {"hidden": (400,), "z_dim": 50, "gated": False},  # the classic 784-400-50 MLP
    "vampprior": {"hidden": (300, 300), "z_dim": 40, "gated": True},  # GatedDense(300) x 2
}


def _normal_log_prob(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def _log_weights(enc, dec, x, k):
    # log p(x, z) − log q(z|x) for k particles: (k, N), by hand (Bernoulli likelihood).
    loc, scale = enc(x)  # (N, z) each
    z = loc + scale * torch.randn((k, *loc.shape), device=x.device)  # (k, N, z)
    logits = dec(z).select(-4, 0)  # (k, N, C, H, W)
    log_px_z = (
        -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        .flatten(-3)
        .sum(-1)
    )
    log_pz = _normal_log_prob(z, torch.zeros_like(z), torch.ones_like(z))
    return log_px_z + log_pz - _normal_log_prob(z, loc, scale)


def plain_function_pair(enc, dec, z_dim: int):
    """The same VAE written as Pyro's VAE tutorial writes it: plain functions that register the
    networks with ``pyro.module`` (no PyroModule), a ``"data"`` plate, Bernoulli pixels."""
    import pyro.distributions as dist

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            logits = dec(z).select(-4, 0)  # (N, C, H, W)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(3),
                        obs=x)  # fmt: skip

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", x.shape[0]):
            loc, scale = enc(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def handwritten_epoch(enc, dec, optimizer, x, batch_size) -> float:
    """One epoch of the single-sample ELBO in plain PyTorch; returns the ELBO per image."""
    perm = torch.randperm(len(x), device=x.device)
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        loss = -_log_weights(enc, dec, x[perm[i : i + batch_size]], 1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return -float(total) / len(x)


def stock_pyro_epoch(svi, loader) -> float:
    """One epoch the way Pyro's VAE example trains: ``svi.step`` per DataLoader batch, in a
    param store of its own (so same-named parameters of other models stay out of it)."""
    total, n = 0.0, 0
    with pyro.get_param_store().scope():
        for (xb,) in loader:
            total += svi.step(xb)
            n += len(xb)
    return -total / n


@torch.no_grad()
def handwritten_log_likelihood(enc, dec, x, k, max_chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """Importance-sampled log p(x) in plain PyTorch, chunked like pyrovae's."""
    b, chunk = plan_chunks(len(x), k, x[0].numel(), None, max_chunk_elements)
    out = []
    for i in range(0, len(x), b):
        xb = x[i : i + b]
        parts = [
            _log_weights(enc, dec, xb, min(chunk, k - j)).logsumexp(0, True)
            for j in range(0, k, chunk)
        ]
        out.append(torch.cat(parts).logsumexp(0) - math.log(k))
    return torch.cat(out)


class _PeakMemory:
    # Peak memory added while the block runs: CUDA's allocator statistics on a GPU; on the CPU,
    # the resident set size sampled every 5 ms.
    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self._base)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self._base)


def _timed(run: Callable, device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_training(x, config: Config, rounds: int = 3, device="cpu") -> dict[str, list[float]]:
    """Images/s per epoch for each training method on images ``x``.

    One fast-path :func:`~pyrovae.fit` run of ``rounds + 1`` epochs drives the benchmark: after
    each of its epochs the callback runs one epoch of every other method, so all of them share
    the machine's state round by round. The first round (which includes the capture) is a
    warm-up and is not reported; ``fit``'s epochs are timed by its own per-epoch clock.
    """
    x = x.to(device)
    vae, eager_vae, pyro_vae = (build_vae(config).to(device) for _ in range(3))
    enc, dec = copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=config.lr)
    svi = pyro.infer.SVI(pyro_vae.model, pyro_vae.guide, pyro.optim.Adam({"lr": config.lr}),
                         pyro.infer.Trace_ELBO())  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x), batch_size=config.batch_size, shuffle=True
    )
    kwargs = {"batch_size": config.batch_size, "lr": config.lr, "device": device, "progress": False}
    plain = copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)
    plain_model, plain_guide = plain_function_pair(*plain, config.z_dim)
    plain_state = TrainState()  # one optimizer across its one-epoch fit calls
    others = {
        "pyrovae.fit (eager)": lambda: fit(
            eager_vae.model, eager_vae.guide, x, epochs=1, fast=False, **kwargs
        ).seconds[0],
        "plain functions (fit)": lambda: fit(
            plain_model, plain_guide, x, epochs=plain_state.epoch + 1, state=plain_state, **kwargs
        ).seconds[0],
        "hand-written PyTorch": lambda: _timed(
            lambda: handwritten_epoch(enc, dec, opt, x, config.batch_size), device
        ),
        "stock Pyro (SVI.step)": lambda: _timed(lambda: stock_pyro_epoch(svi, loader), device),
    }
    speeds: dict[str, list[float]] = {"pyrovae.fit (fast path)": [], **{k: [] for k in others}}

    def interleave(record):
        warm = record["epoch"] == 1
        if not warm:
            speeds["pyrovae.fit (fast path)"].append(len(x) / record["seconds"])
        for name, run in others.items():
            seconds = run()
            if not warm:
                speeds[name].append(len(x) / seconds)

    with pyro.validation_enabled(False):
        fit(vae.model, vae.guide, x, epochs=rounds + 1, callback=interleave, **kwargs)
    return speeds


def bench_evaluation(x, config: Config, k: int, rounds: int = 2, device="cpu") -> dict:
    """Seconds (median of ``rounds`` after a warm-up) and peak added memory to score images
    ``x`` with K=``k`` importance samples, each way."""
    x = x.to(device)
    vae = build_vae(config).to(device).eval()
    methods = {
        "pyrovae.log_likelihood": lambda: log_likelihood(vae.model, vae.guide, x, num_samples=k),
        "hand-written IS": lambda: handwritten_log_likelihood(vae.encoder, vae.decoder, x, k),
    }
    out = {name: {"seconds": [], "memory": 0} for name in methods}
    with pyro.validation_enabled(False):
        for r in range(rounds + 1):
            for name, run in methods.items():
                with _PeakMemory(device) as mem:
                    seconds = _timed(run, device)
                if r:
                    out[name]["seconds"].append(seconds)
                    out[name]["memory"] = max(out[name]["memory"], mem.peak)
    return out


def _dense_flops(config: Config, n: int, k: int) -> float:
    # Multiply-adds of the dense layers, ×2: the encoder once per image, the decoder per particle.
    sizes = [math.prod(config.x_shape), *config.hidden]
    gate = 2 if config.gated else 1
    enc = (
        sum(gate * a * b for a, b in zip(sizes, sizes[1:], strict=False))
        + 2 * sizes[-1] * config.z_dim
    )
    dec_sizes = [config.z_dim, *reversed(config.hidden)]
    dec = sum(gate * a * b for a, b in zip(dec_sizes, dec_sizes[1:], strict=False))
    dec += dec_sizes[-1] * math.prod(config.x_shape)
    return 2.0 * n * (enc + k * dec)


def main(args) -> int:
    """Print the benchmark tables (called by ``pyrovae bench``)."""
    from .data import load

    torch.manual_seed(args.seed)
    binarize = "none" if args.dataset == "binarized-mnist" else "threshold"
    train = load(args.dataset, "train", args.data_dir, binarize)
    test = load(args.dataset, "test", args.data_dir, binarize)
    x = train.images if args.limit is None else train.images[: args.limit]
    arch = dict(ARCHITECTURES[args.arch])
    print(
        f"# {args.dataset}: {len(x)} training images {tuple(x.shape[1:])}, {args.arch} network "
        f"{arch}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; validation off; medians of {args.rounds} rounds"
    )
    for batch_size in args.batch_sizes:
        config = Config(dataset=args.dataset, x_shape=train.x_shape, batch_size=batch_size,
                        lr=1e-3, **arch)  # fmt: skip
        config.validate()
        speeds = bench_training(x, config, args.rounds, args.device)
        ref = statistics.median(speeds["hand-written PyTorch"])
        stock = statistics.median(speeds["stock Pyro (SVI.step)"])
        print(f"\ntraining, batch {batch_size:<6d}     {'images/s':>10s} {'min':>9s} {'max':>9s} "
              f"{'vs hand':>8s} {'vs stock':>9s}")  # fmt: skip
        for name, values in speeds.items():
            med = statistics.median(values)
            print(f"{name:28s} {med:10.0f} {min(values):9.0f} {max(values):9.0f} "
                  f"{med / ref:8.3f} {med / stock:9.3f}")  # fmt: skip
    config = Config(dataset=args.dataset, x_shape=train.x_shape, **arch)
    xt = test.images[: args.eval_n]
    for k in args.num_samples:
        res = bench_evaluation(xt, config, k, args.rounds, args.device)
        ref = statistics.median(res["hand-written IS"]["seconds"])
        flops = _dense_flops(config, len(xt), k)
        print(f"\nlog p(x), K={k}, {len(xt)} images {'seconds':>8s} {'images/s':>9s} "
              f"{'GFLOP/s':>8s} {'peak MiB':>9s} {'vs hand':>8s}")  # fmt: skip
        for name, r in res.items():
            s = statistics.median(r["seconds"])
            print(f"{name:28s} {s:8.2f} {len(xt) / s:9.1f} {flops / s / 1e9:8.1f} "
                  f"{r['memory'] / 2**20:9.0f} {s / ref:8.3f}")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")
    return 0
