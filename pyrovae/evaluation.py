"""Scoring a model/guide pair per datapoint: the ELBO, the IWAE bound and importance-sampled
log p(x).

All three reduce one quantity, the log importance weight of particle k for datapoint i,

    log w_ik = log p(x_i, z_ik) − log q(z_ik | x_i),   z_ik ~ q(z | x_i),

computed with :func:`pyro.infer.importance.vectorized_importance_weights` (particles vectorized
in a plate left of the model's plates) and summed per datapoint over every site inside the data
plate. Then

    ELBO_i   = mean_k log w_ik                       (≤ log p(x_i))
    IWAE_k,i = logsumexp_k log w_ik − log k          (rises with k towards log p(x_i))
    log p(x_i) ≈ IWAE_K,i with K = 5000               (Burda et al.; the number papers report)

Work is chunked over datapoints and particles so memory stays bounded, and chunks of particles
are combined in log space.

References:
  [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.importance import vectorized_importance_weights

from .data import as_tensors

__all__ = [
    "elbo",
    "iwae",
    "log_likelihood",
    "log_weights",
    "plan_chunks",
    "DEFAULT_CHUNK_ELEMENTS",
]

#: Default bound on particles × datapoints × (numbers per datapoint) in one chunk: about 64 MiB
#: per float32 tensor of that size; a 784-400-50 MLP VAE peaks near 0.5 GB.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _max_plate_nesting(model, guide, args) -> int:
    # Trace once on a single datapoint and read the deepest vectorized plate; the random state
    # is restored after, so scoring draws the same numbers as Pyro's own ELBOs would.
    one = tuple(a[:1] for a in args)
    cuda = sorted({a.device.index or 0 for a in args if a.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), poutine.block(), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*one)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*one)
    dims = [
        frame.dim
        for tr in (model_tr, guide_tr)
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def log_weights(
    model: Callable,
    guide: Callable,
    *args: torch.Tensor,
    num_particles: int,
    max_plate_nesting: int,
    data_plate: str = "data",
) -> torch.Tensor:
    """Log importance weights ``(num_particles, N)`` of a batch, one per particle and datapoint.

    :param args: the batch, as passed to ``model(*args)`` and ``guide(*args)``.
    :param int num_particles: particles drawn from the guide for each datapoint.
    :param int max_plate_nesting: how many plates the model nests (particles go left of them).
    :param str data_plate: name of the plate over datapoints.
    :raises ValueError: if a sample site lies outside the data plate.
    """
    _, model_tr, guide_tr = vectorized_importance_weights(
        model, guide, *args, num_samples=num_particles, max_plate_nesting=max_plate_nesting
    )
    particle_dim = -max_plate_nesting - 1
    total = 0.0
    for trace, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)
            if frame is None:
                raise ValueError(
                    f"site {name!r} is outside the {data_plate!r} plate, so log p(x) does not "
                    f"factor per datapoint; pyrovae scores pairs whose latent and observed sites "
                    f"all sit inside the data plate (a global latent needs another estimator)"
                )
            # log density without poutine.scale (e.g. a KL weight), masks applied
            lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])  # batch shape
            lp = lp.movedim((particle_dim, frame.dim), (0, 1))  # (K, N, other plates...)
            total = total + sign * lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)  # (K, N)
    if not isinstance(total, torch.Tensor):
        raise ValueError("the model has no sample sites to score")
    return total


def plan_chunks(
    n: int, k: int, per_item: int, batch_size: int | None, max_chunk_elements: int
) -> tuple[int, int]:
    """Datapoints per batch and particles per chunk, so that batch × chunk × per_item stays
    within ``max_chunk_elements`` (unless one datapoint with one particle already exceeds it).
    By default a batch holds as many datapoints as fit with all ``k`` particles at once."""
    per_item = max(1, int(per_item))
    if batch_size is None:
        batch_size = max_chunk_elements // (k * per_item)
    batch_size = max(1, min(n, int(batch_size)))
    chunk = max(1, min(k, max_chunk_elements // (batch_size * per_item)))
    return batch_size, chunk


def _reduce(
    model,
    guide,
    data,
    num_particles: int,
    reduce: str,
    batch_size: int | None,
    data_plate: str,
    max_chunk_elements: int,
) -> torch.Tensor:
    if int(num_particles) < 1:
        raise ValueError(f"the number of particles/samples must be >= 1, got {num_particles}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tensors = as_tensors(data)
    n, k_total = len(tensors[0]), int(num_particles)
    per_item = sum(t[0].numel() for t in tensors)  # numbers per datapoint
    batch_size, chunk = plan_chunks(n, k_total, per_item, batch_size, max_chunk_elements)
    with torch.no_grad():
        nesting = _max_plate_nesting(model, guide, tensors)
        out = []
        for i in range(0, n, batch_size):
            args = tuple(t[i : i + batch_size] for t in tensors)
            acc = None
            for j in range(0, k_total, chunk):
                lw = log_weights(
                    model,
                    guide,
                    *args,
                    num_particles=min(chunk, k_total - j),
                    max_plate_nesting=nesting,
                    data_plate=data_plate,
                )  # (k, b)
                if reduce == "logsumexp":
                    part = lw.logsumexp(0)
                    acc = part if acc is None else torch.logaddexp(acc, part)
                else:
                    part = lw.sum(0)
                    acc = part if acc is None else acc + part
            if reduce == "logsumexp":
                out.append(acc - math.log(k_total))  # (b,)
            else:
                out.append(acc / k_total)
    return torch.cat(out)


def elbo(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_particles: int = 1,
    batch_size: int | None = None,
    data_plate: str = "data",
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The ELBO of each datapoint, E_q[log p(x, z) − log q(z|x)], averaged over
    ``num_particles`` samples. Returns a tensor ``(N,)`` in nats.

    With ``num_particles=1`` and the same random state, ``elbo(...).sum()`` equals
    ``-Trace_ELBO().loss(model, guide, data)``.

    :param model: a Pyro model taking the batch tensors as positional arguments.
    :param guide: the matching guide.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param int num_particles: samples per datapoint.
    :param int batch_size: datapoints per chunk (default: as many as fit the chunk bound).
    :param str data_plate: name of the plate over datapoints.
    :param int max_chunk_elements: bound on particles × datapoints × numbers per datapoint.
    """
    return _reduce(
        model, guide, data, num_particles, "mean", batch_size, data_plate, max_chunk_elements
    )


def iwae(
    model: Callable,
    guide: Callable,
    data,
    k: int,
    *,
    batch_size: int | None = None,
    data_plate: str = "data",
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The importance-weighted bound of each datapoint with ``k`` samples,
    log (1/k) Σ_k p(x, z_k)/q(z_k|x). ``k=1`` is the ELBO; the bound rises with ``k`` towards
    log p(x) [1]. Returns ``(N,)`` in nats. Parameters as for :func:`elbo`.
    """
    return _reduce(model, guide, data, k, "logsumexp", batch_size, data_plate, max_chunk_elements)


def log_likelihood(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_samples: int = 5000,
    batch_size: int | None = None,
    data_plate: str = "data",
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Importance-sampled log p(x_i) for every datapoint, with the guide as proposal:

        log p(x_i) ≈ logsumexp_k [log p(x_i, z_k) − log q(z_k|x_i)] − log K

    This is the number VAE papers report (as the negative log-likelihood, with K=5000 [1]).
    Particles are vectorized, chunked to bound memory, and run on the data's device (the model
    must live there too). Works for any pair whose sample sites all lie inside ``data_plate``.

    :param model: a Pyro model taking the batch tensors as positional arguments.
    :param guide: the matching guide.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param int num_samples: K, importance samples per datapoint.
    :param int batch_size: datapoints per chunk (default: as many as fit the chunk bound).
    :param str data_plate: name of the plate over datapoints.
    :param int max_chunk_elements: bound on particles × datapoints × numbers per datapoint.
    :returns: a tensor ``(N,)`` of log-likelihoods in nats.
    :raises ValueError: for a latent outside the data plate, or bad arguments.
    """
    return iwae(
        model,
        guide,
        data,
        num_samples,
        batch_size=batch_size,
        data_plate=data_plate,
        max_chunk_elements=max_chunk_elements,
    )
