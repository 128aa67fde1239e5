"""Annealed importance sampling (AIS) of log p(x), and bounds from both sides (BDMC).

AIS [1] moves each particle z ~ q(z|x) through a sequence of distributions on the geometric
path from the guide to the posterior,

    f_t(z) = q(z|x)^(1−β_t) p(x, z)^(β_t),   0 = β_0 < β_1 < … < β_T = 1,

with a Hamiltonian Monte Carlo transition leaving each f_t invariant, and weights it by

    log w = Σ_t (β_t − β_{t−1}) [log p(x, z_{t−1}) − log q(z_{t−1}|x)].

Like an importance weight, E[w] = p(x), so logsumexp over chains − log(chains) is a stochastic
lower bound on log p(x) that tightens with the number of steps, however poor q is (Wu et al.
[2] used it to evaluate decoder-based models). Run backwards from an exact posterior sample —
available for data simulated from the model, whose latent is known — the same construction
estimates 1/p(x), which gives a stochastic upper bound: bidirectional Monte Carlo [3]. The gap
between the two bounds on simulated data says how tight the lower bound is for this model.

The densities come from Pyro's own traces: the guide replayed at given latent values and the
model replayed on the guide's trace, each site's log density summed per datapoint and chain as
:func:`pyrovae.evaluation.log_weights` does. Chains run vectorized, in the particle plate
left of the model's plates, and datapoints × chains are chunked like importance sampling.

References:
  [1] R. M. Neal, "Annealed importance sampling", Statistics and Computing 11 (2001).
  [2] Y. Wu, Y. Burda, R. Salakhutdinov, R. Grosse, "On the Quantitative Analysis of
      Decoder-Based Generative Models", ICLR 2017.
  [3] R. Grosse, Z. Ghahramani, R. P. Adams, "Sandwiching the marginal likelihood using
      bidirectional Monte Carlo", arXiv:1511.02543 (2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import constraints

from .diagnostics import LogLikelihoodReport, WeightStats
from .errors import count
from .evaluation import (
    _block_seed,
    _seeded,
    _site_log_prob,
    _sum_sites,
    find_data_plate,
    inspect_pair,
    plan_chunks,
)

__all__ = ["ais", "bdmc", "sigmoid_schedule", "check_latents", "BDMCResult", "TARGET_ACCEPT"]

#: The HMC acceptance rate the step size is adapted towards (as in Wu et al. [2]).
TARGET_ACCEPT = 0.65
_PLATE = "num_particles_vectorized"


def sigmoid_schedule(steps: int, delta: float = 4.0) -> torch.Tensor:
    """β_0 = 0 < … < β_T = 1 on a sigmoid, dense at both ends where f_t changes fastest
    (Grosse et al. [3]). Returns ``(steps + 1,)`` in float64."""
    s = torch.sigmoid(delta * torch.linspace(-1.0, 1.0, int(steps) + 1, dtype=torch.double))
    return (s - s[0]) / (s[-1] - s[0])


def check_latents(guide_trace, option: str = "--method ais") -> list[str]:
    """The guide's latent sites, if HMC can move all of them: continuous on the whole real line
    (Normal, MultivariateNormal, flows …). Returns their names in order.

    :raises ValueError: naming the first discrete or bounded site, and ``option``.
    """
    names = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], _Subsample):
            continue  # observed, or a plate's indices
        support = site["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support.is_discrete:
            kind = type(site["fn"]).__name__
            raise ValueError(f"{option} needs continuous latents, but site {name!r} is discrete "
                             f"({kind}); use importance sampling (--method is)")  # fmt: skip
        if support is not constraints.real:
            raise ValueError(f"{option} moves latents on the whole real line, but site {name!r} "
                             f"has support {support}; use --method is")  # fmt: skip
        names.append(name)
    return names


def _vectorized(fn: Callable, num: int, nesting: int) -> Callable:
    # fn in a plate of ``num`` chains left of its own plates, as Pyro's importance sampling does
    def wrapped(*args):
        with pyro.plate(_PLATE, num, dim=-nesting - 1):
            return fn(*args)

    return wrapped


class _Density:
    """log q(z|x) and log p(x, z) per chain and datapoint, and their gradients, as functions of
    all latents flattened into one tensor ``(C, b, D)``."""

    def __init__(self, model, guide, args, chains: int, layout):
        self.args, self.rows, self.plate = args, len(args[0]), layout.plate
        self.dim = -layout.nesting - 1  # the chains' dim
        self.model = _vectorized(model, chains, layout.nesting)
        self.guide = _vectorized(guide, chains, layout.nesting)

    def draw(self) -> torch.Tensor:
        """z ~ q(z|x), flattened: ``(C, b, D)``; records each site's shape."""
        tr = poutine.trace(self.guide).get_trace(*self.args)
        self.names = check_latents(tr)
        model_tr = poutine.trace(poutine.replay(self.model, trace=tr)).get_trace(*self.args)
        self.data_dim = find_data_plate(model_tr, self.rows, self.plate).dim
        return self.flatten({n: tr.nodes[n] for n in self.names}, self.data_dim)

    def flatten(self, sites: dict, data_dim: int) -> torch.Tensor:
        # (C, b, D): each site's value with the chains' and the data's dims first
        self.layout, parts = [], []
        for name, site in sites.items():
            ev = site["fn"].event_dim
            dims = (self.dim - ev, data_dim - ev)
            v = site["value"].movedim(dims, (0, 1))  # (C, b, rest...)
            self.layout.append((name, dims, v.shape[2:], v[0, 0].numel()))
            parts.append(v.reshape(v.shape[0], v.shape[1], -1))
        return torch.cat(parts, -1).detach()

    def unflatten(self, u: torch.Tensor) -> dict:
        values, start = {}, 0
        for name, dims, rest, size in self.layout:
            v = u[..., start : start + size].reshape(*u.shape[:2], *rest)
            values[name], start = v.movedim((0, 1), dims), start + size
        return values

    def __call__(self, u: torch.Tensor):
        """``(log q, log p, ∇ log q, ∇ log p)`` at ``u``: ``(C, b)`` twice and ``(C, b, D)``
        twice, detached."""
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            fake = poutine.Trace()
            for name, value in self.unflatten(u).items():
                fake.add_node(name, type="sample", is_observed=False, value=value, infer={})
            guide_tr = poutine.trace(poutine.replay(self.guide, trace=fake)).get_trace(*self.args)
            model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(
                *self.args
            )
            guide_tr, model_tr = prune_subsample_sites(guide_tr), prune_subsample_sites(model_tr)
            guide_tr.compute_log_prob()
            model_tr.compute_log_prob()
            log_w = _sum_sites(model_tr, guide_tr, self.rows, self.plate, self.dim)  # (C, b)
            frame = find_data_plate(model_tr, self.rows, self.plate)
            log_q = sum(_site_log_prob(guide_tr.nodes[n], frame, self.dim) for n in self.names)
            log_p = log_w + log_q  # (C, b)
            gq = torch.autograd.grad(log_q.sum(), u, retain_graph=True)[0]  # (C, b, D)
            gp = torch.autograd.grad(log_p.sum(), u)[0]
        return log_q.detach(), log_p.detach(), gq, gp


@dataclass
class _State:
    u: torch.Tensor  # (C, b, D) the chains' latents, flattened
    log_q: torch.Tensor  # (C, b)
    log_p: torch.Tensor  # (C, b)
    gq: torch.Tensor  # (C, b, D)
    gp: torch.Tensor  # (C, b, D)

    def target(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        # log f_β = (1 − β) log q + β log p and its gradient
        lf = (1 - beta) * self.log_q + beta * self.log_p  # (C, b)
        return lf, (1 - beta) * self.gq + beta * self.gp


def _hmc(density: _Density, s: _State, beta: float, eps: torch.Tensor, leapfrog: int):
    # One HMC transition leaving f_β invariant, every chain at once: ``leapfrog`` steps of size
    # eps (b,) per datapoint, then accept or reject per chain. Returns the state and the
    # acceptance per chain (C, b).
    e = eps[None, :, None]  # (1, b, 1)
    p0 = torch.randn_like(s.u)  # momentum, (C, b, D)
    lf0, grad = s.target(beta)
    new, p = s, p0 + 0.5 * e * grad
    for i in range(leapfrog):
        u = new.u + e * p
        new = _State(u, *density(u))
        _, grad = new.target(beta)
        p = p + (e if i < leapfrog - 1 else 0.5 * e) * grad
    lf1, _ = new.target(beta)
    log_ratio = lf1 - 0.5 * p.pow(2).sum(-1) - lf0 + 0.5 * p0.pow(2).sum(-1)  # (C, b)
    accept = torch.log(torch.rand_like(log_ratio)) < log_ratio  # NaN: rejected
    keep = accept[..., None]
    out = _State(
        torch.where(keep, new.u, s.u), torch.where(accept, new.log_q, s.log_q),
        torch.where(accept, new.log_p, s.log_p), torch.where(keep, new.gq, s.gq),
        torch.where(keep, new.gp, s.gp),
    )  # fmt: skip
    return out, accept


def _adapt(eps: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
    # per datapoint: larger steps while the chains accept more than TARGET_ACCEPT, else smaller
    rate = accept.double().mean(0)  # (b,)
    return (eps * torch.where(rate > TARGET_ACCEPT, 1.02, 0.98)).clamp(1e-4, 1.0)


def _anneal(density, u, betas, leapfrog: int, reverse: bool, tick=None) -> torch.Tensor:
    # AIS log weights (C, b) along betas: forward from z ~ q (estimates log p(x)), or reverse
    # from an exact posterior sample (estimates log 1/p(x)).
    s = _State(u, *density(u))
    eps = torch.full((u.shape[1],), 0.05, dtype=u.dtype, device=u.device)  # (b,)
    path = betas.flip(0) if reverse else betas
    log_w = torch.zeros_like(s.log_q)  # (C, b)
    for t in range(1, len(path)):
        log_w = log_w + float(path[t] - path[t - 1]) * (s.log_p - s.log_q)
        if t < len(path) - 1:  # the last weight needs no move
            s, accept = _hmc(density, s, float(path[t]), eps, leapfrog)
            eps = _adapt(eps, accept)
        if tick is not None:
            tick()
    return log_w


def _check_budget(chains, steps, leapfrog) -> tuple[int, int, int]:
    return (count("--chains", chains), count("--steps", steps),
            count("--leapfrog", leapfrog))  # fmt: skip


def _prepare(model, guide, data, data_plate, option: str):
    # the data on the pair's device and its layout; refuses pairs AIS cannot run
    from .data import as_tensors
    from .evaluation import _on_pair_device

    tensors = _on_pair_device(model, guide, as_tensors(data))
    layout = inspect_pair(model, guide, tensors, data_plate)
    if layout.subsample is not None or not layout.vectorized or layout.looped:
        raise ValueError(f"{option} needs a pair whose particles vectorize (a plate left of the "
                         "model's) over a batch it is given; use importance sampling")  # fmt: skip
    probe = tuple(t[:2] for t in tensors)
    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        check_latents(poutine.trace(guide).get_trace(*probe), option)
    return tensors, layout


def _bar(progress: bool, n: int, what: str):
    from tqdm.auto import tqdm

    from .progress import bar_width

    return tqdm(total=n, disable=not progress, unit="img", desc=what, **bar_width(),
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:,.0f}/{total:,} "
                           "[{elapsed}<{remaining}, {rate_fmt}]")  # fmt: skip


def _chunks(tensors, layout, chains, batch_size, max_chunk_elements):
    # (args, rows, chain chunk) per batch: datapoints × chains × numbers per datapoint within
    # the bound, counted three times over for the gradients HMC keeps
    from .evaluation import default_chunk_elements

    n = len(tensors[0])
    per_item = 3 * sum(t[0].numel() for t in tensors)
    if max_chunk_elements is None:
        max_chunk_elements = default_chunk_elements(tensors[0].device)
    batch_size, chunk = plan_chunks(n, chains, per_item, batch_size, max_chunk_elements)
    for i in range(0, n, batch_size):
        yield tuple(t[i : i + batch_size] for t in tensors), min(batch_size, n - i), chunk


def ais(
    model: Callable,
    guide: Callable,
    data,
    *,
    chains: int = 16,
    steps: int = 100,
    leapfrog: int = 5,
    batch_size: int | None = None,
    data_plate: str | None = None,
    max_chunk_elements: int | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> LogLikelihoodReport:
    """log p(x) of every datapoint by annealed importance sampling from q(z|x) to p(x, z), with
    each estimate's diagnostics over its chains (as :func:`pyrovae.log_likelihood_report` gives
    over importance samples; k̂ needs at least 50 chains).

    The cost is about ``chains × steps × leapfrog`` evaluations of model and guide with their
    gradients per datapoint (importance sampling with K samples costs K, without gradients).

    :param model: a Pyro model whose latents are all continuous on the real line.
    :param guide: the matching guide: the start of the path.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param int chains: independent annealing runs per datapoint (the K of the estimate).
    :param int steps: annealing steps T (intermediate distributions, one HMC move each).
    :param int leapfrog: leapfrog steps per HMC move; the step size adapts per datapoint
        towards an acceptance rate of :data:`TARGET_ACCEPT`.
    :param int batch_size: datapoints per chunk (default: as many as fit the chunk bound).
    :param str data_plate: name of the plate over datapoints (default: found from a trace).
    :param int max_chunk_elements: bound on chains × datapoints × numbers per datapoint (×3).
    :param bool progress: show a progress bar over the images.
    :param int seed: seed each block of datapoints from it; the caller's generator is kept.
    :raises ValueError: for a discrete or bounded latent, or counts that are not positive.
    """
    chains, steps, leapfrog = _check_budget(chains, steps, leapfrog)
    tensors, layout = _prepare(model, guide, data, data_plate, "--method ais")
    betas = sigmoid_schedule(steps)
    out = []
    desc = f"AIS log p(x): {len(tensors[0]):,} images × {chains} chains × {steps} steps"
    with _seeded(seed), _bar(progress, len(tensors[0]), desc) as bar:
        for block, (args, rows, chunk) in enumerate(
            _chunks(tensors, layout, chains, batch_size, max_chunk_elements)
        ):
            if seed is not None:
                torch.manual_seed(_block_seed(seed, block))
            stats = WeightStats(chains)
            for j in range(0, chains, chunk):
                c = min(chunk, chains - j)
                density = _Density(model, guide, args, c, layout)
                with torch.no_grad():
                    u = density.draw()
                tick = _ticker(bar, rows * c / chains / steps)
                stats.update(_anneal(density, u, betas, leapfrog, False, tick))  # (c, rows)
            out.append(stats.finish())  # (4, rows)
    values = torch.cat(out, -1)  # (4, N)
    return LogLikelihoodReport(*values, num_samples=chains, method="ais")


@dataclass(frozen=True)
class BDMCResult:
    """Bidirectional Monte Carlo on data simulated from the model: per simulated datapoint, a
    stochastic lower bound (forward AIS) and upper bound (reverse AIS from the latent that
    generated it) on log p(x), each ``(N,)`` in nats, and the simulated data ``(N, ...)``."""

    lower: torch.Tensor
    upper: torch.Tensor
    data: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        """upper − lower per datapoint: how far from log p(x) either bound can be."""
        return self.upper - self.lower


def _simulate(model, x: torch.Tensor, layout) -> tuple[torch.Tensor, poutine.Trace]:
    # x* ~ p(x|z*), z* ~ p(z), one per datapoint of x (which gives the shapes): x* (N, ...) and
    # the trace that holds z*, in a chain plate of size one
    tr = poutine.trace(poutine.uncondition(_vectorized(model, 1, layout.nesting))).get_trace(x)
    tr = prune_subsample_sites(tr)
    observed = [s for s in tr.nodes.values() if s.get("infer", {}).get("was_observed")]
    if len(observed) != 1:
        raise ValueError("--method bdmc simulates data from a model with one observed site; "
                         f"this one has {len(observed)}")  # fmt: skip
    obs = observed[0]
    x_sim = obs["value"].movedim(-layout.nesting - 1 - obs["fn"].event_dim, 0)[0]  # (N, ...)
    return x_sim.reshape(x.shape).detach(), tr


def _sandwich(model, guide, x, layout, chains, chunk, betas, leapfrog, tick):
    # (lower, upper) per datapoint of x (b,), and x*: forward AIS on x*, reverse AIS from z*
    x_sim, sim = _simulate(model, x, layout)
    lower, upper = WeightStats(chains), WeightStats(chains)
    for j in range(0, chains, chunk):
        c = min(chunk, chains - j)
        density = _Density(model, guide, (x_sim,), c, layout)
        with torch.no_grad():
            u = density.draw()
        lower.update(_anneal(density, u, betas, leapfrog, False, tick))  # (c, b)
        exact = density.flatten({n: sim.nodes[n] for n in density.names}, density.data_dim)
        inverse = _anneal(density, exact.expand(c, -1, -1), betas, leapfrog, True, tick)
        upper.update(inverse)  # estimates of log 1/p(x*), (c, b)
    # E[1/p̂] = 1/p(x*): −log of its average is a stochastic upper bound on log p(x*)
    return lower.finish()[0], -upper.finish()[0], x_sim


def bdmc(
    model: Callable,
    guide: Callable,
    data,
    *,
    chains: int = 16,
    steps: int = 100,
    leapfrog: int = 5,
    batch_size: int | None = None,
    max_chunk_elements: int | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> BDMCResult:
    """Sandwich log p(x) on data simulated from the model [3]: for each datapoint of ``data``
    (used for its shape only), draw z* ~ p(z) and x* ~ p(x|z*), then run AIS forward from
    q(z|x*) (a stochastic lower bound on log p(x*)) and backward from z*, an exact sample of
    p(z|x*) (a stochastic upper bound), each with ``chains`` chains of ``steps`` steps.

    The gap says how tight AIS with this budget is for this model: near the data the model
    was trained on, the lower bound on real data is about as tight.

    :param data: a tensor ``(N, ...)`` of datapoints of the shape the model observes.
    :param int chains: chains per datapoint in each direction.
    :param int steps: annealing steps.
    :param int leapfrog: leapfrog steps per HMC move.
    :param int batch_size: datapoints per chunk (default: as many as fit the chunk bound).
    :param int max_chunk_elements: bound on chains × datapoints × numbers per datapoint (×3).
    :param bool progress: show a progress bar over the images.
    :param int seed: seed each block of datapoints from it; the caller's generator is kept.
    :raises ValueError: for a discrete or bounded latent, several observed sites, several
        data tensors, or counts that are not positive.
    """
    chains, steps, leapfrog = _check_budget(chains, steps, leapfrog)
    tensors, layout = _prepare(model, guide, data, None, "--method bdmc")
    if len(tensors) != 1:
        raise ValueError("--method bdmc simulates one data tensor; this pair takes "
                         f"{len(tensors)}")  # fmt: skip
    betas, n, out = sigmoid_schedule(steps), len(tensors[0]), []
    desc = f"BDMC: {n:,} simulated images × {chains} chains × {steps} steps × 2 ways"
    with _seeded(seed), _bar(progress, n, desc) as bar:
        for block, (args, rows, chunk) in enumerate(
            _chunks(tensors, layout, chains, batch_size, max_chunk_elements)
        ):
            if seed is not None:
                torch.manual_seed(_block_seed(seed, block))
            tick = _ticker(bar, rows / (2 * steps * math.ceil(chains / chunk)))
            out.append(_sandwich(model, guide, args[0], layout, chains, chunk, betas, leapfrog,
                                 tick))  # fmt: skip
    lower, upper, x_sim = (torch.cat(parts) for parts in zip(*out, strict=True))
    return BDMCResult(lower, upper, x_sim)


def _ticker(bar, amount: float) -> Callable[[], None]:
    return lambda: bar.update(amount)
