"""``pyrovae bench``: pyrovae against hand-written PyTorch and stock Pyro, in one process, on
the same data, networks and batch sizes.

Training (images/s): :func:`pyrovae.fit` on its fast path (the loss captured once and replayed;
on CUDA the whole step replayed as a CUDA graph) and eagerly (``fast=False``); the same VAE
written as plain functions with ``pyro.module`` (Pyro's tutorial idiom), trained by ``fit``; a
hand-written PyTorch loop computing the same single-sample ELBO (Monte-Carlo KL, as
``Trace_ELBO``) with the same Adam; on CUDA, that loop with its whole step recorded as one CUDA
graph (the practical ceiling); and a stock Pyro loop (``SVI.step`` per batch from a
``DataLoader``, as in Pyro's VAE example). Every method trains all images every epoch (a last
partial batch runs eagerly where a CUDA graph is recorded for the full ones). Each ``fit``
method is one run advanced an epoch at a time, so its capture happens once. Methods run in
interleaved rounds of one epoch each after a warm-up round, and the median round is reported,
so noise on a shared machine hits all of them alike. On CUDA the peak GPU memory each method
adds is reported too. Pyro's validation is off for all of them (it is a debugging aid that
checks values on every step).

Evaluation (seconds): :func:`pyrovae.log_likelihood` against a hand-written importance-sampling
loop with the same chunk bound, on the same images and K, interleaved likewise; with the
achieved FLOP rate of the dense layers and the peak memory each run added.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F

from . import graphs
from .config import Config, build_vae
from .evaluation import DEFAULT_CHUNK_ELEMENTS, default_chunk_elements, log_likelihood, plan_chunks
from .training import Trainer

__all__ = [
    "ARCHITECTURES",
    "plain_function_pair",
    "bench_training",
    "bench_evaluation",
    "handwritten_epoch",
    "HandwrittenGraph",
    "handwritten_log_likelihood",
    "stock_pyro_epoch",
    "busy_neighbour",
    "main",
]

#: Networks by name: config fields.
ARCHITECTURES = {
    "mlp": {"hidden": (400,), "z_dim": 50, "gated": False},  # the classic 784-400-50 MLP
    "vampprior": {"hidden": (300, 300), "z_dim": 40, "gated": True},  # GatedDense(300) x 2
}

#: Row names of the training table, in order.
FAST, EAGER, PLAIN = "pyrovae.fit (fast path)", "pyrovae.fit (eager)", "plain functions (fit)"
HAND, GRAPH, STOCK = "hand-written PyTorch", "hand-written (CUDA graph)", "stock Pyro (SVI.step)"


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


def plain_function_pair(enc, dec, z_dim: int, prefix: str = ""):
    """The same VAE written as Pyro's VAE tutorial writes it: plain functions that register the
    networks with ``pyro.module`` (no PyroModule), a ``"data"`` plate, Bernoulli pixels.

    :param enc: the encoder, ``x -> (loc, scale)``.
    :param dec: the decoder, ``z -> logits`` with a leading particle dimension.
    :param int z_dim: the latent size.
    :param str prefix: put before the module names ``"encoder"``/``"decoder"`` in Pyro's param
        store (the benchmark keeps them apart from the built-in VAE's same-named entries).
    """
    import pyro.distributions as dist

    def model(x):
        pyro.module(prefix + "decoder", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(z_dim), 1.0).to_event(1))
            logits = dec(z).select(-4, 0)  # (N, C, H, W)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(3),
                        obs=x)  # fmt: skip

    def guide(x):
        pyro.module(prefix + "encoder", enc)
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


class HandwrittenGraph:
    """The hand-written loop with its whole step recorded as one CUDA graph: PyTorch's
    whole-network capture recipe, the practical ceiling for this VAE on a GPU.

    The step — gathering the batch from the device-resident images at :attr:`index`, the loss,
    backward, ``Adam(capturable=True, fused=True)`` and the loss sum — is recorded once, after
    ``warm_up`` eager steps on a side stream (the first full batches of the first epoch, real
    training steps), with every gradient set to ``None`` and no autograd graph of an earlier
    step alive. Full batches replay the graph; a last partial batch runs the same step eagerly,
    so every epoch trains on all images.

    :param enc: the encoder (its parameters are trained in place; give it its own copy).
    :param dec: the decoder.
    :param x: the training images, on a CUDA device.
    :param int batch_size: images per step.
    :param float lr: Adam's learning rate.
    :param int warm_up: eager steps before recording (at least 1).
    """

    def __init__(self, enc, dec, x, batch_size: int, lr: float = 1e-3, warm_up: int = 3):
        if x.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the images on a CUDA device, not {x.device}")
        if len(x) // batch_size < warm_up + 1:
            raise ValueError(
                f"{len(x)} images make fewer than {warm_up + 1} full batches of {batch_size}: "
                "too few to warm up and record a CUDA graph"
            )
        self.enc, self.dec, self.x, self.batch_size, self.warm_up = enc, dec, x, batch_size, warm_up
        params = [*enc.parameters(), *dec.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=lr, capturable=True, fused=True)
        self.index = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        self.total = torch.zeros((), device=x.device)  # the epoch's loss sum
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self, xb) -> None:
        # No loss tensor outlives this frame: its autograd graph dies with it.
        loss = -_log_weights(self.enc, self.dec, xb, 1).sum()
        loss.backward()
        self.optimizer.step()
        self.total.add_(loss.detach())

    def _body(self) -> None:
        self._step(self.x.index_select(0, self.index))

    def _record(self, perm) -> None:
        bs = self.batch_size
        steps = [lambda i=i: self.index.copy_(perm[i * bs : (i + 1) * bs])
                 for i in range(self.warm_up)]  # fmt: skip
        graphs.warm_up(steps, self._body, self.optimizer)
        self.graph = graphs.record_graph(self._body, self.optimizer, self.x.device)

    def epoch(self) -> float:
        """One epoch over all images (the first one records the graph); returns the ELBO per
        image (one host sync)."""
        n, bs = len(self.x), self.batch_size
        perm = torch.randperm(n, device=self.x.device)
        self.total.zero_()
        first = 0
        if self.graph is None:
            self._record(perm)
            first = self.warm_up  # the warm-up steps trained the first batches
        for i in range(first, n // bs):
            self.index.copy_(perm[i * bs : (i + 1) * bs])
            self.graph.replay()
        if n % bs:  # the last partial batch, eagerly
            self.optimizer.zero_grad(set_to_none=True)
            self._step(self.x.index_select(0, perm[n - n % bs :]))
        return -float(self.total) / n


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
    # Peak memory added while the block runs: CUDA's allocator statistics on a GPU (.held: what
    # stays allocated after it); on the CPU, the resident set size sampled every 5 ms.
    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = self.held = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self._base)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.held = torch.cuda.memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self._base)


def _timed(run: Callable, device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _training_methods(x, config: Config, device) -> dict:
    # {name: run one epoch, returning its seconds}
    vae, eager_vae, pyro_vae = (build_vae(config).to(device) for _ in range(3))
    nets = [(copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)) for _ in range(3)]
    kwargs = {"batch_size": config.batch_size, "lr": config.lr, "device": device}
    plain_model, plain_guide = plain_function_pair(*nets[0], config.z_dim, prefix="plain_")
    runs = [  # each a fit run advanced an epoch per round: it captures once, in the warm-up
        Trainer(vae.model, vae.guide, x, **kwargs),
        Trainer(eager_vae.model, eager_vae.guide, x, fast=False, **kwargs),
        Trainer(plain_model, plain_guide, x, **kwargs),
    ]
    opt = torch.optim.Adam([p for net in nets[1] for p in net.parameters()], lr=config.lr)
    svi = pyro.infer.SVI(pyro_vae.model, pyro_vae.guide, pyro.optim.Adam({"lr": config.lr}),
                         pyro.infer.Trace_ELBO())  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x), batch_size=config.batch_size, shuffle=True
    )
    methods = {name: (lambda run=run: run.epoch()["seconds"])  # fit's own clock
               for name, run in zip((FAST, EAGER, PLAIN), runs, strict=True)}  # fmt: skip
    methods[HAND] = lambda: _timed(
        lambda: handwritten_epoch(*nets[1], opt, x, config.batch_size), device
    )
    if torch.device(device).type == "cuda":
        graph: list[HandwrittenGraph] = []  # built in the warm-up round: its memory counts

        def graph_epoch():
            if not graph:
                graph.append(HandwrittenGraph(*nets[2], x, config.batch_size, config.lr))
            return graph[0].epoch()

        methods[GRAPH] = lambda: _timed(graph_epoch, device)
    methods[STOCK] = lambda: _timed(lambda: stock_pyro_epoch(svi, loader), device)
    return methods


def bench_training(x, config: Config, rounds: int = 3, device="cpu") -> dict[str, dict]:
    """Images/s per epoch for each training method on images ``x``.

    Every method runs one epoch per round, in the same order each round; the first round
    (which includes each fit run's capture and the CUDA graph's recording) is a warm-up and is
    not reported.

    :returns: ``{method: {"speeds": [images/s per timed round], "memory": bytes or None}}``;
        ``memory`` (CUDA only) is the most GPU memory the method had allocated at once beyond
        what was allocated before its warm-up epoch (the data, the networks, the other
        methods): what it keeps between epochs (optimizer state, a CUDA graph's pool) plus its
        epochs' peak. On the CPU it is ``None``: a process's resident size cannot be split
        between methods that share it.
    """
    x = x.to(device)
    methods = _training_methods(x, config, device)
    cuda = torch.device(device).type == "cuda"
    out = {name: {"speeds": [], "memory": 0 if cuda else None} for name in methods}
    held = dict.fromkeys(methods, 0)  # what each method keeps allocated after its warm-up
    with pyro.validation_enabled(False):
        for r in range(rounds + 1):
            for name, run in list(methods.items()):
                if not _timed_epoch(name, run, len(x), out[name], held, r, device):
                    del methods[name], out[name]
    return out


def _timed_epoch(name, run, n, out: dict, held: dict, r: int, device) -> bool:
    # One epoch of one method in round r (0: the warm-up); False if the CUDA-graph loop failed
    # to record (it is then left out, saying why, instead of losing the whole table).
    mem = _PeakMemory(device) if out["memory"] is not None else None
    try:
        with mem or contextlib.nullcontext():
            seconds = run()
    except RuntimeError as e:
        if name != GRAPH or r:
            raise
        print(f"# {GRAPH} left out: {e}", file=sys.stderr, flush=True)
        return False
    if mem is not None:
        if r == 0:
            held[name] = max(mem.held, 0)
        out["memory"] = max(out["memory"], mem.peak + (held[name] if r else 0))
    if r:
        out["speeds"].append(n / seconds)
    return True


def bench_evaluation(
    x, config: Config, k: int, rounds: int = 2, device="cpu", chunk_elements: int | None = None
) -> dict:
    """Seconds (median of ``rounds`` after a warm-up) and peak added memory to score images
    ``x`` with K=``k`` importance samples, each way.

    :param int chunk_elements: the chunk bound both methods use (``max_chunk_elements``);
        default :func:`pyrovae.evaluation.default_chunk_elements` of the device.
    """
    x = x.to(device)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(torch.device(device))
    vae = build_vae(config).to(device).eval()
    methods = {
        "pyrovae.log_likelihood": lambda: log_likelihood(
            vae.model, vae.guide, x, num_samples=k, max_chunk_elements=chunk_elements
        ),
        "hand-written IS": lambda: handwritten_log_likelihood(
            vae.encoder, vae.decoder, x, k, chunk_elements
        ),
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


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _print_training(speeds: dict[str, dict], batch_size: int) -> None:
    med = {name: statistics.median(r["speeds"]) for name, r in speeds.items()}
    refs = [("vs hand", med[HAND]), ("vs stock", med[STOCK])]
    if GRAPH in med:
        refs.append(("vs graph", med[GRAPH]))
    head = "".join(f" {name:>9s}" for name, _ in refs)
    print(f"\ntraining, batch {batch_size:<13d} {'images/s':>10s} {'min':>9s} {'max':>9s} "
          f"{'peak MiB':>9s}{head}")  # fmt: skip
    for name, r in speeds.items():
        ratios = "".join(f" {med[name] / ref:9.3f}" for _, ref in refs)
        print(f"{name:29s} {med[name]:10.0f} {min(r['speeds']):9.0f} {max(r['speeds']):9.0f} "
              f"{_mib(r['memory']):>9s}{ratios}")  # fmt: skip


def _print_evaluation(res: dict, n: int, k: int, chunk: int, flops: float) -> None:
    ref = statistics.median(res["hand-written IS"]["seconds"])
    print(f"\nlog p(x), K={k}, {n} images, chunk {chunk} {'seconds':>8s} {'images/s':>9s} "
          f"{'TFLOP/s':>8s} {'peak MiB':>9s} {'vs hand':>8s}")  # fmt: skip
    width = len(f"log p(x), K={k}, {n} images, chunk {chunk}")
    for name, r in res.items():
        s = statistics.median(r["seconds"])
        print(f"{name:{width}s} {s:8.2f} {n / s:9.1f} {flops / s / 1e12:8.3f} "
              f"{_mib(r['memory']):>9s} {s / ref:8.3f}")  # fmt: skip


@contextlib.contextmanager
def busy_neighbour(on: bool = True):
    """A loaded machine: while the block runs, a second Python process spins on one core (the
    situation of a shared machine, where OpenMP threads that wait actively stall training).

    :param bool on: ``False`` gives a quiet machine (the block runs alone).
    """
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def _check_args(args) -> None:
    for key in ("eval_rounds",):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if any(v < 1 for v in getattr(args, "chunk_elements", None) or []):
        raise ValueError(f"--chunk-elements must be >= 1, got {args.chunk_elements}")


def _header(args, x, arch: dict) -> str:
    device = torch.device(args.device)
    where = f"device {device}"
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    medians = []
    if not getattr(args, "eval_only", False):
        medians.append(f"training: medians of {args.rounds} rounds")
    if not getattr(args, "train_only", False) and args.num_samples:
        rounds = getattr(args, "eval_rounds", None) or args.rounds
        medians.append(f"log p(x): medians of {rounds} rounds")
    return (
        f"# {args.dataset}: {len(x)} training images {tuple(x.shape[1:])}, {args.arch} network "
        f"{arch}, {where}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} threads; validation off; {'; '.join(medians)} after a "
        "warm-up round"
    )


#: ``--machine``: which machine states the training tables are measured on.
MACHINES = {"quiet": ("quiet",), "loaded": ("loaded",), "both": ("quiet", "loaded")}


def _training_tables(args, x, x_shape, arch: dict, machine: str) -> None:
    if machine == "loaded":
        print("\n## loaded machine: one other process spinning on a core throughout", flush=True)
    for batch_size in args.batch_sizes:
        config = Config(dataset=args.dataset, x_shape=x_shape, batch_size=batch_size, lr=1e-3,
                        **arch)  # fmt: skip
        config.validate()
        _print_training(bench_training(x, config, args.rounds, args.device), batch_size)


def main(args) -> int:
    """Print the benchmark tables (called by ``pyrovae bench``)."""
    from .data import load

    _check_args(args)
    torch.manual_seed(args.seed)
    binarize = "none" if args.dataset == "binarized-mnist" else "threshold"
    train = load(args.dataset, "train", args.data_dir, binarize)
    x = train.images if args.limit is None else train.images[: args.limit]
    arch = dict(ARCHITECTURES[args.arch])
    print(_header(args, x, arch), flush=True)
    if not getattr(args, "eval_only", False):
        for machine in MACHINES[getattr(args, "machine", "quiet")]:
            with busy_neighbour(machine == "loaded"):
                _training_tables(args, x, train.x_shape, arch, machine)
    if not getattr(args, "train_only", False) and args.num_samples:
        test = load(args.dataset, "test", args.data_dir, binarize)
        config = Config(dataset=args.dataset, x_shape=train.x_shape, **arch)
        xt = test.images[: args.eval_n]
        rounds = getattr(args, "eval_rounds", None) or args.rounds
        chunks = getattr(args, "chunk_elements", None) or [None]
        for k in args.num_samples:
            for chunk in chunks:
                chunk = chunk or default_chunk_elements(torch.device(args.device))
                res = bench_evaluation(xt, config, k, rounds, args.device, chunk)
                _print_evaluation(res, len(xt), k, chunk, _dense_flops(config, len(xt), k))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")
    return 0
