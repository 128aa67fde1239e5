"""``pyrovae bench``: pyrovae against hand-written PyTorch, in one process, on the same data,
networks and batch size.

Training: images/s of :func:`pyrovae.fit` (with Pyro's validation on, its default, and off) and
of a hand-written loop computing the same single-sample ELBO (Monte-Carlo KL, as ``Trace_ELBO``)
with the same Adam. The methods run in interleaved rounds of one epoch each, after a warm-up
round, and the median round is reported, so machine noise hits all of them alike.

Evaluation: seconds of :func:`pyrovae.log_likelihood` and of a hand-written importance-sampling
loop with the same chunks, on the same images and K.
"""

from __future__ import annotations

import copy
import math
import resource
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from .config import Config, build_vae
from .evaluation import DEFAULT_CHUNK_ELEMENTS, log_likelihood, plan_chunks
from .training import fit

__all__ = ["bench_training", "bench_evaluation", "handwritten_epoch", "handwritten_log_likelihood"]


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


@torch.no_grad()
def handwritten_log_likelihood(enc, dec, x, k, max_chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """Importance-sampled log p(x) in plain PyTorch, chunked like pyrovae's."""
    b, chunk = plan_chunks(len(x), k, x[0].numel(), None, max_chunk_elements)
    out = []
    for i in range(0, len(x), b):
        xb = x[i : i + b]
        lse = torch.cat(
            [
                _log_weights(enc, dec, xb, min(chunk, k - j)).logsumexp(0, True)
                for j in range(0, k, chunk)
            ]
        ).logsumexp(0)
        out.append(lse - math.log(k))
    return torch.cat(out)


def bench_training(x, config: Config, rounds: int = 3, device="cpu") -> dict[str, list[float]]:
    """Images/s per round for each method on images ``x``."""
    x = x.to(device)
    vae = build_vae(config).to(device)
    enc, dec = copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=config.lr)
    methods = {
        "pyrovae.fit (validation on)": lambda: _fit_epoch(vae, x, config, device, True),
        "pyrovae.fit (validation off)": lambda: _fit_epoch(vae, x, config, device, False),
        "hand-written PyTorch": lambda: handwritten_epoch(enc, dec, opt, x, config.batch_size),
    }
    speeds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds + 1):  # round 0 warms up
        for name, run in methods.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if r:
                speeds[name].append(len(x) / (time.perf_counter() - start))
    return speeds


def _fit_epoch(vae, x, config, device, validation):
    with pyro.validation_enabled(validation):
        fit(
            vae.model,
            vae.guide,
            x,
            epochs=1,
            batch_size=config.batch_size,
            lr=config.lr,
            device=device,
            progress=False,
        )


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_evaluation(x, config: Config, k: int, device="cpu") -> dict[str, float]:
    """Seconds to score images ``x`` with K=``k`` importance samples, each way."""
    x = x.to(device)
    vae = build_vae(config).to(device).eval()
    out = {}
    for name, run in {
        "pyrovae.log_likelihood": lambda: log_likelihood(vae.model, vae.guide, x, num_samples=k),
        "hand-written IS": lambda: handwritten_log_likelihood(vae.encoder, vae.decoder, x, k),
    }.items():
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        out[name] = time.perf_counter() - start
    return out


def main(args) -> int:
    """Print the benchmark tables (called by ``pyrovae bench``)."""
    from .data import load

    torch.manual_seed(args.seed)
    binarize = "none" if args.dataset == "binarized-mnist" else "threshold"
    train = load(args.dataset, "train", args.data_dir, binarize)
    test = load(args.dataset, "test", args.data_dir, binarize)
    config = Config(
        dataset=args.dataset,
        x_shape=train.x_shape,
        hidden=tuple(args.hidden),
        z_dim=args.z_dim,
        gated=args.gated,
        batch_size=args.batch_size,
        lr=1e-3,
    )
    config.validate()
    x = train.images if args.limit is None else train.images[: args.limit]
    print(
        f"# {args.dataset}: {len(x)} training images {tuple(x.shape[1:])}, MLP "
        f"{'gated ' if args.gated else ''}{args.hidden} z={args.z_dim}, batch "
        f"{args.batch_size}, device {args.device}, torch threads {torch.get_num_threads()}"
    )
    speeds = bench_training(x, config, args.rounds, args.device)
    ref = statistics.median(speeds["hand-written PyTorch"])
    print(f"\n{'training':32s} {'images/s (median)':>18s} {'min':>9s} {'max':>9s} {'ratio':>7s}")
    for name, values in speeds.items():
        med = statistics.median(values)
        print(f"{name:32s} {med:18.0f} {min(values):9.0f} {max(values):9.0f} {med / ref:7.3f}")
    if args.num_samples:
        xt = test.images[: args.eval_n]
        secs = bench_evaluation(xt, config, args.num_samples, args.device)
        ref = secs["hand-written IS"]
        print(
            f"\n{'log p(x), K=' + str(args.num_samples) + f', {len(xt)} images':32s} "
            f"{'seconds':>18s} {'images/s':>9s} {'':>9s} {'ratio':>7s}"
        )
        for name, s in secs.items():
            print(f"{name:32s} {s:18.2f} {len(xt) / s:9.1f} {'':>9s} {s / ref:7.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")
    if torch.device(args.device).type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    return 0
