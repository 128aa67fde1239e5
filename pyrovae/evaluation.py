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

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn

from .data import as_tensors, check_tuple
from .diagnostics import LogLikelihoodReport, WeightStats
from .errors import count
from .plates import Subsamples, subsample_advice

__all__ = [
    "elbo",
    "iwae",
    "log_likelihood",
    "scoring_estimate",
    "log_likelihood_report",
    "log_weights",
    "plan_chunks",
    "default_chunk_elements",
    "find_data_plate",
    "inspect_pair",
    "check_order",
    "scoring_transform",
    "PairLayout",
    "DEFAULT_CHUNK_ELEMENTS",
]

#: Default bound on particles × datapoints × (numbers per datapoint) in one chunk: about 64 MiB
#: per float32 tensor of that size; a 784-400-50 MLP VAE peaks near 0.5 GB.
DEFAULT_CHUNK_ELEMENTS = 2**24

log = logging.getLogger("pyrovae")


def _frames(site) -> list:
    return [f for f in site["cond_indep_stack"] if f.vectorized]


def _plates_seen(trace) -> str:
    # "'batch' (size 128), 'pixels' (size 784)": the plates of a trace, for error messages.
    seen: dict[str, int] = {}
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for f in _frames(site):
                seen.setdefault(f.name, f.full_size if f.full_size is not None else f.size)
    return ", ".join(f"{name!r} (size {size})" for name, size in seen.items()) or "none"


def find_data_plate(model_trace, rows: int, data_plate: str | None = None):
    """The plate over datapoints of a model trace: the one all observed sites share whose size
    is the batch's (``rows``), or whose full size is (a model that subsamples its own plate);
    the one named ``data_plate`` if given. Returns its ``CondIndepStackFrame``.

    :raises ValueError: if none fits, saying which plates the model has.
    """
    observed = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site (obs=...) to score")
    shared = {f.name: f for f in _frames(observed[0])}
    for site in observed[1:]:
        names = {f.name for f in _frames(site)}
        shared = {k: f for k, f in shared.items() if k in names}
    if data_plate is not None:
        if data_plate in shared:
            return shared[data_plate]
        raise ValueError(
            f"no plate named {data_plate!r} holds every observed site; plates in the model: "
            f"{_plates_seen(model_trace)}; pass data_plate= the plate over datapoints"
        )
    fits = [f for f in shared.values() if rows in (f.size, f.full_size) or f.size == -1]
    if not fits:
        raise ValueError(
            f"found no plate over the {rows} datapoints that all observed sites share; plates "
            f"in the model: {_plates_seen(model_trace)}; put the datapoints in one "
            "pyro.plate(name, batch_size) in model and guide, or pass data_plate="
        )
    return next((f for f in fits if f.name == "data"), fits[0])


def _site_log_prob(site, frame, particle_dim: int | None) -> torch.Tensor:
    # A site's log density without poutine.scale (e.g. a KL weight), masks applied, summed over
    # every dim but the particles' and the data plate's: (K, N), or (N,) with no particle dim.
    lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])  # batch shape
    if particle_dim is None:
        lp = lp.movedim(frame.dim, 0)  # (N, other plates...)
        return lp.reshape(lp.shape[0], -1).sum(-1)
    lp = lp.movedim((particle_dim, frame.dim), (0, 1))  # (K, N, other plates...)
    return lp.reshape(lp.shape[0], lp.shape[1], -1).sum(-1)


def _sum_sites(model_tr, guide_tr, rows: int, data_plate: str | None, particle_dim):
    # Σ_sites log p − Σ_latent log q per datapoint (and particle), from importance traces.
    frame = find_data_plate(model_tr, rows, data_plate)
    total = 0.0
    for trace, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            here = next((f for f in site["cond_indep_stack"] if f.name == frame.name), None)
            if here is None:
                raise ValueError(
                    f"site {name!r} is outside the {frame.name!r} plate, so log p(x) does not "
                    f"factor per datapoint; pyrovae scores pairs whose latent and observed sites "
                    f"all sit inside the data plate (a global latent needs another estimator)"
                )
            total = total + sign * _site_log_prob(site, here, particle_dim)
    if not isinstance(total, torch.Tensor):
        raise ValueError("the model has no sample sites to score")
    return total


def log_weights(
    model: Callable,
    guide: Callable,
    *args: torch.Tensor,
    num_particles: int,
    max_plate_nesting: int,
    data_plate: str | None = None,
    vectorized: bool = True,
    looped: bool = False,
) -> torch.Tensor:
    """Log importance weights ``(num_particles, N)`` of a batch, one per particle and datapoint.

    Three ways to draw the particles, the same estimator: ``vectorized`` puts them in a plate
    left of the model's plates (:func:`pyro.infer.importance.vectorized_importance_weights`);
    otherwise each datapoint is repeated ``num_particles`` times inside the data plate, so
    particles are rows of an ordinary batch (for models that index or reshape their batch in
    ways that do not broadcast over a particle dimension, such as boolean masks); ``looped``
    draws them one trace of the batch at a time, as training does (for a pair that does
    neither, such as Pyro's AIR, whose plate subsamples the batch it is given).

    :param args: the batch, as passed to ``model(*args)`` and ``guide(*args)``.
    :param int num_particles: particles drawn from the guide for each datapoint.
    :param int max_plate_nesting: how many plates the model nests (particles go left of them).
    :param str data_plate: name of the plate over datapoints (default: found from the trace).
    :param bool vectorized: vectorize particles (else repeat datapoints).
    :param bool looped: one trace per particle (overrides ``vectorized``).
    :raises ValueError: if a sample site lies outside the data plate, or no plate fits.
    """
    k, rows = int(num_particles), len(args[0])
    if looped:
        traces = (get_importance_trace("flat", max_plate_nesting, model, guide, args, {})
                  for _ in range(k))  # fmt: skip
        return torch.stack([_sum_sites(m, g, rows, data_plate, None) for m, g in traces])
    if vectorized:
        _, model_tr, guide_tr = vectorized_importance_weights(
            model, guide, *args, num_samples=k, max_plate_nesting=max_plate_nesting
        )
        particle_dim = -max_plate_nesting - 1
        return _sum_sites(model_tr, guide_tr, rows, data_plate, particle_dim)  # (k, N)
    repeated = tuple(torch.cat([a] * k) for a in args)  # (k·N, ...): particle j, datapoint i
    model_tr, guide_tr = get_importance_trace("flat", max_plate_nesting, model, guide, repeated, {})
    return _sum_sites(model_tr, guide_tr, k * rows, data_plate, None).reshape(k, rows)


def default_chunk_elements(device: torch.device) -> int:
    """The chunk bound for a device: :data:`DEFAULT_CHUNK_ELEMENTS` on the CPU; on a GPU, as
    much as a 64th of its free memory in elements allows, up to 2**28 (fewer, larger chunks:
    each chunk costs a fixed Python overhead in Pyro's handlers, which small chunks cannot
    hide behind GPU work)."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(2**28, max(DEFAULT_CHUNK_ELEMENTS, free // 64)))


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


@dataclass(frozen=True)
class PairLayout:
    """How :func:`log_likelihood` runs a pair, found by :func:`inspect_pair`."""

    plate: str  # the plate over datapoints
    nesting: int  # how many plates the model nests
    vectorized: bool  # particles in a plate of their own; else datapoints repeated in the batch
    subsample: int | None = None  # the model subsamples its own plate to this size
    looped: bool = False  # particles one trace at a time (neither of the above works)


def _traces(model, guide, args):
    guide_tr = poutine.trace(guide).get_trace(*args)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return model_tr, guide_tr


def _try_weights(model, guide, args, layout: PairLayout, idx=None) -> Exception | None:
    # Run one path on two particles; None if it gives one weight per particle and datapoint.
    try:
        lw = _chunk_weights(model, guide, args, 2, layout, idx)
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as e:
        return e
    rows = len(args[0]) if idx is None else len(idx)
    if tuple(lw.shape) != (2, rows):
        return ValueError(f"weights of shape {tuple(lw.shape)}, expected (2, {rows})")
    return None


#: How particles are drawn, in the order inspect_pair tries them.
_PATHS = {"particles vectorized": {}, "datapoints repeated in the batch": {"vectorized": False},
          "particles looped": {"looped": True}}  # fmt: skip


def inspect_pair(
    model, guide, tensors, data_plate: str | None = None, batch_transform: Callable | None = None
) -> PairLayout:
    """Trace a pair on two datapoints and decide how to score it: which plate holds the
    datapoints, how deep the plates nest, whether particles can be vectorized (else the
    repeated-batch path), and whether the model subsamples its own plate from the full data.
    The random state is restored after, so scoring draws what Pyro's own ELBOs would.

    :param tensors: the data: a tensor ``(N, ...)`` (a one-tensor batch) or a tuple of tensors.
    :param batch_transform: applied to each batch before the pair sees it (as in scoring).
    :raises ValueError: if neither path can score the pair, with both reasons.
    """
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    prepare = _preparing(batch_transform)
    probe = prepare(tuple(t[:2] for t in tensors))
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), poutine.block(), torch.no_grad():
        try:
            model_tr, guide_tr = _traces(model, guide, probe)
        except ValueError as e:  # a plate that subsamples the full data it is given
            if "subsample_size" not in str(e):
                raise
            probe = prepare(tensors)
            model_tr, guide_tr = _subsampled_traces(model, guide, probe)
        _note_guide_observations(guide_tr)
        frame = find_data_plate(model_tr, len(probe[0]), data_plate)
        dims = [-f.dim for tr in (model_tr, guide_tr) for site in tr.nodes.values()
                if site["type"] == "sample" for f in _frames(site)]  # fmt: skip
        nesting = max(dims, default=0)
        base, idx = PairLayout(frame.name, nesting, True), None
        if frame.full_size is not None and frame.size < frame.full_size == len(probe[0]):
            base = replace(base, subsample=frame.size)  # a plate of the full data, subsampled
            idx = torch.arange(frame.size, device=probe[0].device)
        failed = {}
        for path, change in _PATHS.items():
            if base.subsample is not None and change.get("vectorized") is False:
                continue  # repeated rows cannot go through the model's own subsampling
            failed[path] = _try_weights(model, guide, probe, replace(base, **change), idx)
            if failed[path] is None:
                return replace(base, **change)
    reasons = "; ".join(f"with {p}, {type(e).__name__}: {e}" for p, e in failed.items())
    raise ValueError(f"cannot score this pair: {reasons}")


def _subsampled_traces(model, guide, tensors):
    # The traces of a pair whose plate subsamples the data it is given; pyrovae's message with
    # the rewrite where Pyro cannot subsample them (fewer datapoints than the subsample size).
    with Subsamples() as seen:
        try:
            return _traces(model, guide, tensors)
        except ValueError as e:
            if "subsample_size" not in str(e) or not seen.plates:
                raise
    name, size, subsample_size = seen.plates[-1]
    raise ValueError(subsample_advice(name, size, subsample_size, "score"))


#: Notes already given in this process (each is said once).
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _note_guide_observations(guide_tr) -> None:
    # A guide with observed sites (obs=, pyro.factor), as CEVAE's and scANVI's have: their
    # log-densities are part of Trace_ELBO's loss, not of log p(x).
    names = [n for n, site in guide_tr.nodes.items()
             if site["type"] == "sample" and site["is_observed"]]  # fmt: skip
    if names:
        _say_once(
            f"pyrovae: the guide's observed site(s) {', '.join(map(repr, names))} (obs= or "
            "pyro.factor) are not scored: Trace_ELBO adds their log-densities to the training "
            "loss, while pyrovae.elbo, iwae and log_likelihood score log p(x) alone (the "
            "model's sites over the guide's latents)"
        )


#: Layers whose output depends on the module's mode: dropout draws masks in training mode,
#: batch norm uses (and updates) the batch's statistics.
_MODE_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


class _EvalMode:
    # Puts each module it is given in eval mode where its mode matters, and restores it.
    def __init__(self):
        self.saved: list[tuple[nn.Module, bool]] = []
        self.layers: set[str] = set()

    def __call__(self, module: nn.Module) -> None:
        layers = {type(m).__name__ for m in module.modules()
                  if m.training and isinstance(m, _MODE_LAYERS)}  # fmt: skip
        if layers:
            self.saved += [(m, m.training) for m in module.modules()]
            module.eval()
            self.layers |= layers

    def restore(self) -> None:
        for m, training in reversed(self.saved):
            m.training = training


@contextlib.contextmanager
def _eval_mode(model, guide):
    # Score with the pair's modules in eval mode (those it is bound to, and those it registers
    # with pyro.module, switched as they are registered, before they run), then restore them.
    from .capture import recording_modules
    from .pair import modules_of as _modules_of

    switch = _EvalMode()
    for module in _modules_of(model, guide):
        switch(module)
    try:
        with recording_modules([], on_new=switch):
            yield
    finally:
        switch.restore()
        if switch.layers:
            _say_once(
                f"pyrovae: scored the pair in eval mode: its modules had "
                f"{', '.join(sorted(switch.layers))} layers in training mode (no dropout, "
                "batch norm's running statistics, none updated); their modes are restored"
            )


def scoring_transform(data, batch_transform: Callable | None = None) -> Callable | None:
    """The batch transform the scoring functions apply to ``data``: ``batch_transform`` when
    given, else the data's ``batch_preparation`` (part of how the pair reads a batch, as
    :class:`pyrovae.sequences.Sequences` carries it: applied in training and scoring alike),
    never the data's ``batch_transform`` alone (training only, e.g. dynamic binarization)."""
    if batch_transform is not None:
        return batch_transform
    return getattr(data, "batch_preparation", None)


def _preparing(batch_transform: Callable | None) -> Callable[[tuple], tuple]:
    # A batch as the pair sees it: the batch_transform's output, as a tuple.
    if batch_transform is None:
        return tuple
    return lambda batch: tuple(batch_transform(batch))


def _observed(model, guide, args, plate: str) -> list[torch.Tensor]:
    # The values of the model's observed sites in the data plate, datapoints first.
    model_tr, _ = _traces(model, guide, args)
    rows, out = len(args[0]), []
    for site in model_tr.nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
        value = site["value"]
        if frame is None or not isinstance(value, torch.Tensor):
            continue
        dim = frame.dim - len(getattr(site["fn"], "event_shape", ()))
        if value.dim() >= -dim and value.shape[dim] == rows:
            out.append(value.movedim(dim, 0))  # (rows, ...)
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_order(model, guide, tensors, plate: str, batch_transform: Callable | None = None,
                rows: int = 8) -> None:  # fmt: skip
    """Refuse a pair (or a ``batch_transform``) that reorders the datapoints of its batch, e.g.
    sorting them by length, whose scores would come back permuted. Tested on the first ``rows``
    datapoints, given in their order and reversed: the model's observed values must follow the
    order they were given in. A pair or transform whose observed values are random (given the
    same datapoints twice, it observes different values) cannot be tested and passes.

    :param tensors: the data, a tuple of tensors.
    :param str plate: the plate over datapoints.
    :raises ValueError: if the pair reorders its batch.
    """
    probe = tuple(t[:rows] for t in tensors)
    n, prepare = len(probe[0]), _preparing(batch_transform)
    if n < 2:
        return
    flip = torch.arange(n - 1, -1, -1, device=probe[0].device)
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), poutine.block(), torch.no_grad():
        seen = []
        for seed, batch in ((0, probe), (1, probe), (0, tuple(t[flip] for t in probe))):
            torch.manual_seed(seed)
            seen.append(_observed(model, guide, prepare(batch), plate))
    given, again, reversed_ = seen
    if _same(given, again) and not _same([v[flip] for v in given], reversed_):
        raise ValueError(
            "the pair reorders the datapoints of a batch (its batch_transform or model puts "
            "them in another order, e.g. sorted by length), so its scores would come back "
            "permuted; keep the batch's order (to pack sequences, pack_padded_sequence(..., "
            "enforce_sorted=False) sorts inside the PackedSequence and keeps it)"
        )


def _batch_tensors(data) -> tuple[torch.Tensor, ...]:
    # The data's tensors (as_tensors), or one line for a tuple that holds something else.
    check_tuple(data)
    return as_tensors(data)


class _Indices(Messenger):
    # Sets the indices a subsampling plate draws (as replay would: a value, not an observation).
    def __init__(self, plate: str, idx: torch.Tensor):
        super().__init__()
        self.plate, self.idx = plate, idx

    def _process_message(self, msg) -> None:
        if msg["name"] == self.plate and isinstance(msg["fn"], _Subsample):
            msg["value"] = self.idx


def _chunk_weights(model, guide, args, k, layout: PairLayout, idx=None) -> torch.Tensor:
    # (k, b) log weights of one chunk; for a subsampling model, of the datapoints ``idx``.
    if idx is not None:  # the model replays the guide's indices
        guide = _Indices(layout.plate, idx)(guide)
    return log_weights(model, guide, *args, num_particles=k, max_plate_nesting=layout.nesting,
                       data_plate=layout.plate, vectorized=layout.vectorized,
                       looped=layout.looped)  # fmt: skip


def _batches(tensors, n: int, batch_size: int, layout: PairLayout):
    # (args, idx, rows) per batch: slices of the data, or, for a model that subsamples its own
    # plate, the full data with that plate's indices (the last chunk padded to its size).
    if layout.subsample is None:
        for i in range(0, n, batch_size):
            yield tuple(t[i : i + batch_size] for t in tensors), None, min(batch_size, n - i)
        return
    device = tensors[0].device
    for i in range(0, n, layout.subsample):
        idx = torch.arange(i, i + layout.subsample, device=device) % n
        yield tensors, idx, min(layout.subsample, n - i)


PARTICLES = ("auto", "vectorized", "repeated", "looped")


def _on_pair_device(model, guide, tensors):
    # The data on the device of the modules the pair is bound to (fit may have moved them to
    # CUDA): scoring runs where the model is. Pairs bound to no module keep the data's device.
    from .pair import modules_of as _modules_of

    for module in _modules_of(model, guide):
        for p in module.parameters():
            return tuple(t.to(p.device) for t in tensors)
    return tensors


def _in_eval_mode(score: Callable) -> Callable:
    # A scoring function run with its pair's modules in eval mode (see _eval_mode).
    @functools.wraps(score)
    def scored(model, guide, *args, **kwargs):
        with _eval_mode(model, guide):
            return score(model, guide, *args, **kwargs)

    return scored


@_in_eval_mode
def _reduce(
    model,
    guide,
    data,
    num_particles: int,
    reduce: str,
    batch_size: int | None,
    data_plate: str | None,
    max_chunk_elements: int | None,
    particles: str = "auto",
    progress: bool = False,
    seed: int | None = None,
    batch_transform: Callable | None = None,
) -> torch.Tensor:
    num_particles = count("the number of particles/samples", num_particles)
    batch_transform = scoring_transform(data, batch_transform)
    if batch_size is not None:
        batch_size = count("batch_size", batch_size)
    tensors = _on_pair_device(model, guide, _batch_tensors(data))
    n, k_total = len(tensors[0]), int(num_particles)
    per_item = sum(t[0].numel() for t in tensors)  # numbers per datapoint
    if max_chunk_elements is None:
        max_chunk_elements = default_chunk_elements(tensors[0].device)
    if particles not in PARTICLES:
        raise ValueError(f"particles must be one of {', '.join(PARTICLES)}, got {particles!r}")
    layout = inspect_pair(model, guide, tensors, data_plate, batch_transform)
    if layout.subsample is None:
        check_order(model, guide, tensors, layout.plate, batch_transform)
    if particles != "auto" and layout.subsample is None:
        layout = replace(layout, vectorized=particles == "vectorized", looped=particles == "looped")
    if layout.subsample is not None:
        batch_size = layout.subsample
    batch_size, chunk = plan_chunks(n, k_total, per_item, batch_size, max_chunk_elements)
    world, rank = _ranks() if seed is not None else (1, 0)
    out = []
    with torch.no_grad(), _seeded(seed), _bar(progress and rank == 0, n, k_total, reduce) as bar:
        for block, (args, idx, rows) in enumerate(_batches(tensors, n, batch_size, layout)):
            if block % world != rank:  # another rank's block: zeros, filled in by the sum below
                lead = (4,) if reduce == "diagnostics" else ()
                out.append(torch.zeros(*lead, rows, device=tensors[0].device))
                continue
            if seed is not None:  # the block's own draws, whoever scores it
                torch.manual_seed(_block_seed(seed, block))
            if batch_transform is not None:  # the batch as the pair sees it in training
                args = tuple(batch_transform(args))
            chunks = _weight_chunks(model, guide, args, idx, k_total, chunk, layout)
            out.append(_reduce_block(chunks, k_total, reduce, rows, bar))
    values = torch.cat(out, dim=-1)  # (N,); (4, N) of diagnostics
    if world > 1:  # each value was computed by exactly one rank: the sum gathers them exactly
        torch.distributed.all_reduce(values)
    return values


def _weight_chunks(model, guide, args, idx, k_total: int, chunk: int, layout: PairLayout):
    # the log weights (k, b) of one block, chunk by chunk of particles
    for j in range(0, k_total, chunk):
        yield _chunk_weights(model, guide, args, min(chunk, k_total - j), layout, idx)


def _reduce_block(chunks, k_total: int, reduce: str, rows: int, bar) -> torch.Tensor:
    # one block's values from its chunks of log weights: (rows,) for "mean" and "logsumexp",
    # (4, rows) for "diagnostics" (log p(x), stderr, ESS, k̂ from the same weights)
    acc = WeightStats(k_total) if reduce == "diagnostics" else None
    for lw in chunks:  # (k, b)
        if reduce == "diagnostics":
            acc.update(lw)
        else:
            part = lw.logsumexp(0) if reduce == "logsumexp" else lw.sum(0)  # (b,)
            if acc is None:
                acc = part
            else:
                acc = torch.logaddexp(acc, part) if reduce == "logsumexp" else acc + part
        bar.update(rows * len(lw) / k_total)  # images done, in fractions of their K samples
    if reduce == "diagnostics":
        return acc.finish()[:, :rows]
    norm = math.log(k_total) if reduce == "logsumexp" else None
    return (acc - norm if norm is not None else acc / k_total)[:rows]


def _ranks() -> tuple[int, int]:
    # (world size, rank) of the torch.distributed group this process is in, else (1, 0).
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _block_seed(seed: int, block: int) -> int:
    return (int(seed) * 1_000_003 + block) % 2**63


@contextlib.contextmanager
def _seeded(seed: int | None):
    # With a seed, scoring draws from block seeds and leaves the caller's generator as it was.
    if seed is None:
        yield
        return
    state = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _bar(progress: bool, n: int, k: int, reduce: str):
    """A tqdm bar over the images scored, with the work stated up front (images × K)."""
    from tqdm.auto import tqdm

    from .progress import bar_width

    what = "ELBO" if reduce == "mean" else "log p(x)"
    return tqdm(total=n, disable=not progress, unit="img", **bar_width(),
                desc=f"{what}: {n:,} images × K={k:,}",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:,.0f}/{total:,} "
                           "[{elapsed}<{remaining}, {rate_fmt}]")  # fmt: skip


def elbo(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_particles: int = 1,
    batch_size: int | None = None,
    data_plate: str | None = None,
    max_chunk_elements: int | None = None,
    particles: str = "auto",
    progress: bool = False,
    seed: int | None = None,
    batch_transform: Callable | None = None,
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
    :param str data_plate: name of the plate over datapoints (default: found from a trace).
    :param int max_chunk_elements: bound on particles × datapoints × numbers per datapoint
        (default: :func:`default_chunk_elements` of the data's device).
    :param str particles: ``"auto"`` (vectorized where the pair allows it, else repeated, else
        looped), ``"vectorized"``, ``"repeated"`` or ``"looped"`` (see :func:`log_weights`).
    :param bool progress: show a progress bar over the images (rate and time left).
    :param int seed: draw each block of ``batch_size`` datapoints from its own seed (derived
        from ``seed`` and the block's position), leaving the global generator as it was. The
        result then does not depend on which process scores a block: in a ``torch.distributed``
        group (e.g. ``pyrovae evaluate --devices N``) the blocks are shared out over the ranks
        and every rank returns the whole ``(N,)`` result, equal bit for bit to one process's
        with the same ``batch_size`` and device type.
    :param batch_transform: applied to each batch (a tuple of tensors) before the pair sees it,
        as :func:`pyrovae.fit`'s ``batch_transform``, so a pair is scored as it is trained (e.g.
        masks or packed sequences built per batch); it may return non-tensors after the first
        item, a tensor of the batch's datapoints. Rows come back in the order of ``data``: a
        transform or pair that reorders a batch (sorting by length) is refused
        (:func:`check_order`). Default: the data's ``batch_preparation``, if it has one
        (:class:`pyrovae.sequences.Sequences`; :func:`scoring_transform`).
    :raises DataError: for data that are not tensors (a tuple holding a ``PackedSequence``).
    :raises ValueError: for a pair that reorders its batch or subsamples more than the data.
    """
    return _reduce(model, guide, data, num_particles, "mean", batch_size, data_plate,
                   max_chunk_elements, particles, progress, seed,
                   batch_transform=batch_transform)  # fmt: skip


def iwae(
    model: Callable,
    guide: Callable,
    data,
    k: int,
    *,
    batch_size: int | None = None,
    data_plate: str | None = None,
    max_chunk_elements: int | None = None,
    particles: str = "auto",
    progress: bool = False,
    seed: int | None = None,
    batch_transform: Callable | None = None,
) -> torch.Tensor:
    """The importance-weighted bound of each datapoint with ``k`` samples,
    log (1/k) Σ_k p(x, z_k)/q(z_k|x). ``k=1`` is the ELBO; the bound rises with ``k`` towards
    log p(x) [1]. Returns ``(N,)`` in nats. Parameters as for :func:`elbo`.
    """
    return _reduce(model, guide, data, k, "logsumexp", batch_size, data_plate,
                   max_chunk_elements, particles, progress, seed,
                   batch_transform=batch_transform)  # fmt: skip


def log_likelihood(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_samples: int = 5000,
    batch_size: int | None = None,
    data_plate: str | None = None,
    max_chunk_elements: int | None = None,
    particles: str = "auto",
    progress: bool = False,
    seed: int | None = None,
    batch_transform: Callable | None = None,
    method: str = "is",
    steps: int = 100,
    leapfrog: int = 5,
) -> torch.Tensor:
    """Importance-sampled log p(x_i) for every datapoint, with the guide as proposal:

        log p(x_i) ≈ logsumexp_k [log p(x_i, z_k) − log q(z_k|x_i)] − log K

    This is the number VAE papers report (as the negative log-likelihood, with K=5000 [1]).
    Particles are vectorized where the pair allows it (else datapoints are repeated in the
    batch, else drawn one trace at a time), chunked to bound memory, and run on the device of
    the modules the pair is bound to (else the data's). Works for any pair whose sample sites
    all lie inside one plate over the datapoints, found from a trace (or named by
    ``data_plate``).

    :param model: a Pyro model taking the batch tensors as positional arguments.
    :param guide: the matching guide.
    :param data: a tensor ``(N, ...)``, a tuple of tensors, or a torch Dataset.
    :param int num_samples: K, importance samples per datapoint.
    :param int batch_size: datapoints per chunk (default: as many as fit the chunk bound).
    :param str data_plate: name of the plate over datapoints (default: found from a trace).
    :param int max_chunk_elements: bound on particles × datapoints × numbers per datapoint
        (default: :func:`default_chunk_elements` of the data's device).
    :param str particles: ``"auto"``, ``"vectorized"``, ``"repeated"`` or ``"looped"`` (as for
        :func:`elbo`).
    :param bool progress: show a progress bar over the images (rate and time left).
    :param int seed: per-block seeds, and scoring shared out over a ``torch.distributed``
        group's ranks (as for :func:`elbo`).
    :param batch_transform: applied to each batch before the pair sees it (as for :func:`elbo`).
    :param str method: ``"is"``, importance sampling as above, or ``"ais"``, annealed
        importance sampling from q(z|x) to p(x, z) (:func:`pyrovae.ais.ais`) with
        ``num_samples`` chains per datapoint, for pairs whose latents are all continuous.
    :param int steps: annealing steps (``method="ais"``).
    :param int leapfrog: leapfrog steps per HMC move (``method="ais"``).
    :returns: a tensor ``(N,)`` of log-likelihoods in nats; for their standard errors, ESS
        and Pareto k̂, :func:`log_likelihood_report`.
    :raises ValueError: for a latent outside the data plate, or bad arguments.
    """
    if method != "is":
        return log_likelihood_report(model, guide, data, num_samples=num_samples,
                                     method=method, steps=steps, leapfrog=leapfrog,
                                     batch_size=batch_size, data_plate=data_plate,
                                     max_chunk_elements=max_chunk_elements, progress=progress,
                                     seed=seed, batch_transform=batch_transform).log_px  # fmt: skip
    return iwae(
        model,
        guide,
        data,
        num_samples,
        batch_size=batch_size,
        data_plate=data_plate,
        max_chunk_elements=max_chunk_elements,
        particles=particles,
        progress=progress,
        seed=seed,
        batch_transform=batch_transform,
    )


def scoring_estimate(
    model: Callable,
    guide: Callable,
    data,
    num_samples: int,
    *,
    budget: float = 600.0,
    probe: tuple[int, int] = (4, 250),
    seed: int = 0,
) -> tuple[float, str]:
    """The time :func:`log_likelihood` will take on ``data`` with ``num_samples`` importance
    samples, said before it is spent: times two calls (``probe`` = (datapoints, particles), then
    the same datapoints with four times the particles), after a tiny untimed call that traces
    the pair; the difference is the cost per datapoint and sample (a call's fixed overhead,
    which dwarfs a small probe, drops out), extrapolated to ``data`` × K. Names the K that
    would fit in ``budget`` seconds when the estimate exceeds it. Seeded: the caller's random
    state is left as it was.

    :returns: the estimated seconds and a one-line message, e.g. ``"scoring 400 images × K=1000:
        about 4.0 min (timed on 4 images × K=250); K=2000 would fit in 10 min"``.
    """
    import time

    tensors, prepare = as_tensors(data), scoring_transform(data)
    n, k = len(tensors[0]), count("the number of samples", num_samples)
    m, kp = min(n, probe[0]), min(k, probe[1])

    def first(rows: int):  # the first datapoints, as data was given (a tensor or a tuple)
        part = tuple(t[:rows] for t in tensors)
        return part[0] if len(part) == 1 else part

    # this process alone (no blocks shared out over a torch.distributed group: the estimate is
    # this process's), from its own seed, the caller's generators left as they were
    with torch.random.fork_rng(devices=_cuda_devices(tensors)):
        torch.manual_seed(seed)
        log_likelihood(model, guide, first(1), num_samples=2, batch_transform=prepare)
        took = []
        for particles in (kp, 4 * kp):
            start = time.perf_counter()
            log_likelihood(model, guide, first(m), num_samples=particles,
                           batch_transform=prepare)  # fmt: skip
            took.append(time.perf_counter() - start)
    per = max(took[1] - took[0], 0.0) / (3 * m * kp)  # seconds per datapoint per sample
    fixed = max(took[0] - per * m * kp, 0.0)  # a call's own overhead
    seconds = fixed + per * n * k

    def say(s: float) -> str:
        return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"

    note = f"scoring {n:,} images × K={k:,}: about {say(seconds)} (timed on {m} × K={kp})"
    if seconds > budget:
        fit = per * n  # seconds per importance sample over all datapoints
        best = max(1, int(budget / fit))
        nice = max(v * 10**e for e in range(len(str(best))) for v in (1, 2, 5)
                   if v * 10**e <= best)  # fmt: skip
        note += f"; K={nice:,} would fit in {say(budget)}"
    return seconds, note


def log_likelihood_report(
    model: Callable,
    guide: Callable,
    data,
    *,
    num_samples: int = 5000,
    method: str = "is",
    steps: int = 100,
    leapfrog: int = 5,
    batch_size: int | None = None,
    data_plate: str | None = None,
    max_chunk_elements: int | None = None,
    particles: str = "auto",
    progress: bool = False,
    seed: int | None = None,
    batch_transform: Callable | None = None,
) -> LogLikelihoodReport:
    """log p(x) of every datapoint and how far to trust it: its Monte-Carlo standard error, the
    effective sample size and the Pareto k̂ of the weights' tail (:mod:`pyrovae.diagnostics`),
    from the same log weights that give log p(x), at no extra model evaluations.

    With ``method="is"`` (the default) the estimate is :func:`log_likelihood`'s, the same
    numbers for the same ``seed``; with ``method="ais"``, annealed importance sampling
    (:func:`pyrovae.ais.ais`) with ``num_samples`` chains of ``steps`` annealing steps of
    ``leapfrog`` HMC steps each. Other parameters as for :func:`log_likelihood`.

    :returns: a :class:`~pyrovae.diagnostics.LogLikelihoodReport` of ``(N,)`` tensors, with
        the share per k̂ band (``.bands()``) and a one-line verdict (``.verdict()``).
    :raises ValueError: for an unknown method, bad counts, or a pair AIS cannot run.
    """
    if method == "ais":
        from .ais import ais

        if scoring_transform(data, batch_transform) is not None:
            raise ValueError("method='ais' takes tensors as the pair sees them: apply "
                             "batch_transform to the data first (it is applied per batch "
                             "with method='is' only)")  # fmt: skip

        return ais(model, guide, data, chains=num_samples, steps=steps, leapfrog=leapfrog,
                   batch_size=batch_size, data_plate=data_plate, progress=progress, seed=seed,
                   max_chunk_elements=max_chunk_elements)  # fmt: skip
    if method != "is":
        raise ValueError(f"method must be 'is' or 'ais', got {method!r}")
    values = _reduce(model, guide, data, num_samples, "diagnostics", batch_size, data_plate,
                     max_chunk_elements, particles, progress, seed, batch_transform)  # fmt: skip
    return LogLikelihoodReport(*values, num_samples=int(num_samples), method="is")


def _cuda_devices(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
