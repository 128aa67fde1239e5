"""Pyro's ELBOs computed without reading values back to the host: the losses the fast path of
:func:`pyrovae.fit` (:mod:`pyrovae.capture`) and the Lightning engine run.

Pyro's ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``, ``TraceGraph_ELBO``,
``TraceTMC_ELBO`` and ``Trace_MMD`` read floats back to the host (``torch_item``,
``warn_if_nan``, a positivity test in the Dice estimator): fine eagerly, fatal to capture and a
sync per step on a GPU. Each has a :class:`NoSync` twin here, the same values and gradients
with nothing read back (``TraceGraph_ELBO`` as :class:`NoSyncTraceGraph_ELBO`, one
differentiable loss with the guide's baselines); :func:`no_sync` maps a loss to its twin.

A loss that cannot train a pair is refused before any step, in one line naming the loss as
written and what to use: by :func:`no_sync` (no ``differentiable_loss``: ``RenyiELBO``,
``ReweightedWakeSleep``; a value that is not an ELBO: ``TraceTailAdaptive_ELBO``), or on the
first, eager run of the pair, before its update (a loss that needs reparameterized sites given a
Bernoulli one, even without Pyro's validation; a ``max_plate_nesting`` too small; a pair or a
baseline that does not broadcast over vectorized particles)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import threading

import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    Trace_MMD,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
    TraceTMC_ELBO,
)

from .errors import CaptureError

log = logging.getLogger("pyrovae")

__all__ = [
    "NoSync",
    "NoSyncTrace_ELBO",
    "NoSyncTraceMeanField_ELBO",
    "NoSyncTraceEnum_ELBO",
    "NoSyncTraceGraph_ELBO",
    "NoSyncTraceTMC_ELBO",
    "NoSyncTrace_MMD",
    "NO_SYNC",
    "no_sync",
    "spelled",
    "tracing",
]


# Where Pyro's ELBOs read values back to the host: ``torch_item`` (a float per site or per
# loss), ``warn_if_nan`` (a NaN check on the loss) and, in TraceEnum_ELBO's Dice estimator, a
# test of whether every enumerated probability is positive. Inside :class:`NoSync` losses they
# are swapped for versions that keep tensors: the same values and gradients, nothing read back.
def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _no_warn(value, *args, **kwargs):
    return value


def _fulldot_positive(prob: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    # Σ prob·cost over the entries with prob > 0 (a cost where prob = 0 may be infinite), with
    # no data-dependent shapes: what Pyro's Dice computes with masked_select after mask.all().
    positive = prob > 0
    return (prob * torch.where(positive, cost, torch.zeros_like(cost))).sum()


def _compute_expectation(self, costs):
    # pyro.infer.util.Dice.compute_expectation (Pyro 1.9, Apache-2.0), its masked sum taken
    # with _fulldot_positive instead of branching on ``mask.all()`` on the host.
    from opt_einsum import shared_intermediates
    from pyro.ops import packed
    from pyro.ops.einsum.adjoint import require_backward
    from pyro.ops.rings import MarginalRing

    with shared_intermediates() as cache:
        ring = MarginalRing(cache=cache)
        expected_cost = 0.0
        for ordinal, cost_terms in costs.items():
            log_factors = self._get_log_factors(ordinal)
            scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
            log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
            queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
            for log_factor in log_factors:
                key = frozenset(log_factor._pyro_dims)
                if queries.get(key, False) is None:
                    queries[key] = log_factor
            for cost in cost_terms:
                key = frozenset(cost._pyro_dims)
                if queries[key] is None:
                    query = torch.zeros_like(cost)
                    query._pyro_dims = cost._pyro_dims
                    log_factors.append(query)
                    queries[key] = query
            sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
            for query in queries.values():
                require_backward(query)
            root = ring.sumproduct(log_factors, sum_dims)
            root._pyro_backward()
            probs = {key: query._pyro_backward_result.exp() for key, query in queries.items()}
            for cost in cost_terms:
                key = frozenset(cost._pyro_dims)
                prob = probs[key]
                prob._pyro_dims = queries[key]._pyro_dims
                cost, prob = packed.broadcast_all(cost, prob)
                expected_cost = expected_cost + scale * _fulldot_positive(prob, cost)
    return expected_cost


def _patches():
    # (owner, attribute, replacement) for every host read in Pyro's ELBOs.
    from pyro.infer import (
        elbo,
        trace_elbo,
        trace_mean_field_elbo,
        trace_mmd,
        traceenum_elbo,
        tracetmc_elbo,
        util,
    )

    return [
        (trace_elbo, "torch_item", _detach),
        (trace_elbo, "warn_if_nan", _no_warn),
        (trace_mean_field_elbo, "torch_item", _detach),
        (trace_mean_field_elbo, "warn_if_nan", _no_warn),
        (traceenum_elbo, "warn_if_nan", _no_warn),
        (tracetmc_elbo, "warn_if_nan", _no_warn),
        (trace_mmd, "torch_item", _detach),
        (trace_mmd, "warn_if_nan", _no_warn),
        (elbo, "warn_if_nan", _no_warn) if hasattr(elbo, "warn_if_nan") else None,
        (util.Dice, "compute_expectation", _compute_expectation),
    ]


_patch_lock = threading.RLock()


@contextlib.contextmanager
def _no_host_reads():
    # Swap the host-reading helpers in Pyro's ELBO modules while a NoSync loss runs.
    with _patch_lock:
        saved = [(o, n, getattr(o, n)) for o, n, _ in filter(None, _patches())]
        for owner, name, value in filter(None, _patches()):
            setattr(owner, name, value)
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)


#: Set while :class:`CapturedLoss` traces a loss on fake tensors (a loss that cannot be
#: replayed, such as a decaying-average baseline's, refuses there).
tracing = threading.local()


def _baselines(guide_trace) -> list[str]:
    # The guide's sample sites that ask for a baseline (infer={"baseline": {...}}).
    return [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and site["infer"].get("baseline")
    ]


class NoSync:
    """Mixin: a Pyro ELBO computed without reading values back to the host.

    Pyro's ``Trace_ELBO`` sums each site's log-density into a Python float (``torch_item``, one
    host sync per site) and checks the loss for NaN (``warn_if_nan``); ``TraceMeanField_ELBO``
    and ``TraceEnum_ELBO`` check it too. A ``NoSync`` loss runs Pyro's own estimator with those
    two helpers keeping tensors: the same value and the same gradient estimator (score-function
    terms, closed-form KL and enumeration included), with nothing read back, so the loss can be
    captured (:func:`capture`) and recorded in a CUDA graph. :func:`pyrovae.fit` checks the loss
    for NaN itself, once per epoch on CUDA. Make one with :func:`no_sync`.
    """

    #: whether the loss reads the guide's ``infer={"baseline": ...}`` (TraceGraph_ELBO only)
    uses_baselines = False
    #: the traces ("model", "guide") whose latent sites the loss needs reparameterized
    needs_rsample: tuple[str, ...] = ()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with _no_host_reads(), _named_errors(self):
            return super().differentiable_loss(model, guide, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        # Pyro's traces, checked once per loss (_check_sites).
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if not getattr(self, "_sites_checked", False):
            _check_sites(self, {"model": model_trace, "guide": guide_trace})
            self._sites_checked = True
        return model_trace, guide_trace


def spelled(loss) -> str:
    """A loss as its user wrote it: its Pyro class (not its no-sync twin) and the settings that
    differ from the defaults, e.g. ``Trace_ELBO(num_particles=4, vectorize_particles=True)``
    (as :func:`no_sync` found them: Pyro fills in a guessed ``max_plate_nesting`` later)."""
    if getattr(loss, "_spelled", None):
        return loss._spelled
    cls = next(c for c in type(loss).__mro__ if not issubclass(c, NoSync))
    defaults = {"num_particles": 1, "vectorize_particles": False, "max_plate_nesting": math.inf}
    shown = [
        f"{name}={getattr(loss, name)}"
        for name, default in defaults.items()
        if getattr(loss, name, default) != default
    ]
    return f"{cls.__name__}({', '.join(shown)})"


def _check_sites(loss: NoSync, traces: dict) -> None:
    # Latent sites the loss cannot differentiate (refused: Pyro checks them only under
    # validation, and without it trains on a biased gradient), and baselines it ignores
    # (warned about, once).
    discrete = [
        f"{kind} {name!r} ({_base(site['fn']).__name__})"
        for kind in loss.needs_rsample
        for name, site in traces[kind].nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
        and not site["infer"].get("enumerate") and not getattr(site["fn"], "has_rsample", True)
    ]  # fmt: skip
    if discrete:
        raise ValueError(
            f"loss={spelled(loss)} needs reparameterized latent sites, and these have no "
            f"rsample: {', '.join(discrete)}; use TraceGraph_ELBO() (score-function gradients "
            "with the guide's baselines) or TraceEnum_ELBO() (the sites enumerated)"
        )
    sites = [] if loss.uses_baselines else _baselines(traces["guide"])
    if sites:
        log.warning(
            "pyrovae: the guide's site(s) %s set infer={'baseline': ...}, which %s ignores (the "
            "baselines never train nor reduce variance); train with loss=TraceGraph_ELBO() to "
            "use them", ", ".join(map(repr, sites)), spelled(loss).split("(")[0],
        )  # fmt: skip


def _base(fn) -> type:
    # A distribution's class under its wrappers (Independent, masked): Bernoulli, Normal, ...
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn)


@contextlib.contextmanager
def _named_errors(loss):
    # Pyro's errors that a loss's settings cause, as one line naming the loss and the fix
    # (Pyro's span several lines and name neither). Not while capture traces the loss: it
    # explains a failure there itself, from the original error.
    try:
        yield
    except (ValueError, RuntimeError, IndexError) as e:
        first = (str(e).splitlines() or [""])[0].strip()
        vectorized = getattr(loss, "vectorize_particles", False) and loss.num_particles > 1
        if first.startswith("loss=") or isinstance(e, CaptureError) or getattr(tracing, "on", 0):
            raise
        if "plate stack overflow" in str(e):
            need = re.search(r"at least (\d+)", str(e))
            fix = (
                f"pass max_plate_nesting={need.group(1) if need else 'larger'}, or leave it out "
                "for Pyro to guess"
            )
        elif first.startswith("Expected baseline at site") and vectorized:
            fix = (
                "a neural baseline gives one value per element of the site's downstream cost, "
                "which vectorized particles give a leading particle dimension: pass "
                "vectorize_particles=False (particles in a loop) or give the baseline that "
                "dimension"
            )
        elif vectorized:
            raise ValueError(
                f"loss={spelled(loss)}: the pair fails with its particles vectorized "
                f"({type(e).__name__}: {first}); write the model and guide to broadcast over a "
                "leading particle dimension (Pyro's plates and distributions do, a reshape or "
                "stack of the batch may not), or pass vectorize_particles=False"
            ) from e
        else:
            raise
        raise ValueError(f"loss={spelled(loss)}: {first}; {fix}") from None


class NoSyncTrace_ELBO(NoSync, Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` without host syncs (see :class:`NoSync`)."""


class NoSyncTraceMeanField_ELBO(NoSync, TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` without host syncs (see :class:`NoSync`); a
    guide site without ``rsample`` is refused (Pyro checks it only under validation)."""

    needs_rsample = ("guide",)


class NoSyncTraceEnum_ELBO(NoSync, TraceEnum_ELBO):
    """:class:`~pyro.infer.TraceEnum_ELBO` without host syncs (see :class:`NoSync`)."""


class NoSyncTraceTMC_ELBO(NoSync, TraceTMC_ELBO):
    """:class:`~pyro.infer.TraceTMC_ELBO` without host syncs (see :class:`NoSync`)."""


class NoSyncTrace_MMD(NoSync, Trace_MMD):
    """:class:`~pyro.infer.Trace_MMD` without host syncs (see :class:`NoSync`); latent sites
    without ``rsample``, in the model or the guide, are refused."""

    needs_rsample = ("model", "guide")


class NoSyncTraceGraph_ELBO(NoSync, TraceGraph_ELBO):
    """:class:`~pyro.infer.TraceGraph_ELBO` as one differentiable loss, without host syncs.

    Pyro's ``TraceGraph_ELBO`` has no ``differentiable_loss``: its ``loss_and_grads`` computes
    the ELBO and a surrogate loss (the reparameterized terms, a score-function term per
    non-reparameterizable site with its downstream cost less its baseline, and the neural
    baselines' squared error) and back-propagates the surrogate. This loss is both at once:
    its value is −ELBO and its gradient the surrogate's, ``−ELBO + (s − s.detach())``, so
    the same value and gradients as ``loss_and_grads`` [1]. Without gradients (scoring) it is
    −ELBO alone and no baseline is updated.

    A neural baseline (``infer={"baseline": {"nn_baseline": net, ...}}``, ``net`` registered
    with ``pyro.module`` or held by the pair's module) replays. A decaying-average baseline
    (``use_decaying_avg_baseline``) lives in Pyro's param store, updated outside the loss's
    graph on every step: it cannot be replayed, so such a pair trains eagerly (capture says so).

    References:
      [1] J. Schulman, N. Heess, T. Weber, P. Abbeel, "Gradient Estimation Using Stochastic
          Computation Graphs", NeurIPS 2015.
    """

    uses_baselines = True

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with _no_host_reads(), _named_errors(self):
            if not torch.is_grad_enabled():  # a score: −ELBO, no baseline updated
                return -sum(m.log_prob_sum() - g.log_prob_sum()
                            for m, g in self._get_traces(model, guide, args, kwargs)
                            ) / self.num_particles  # fmt: skip
            elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo).detach() + (surrogate - surrogate.detach())

    def _get_trace(self, model, guide, args, kwargs):
        # Eager: Pyro's traces, whose values carry provenance (which non-reparameterizable
        # sites each log-density depends on), noted per site. Traced on fake tensors, where
        # provenance tensors cannot be made: plain traces, the noted provenance used instead.
        if not getattr(tracing, "on", False):
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            self._provenance = _provenance_of(model_trace, guide_trace)
            return model_trace, guide_trace
        from pyro.infer.enum import get_importance_trace

        return get_importance_trace("dense", self.max_plate_nesting, model, guide, args, kwargs)

    def _loss_and_surrogate_loss_particle(self, model_trace, guide_trace):
        if not getattr(tracing, "on", False):
            return super()._loss_and_surrogate_loss_particle(model_trace, guide_trace)
        decaying = [
            name
            for name in _baselines(guide_trace)
            if guide_trace.nodes[name]["infer"]["baseline"].get("use_decaying_avg_baseline")
        ]
        if decaying:
            raise CaptureError(
                f"the guide's site(s) {', '.join(map(repr, decaying))} use a decaying-average "
                "baseline, which TraceGraph_ELBO updates in Pyro's param store outside the "
                "loss's graph on every step: it cannot be replayed (a neural baseline, "
                "nn_baseline=, can)"
            )
        from pyro.infer import tracegraph_elbo

        noted = getattr(self, "_provenance", {})
        found = {}  # id of a site's log_prob_sum -> its noted provenance
        for kind, trace in (("model", model_trace), ("guide", guide_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    if (kind, name) not in noted:
                        raise CaptureError(f"the {kind}'s site {name!r} was not seen eagerly")
                    found[id(site["log_prob_sum"])] = noted[kind, name]
        with _patched(tracegraph_elbo, "get_provenance", lambda x: found.get(id(x), frozenset())):
            return super()._loss_and_surrogate_loss_particle(model_trace, guide_trace)


def _provenance_of(model_trace, guide_trace) -> dict:
    # {(trace, site): the non-reparameterizable guide sites its log-density depends on}.
    from pyro.ops.provenance import get_provenance

    return {
        (kind, name): get_provenance(site["log_prob_sum"])
        for kind, trace in (("model", model_trace), ("guide", guide_trace))
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    }


@contextlib.contextmanager
def _patched(owner, name: str, value):
    with _patch_lock:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, saved)


#: Pyro's ELBO classes and their no-sync twins (a JIT-compiled variant maps to its plain
#: class's twin: fit captures the loss itself).
NO_SYNC = {
    Trace_ELBO: NoSyncTrace_ELBO,
    TraceMeanField_ELBO: NoSyncTraceMeanField_ELBO,
    TraceEnum_ELBO: NoSyncTraceEnum_ELBO,
    TraceGraph_ELBO: NoSyncTraceGraph_ELBO,
    TraceTMC_ELBO: NoSyncTraceTMC_ELBO,
    Trace_MMD: NoSyncTrace_MMD,
    JitTrace_ELBO: NoSyncTrace_ELBO,
    JitTraceMeanField_ELBO: NoSyncTraceMeanField_ELBO,
    JitTraceEnum_ELBO: NoSyncTraceEnum_ELBO,
    JitTraceGraph_ELBO: NoSyncTraceGraph_ELBO,
}

#: What to train with instead of a Pyro loss that has no ``differentiable_loss``.
_INSTEAD = {
    "RenyiELBO": "pyrovae.IWAE(k) (the importance-weighted bound, RenyiELBO's alpha=0, per "
    "datapoint) or Trace_ELBO()",
    "ReweightedWakeSleep": "TraceGraph_ELBO() (score-function gradients with the guide's "
    "baselines) or TraceEnum_ELBO() (discrete latents enumerated)",
}

#: Pyro losses with a ``differentiable_loss`` that still cannot train a pair in fit: why, and
#: what to use instead.
_REFUSED = {
    TraceTailAdaptive_ELBO: (
        "it estimates gradients only (its loss value is inf, and fit reports and checks −loss "
        "as the training ELBO)",
        "pyrovae.IWAE(k) (a mass-covering importance-weighted bound) or Trace_ELBO()",
    ),
}


def no_sync(loss):
    """The no-sync twin of a Pyro ELBO instance (same settings: particles, vectorization,
    plate nesting), or ``loss`` itself when it has none (already no-sync, or another class).

    :param loss: a Pyro ELBO instance.
    :raises ValueError: for a loss that cannot train a pair in :func:`pyrovae.fit`: one with
        no ``differentiable_loss`` (``RenyiELBO``, ``ReweightedWakeSleep``, ...), one whose
        value is not an ELBO (``TraceTailAdaptive_ELBO``) or that is not an ELBO, naming what
        to use instead.
    """
    for cls, (why, instead) in _REFUSED.items():
        if isinstance(loss, cls):
            raise ValueError(f"loss={spelled(loss)} cannot train a pair here: {why}; use {instead}")
    twin = NO_SYNC.get(type(loss))
    if twin is None:
        if not (isinstance(loss, ELBO) and callable(getattr(loss, "differentiable_loss", None))):
            cls = type(loss).__name__
            instead = _INSTEAD.get(cls, "Trace_ELBO(), TraceMeanField_ELBO(), TraceEnum_ELBO(), "
                                   "TraceGraph_ELBO() or pyrovae.IWAE(k)")  # fmt: skip
            raise ValueError(
                f"loss={cls}(...) cannot train a pair here: pyrovae back-propagates the loss "
                f"tensor of an ELBO's differentiable_loss, which {cls} has not; use {instead}"
            )
        return loss
    written = spelled(loss)
    loss = copy.copy(loss)
    loss.__class__ = twin
    loss._spelled = written
    return loss
