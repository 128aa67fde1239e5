"""Capturing a model/guide pair's loss once and replaying it: the fast path of :func:`pyrovae.fit`.

Pyro builds the ELBO anew on every step: it runs the model and guide under its effect handlers,
records traces, computes log-densities and sums them, all in Python. For a pair with static
structure the tensor operations are the same on every step; only the data and the random draws
change. :func:`capture` records those operations once, at the ATen level with
:func:`torch.fx.experimental.proxy_tensor.make_fx` on fake tensors, with the parameters and
buffers as inputs; :class:`CapturedLoss` replays the recorded graph, which runs no Pyro code.
Random draws are recorded as operations, so every replay draws fresh noise.

Tracing on fake tensors is also the safety check: a pair whose Python reads tensor values
(data-dependent control flow, ``.item()``, validation checks, the host syncs in Pyro's own
``Trace_ELBO``) cannot be traced, and :func:`capture` raises :class:`CaptureError` saying why
(in the user's code or inside the loss); :func:`pyrovae.fit` then trains eagerly. Pyro's ELBOs
run as their :class:`NoSync` twins, which read nothing back (``TraceGraph_ELBO`` as
:class:`NoSyncTraceGraph_ELBO`, one differentiable loss with the guide's baselines); a loss with
no ``differentiable_loss`` is refused by :func:`no_sync`. Parameters are graph inputs
whichever way the pair holds them: the modules it is bound to (``PyroModule``), modules it
registers with ``pyro.module``, and plain ``pyro.param`` sites. The graph is recorded above
autograd, so every stop-gradient (``detach``) of a score-function estimator stays one on
replay. A batch holding anything but tensors (a ``PackedSequence`` built per batch) is not
captured: it trains eagerly.

On CUDA, :class:`CudaGraphStep` goes further and records the whole training step — batch
gather, replayed loss, backward, optimizer step, loss accumulation — as one CUDA graph
(the recipe of PyTorch's "whole network capture").
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import threading
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from torch import nn

log = logging.getLogger("pyrovae")

__all__ = [
    "NoSync",
    "NoSyncTrace_ELBO",
    "NoSyncTraceMeanField_ELBO",
    "NoSyncTraceEnum_ELBO",
    "NoSyncTraceGraph_ELBO",
    "NO_SYNC",
    "no_sync",
    "CaptureError",
    "CapturedLoss",
    "capture",
    "recording_modules",
    "CudaGraphStep",
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
    from pyro.infer import elbo, trace_elbo, trace_mean_field_elbo, traceenum_elbo, util

    return [
        (trace_elbo, "torch_item", _detach),
        (trace_elbo, "warn_if_nan", _no_warn),
        (trace_mean_field_elbo, "torch_item", _detach),
        (trace_mean_field_elbo, "warn_if_nan", _no_warn),
        (traceenum_elbo, "warn_if_nan", _no_warn),
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
_tracing = threading.local()


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

    def differentiable_loss(self, model, guide, *args, **kwargs):
        with _no_host_reads():
            return super().differentiable_loss(model, guide, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        # Pyro's traces, and once per loss a warning for baselines this loss ignores.
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if not self.uses_baselines and not getattr(self, "_baselines_checked", False):
            self._baselines_checked = True
            sites = _baselines(guide_trace)
            if sites:
                log.warning(
                    "pyrovae: the guide's site(s) %s set infer={'baseline': ...}, which %s "
                    "ignores (the baselines never train nor reduce variance); train with "
                    "loss=TraceGraph_ELBO() to use them",
                    ", ".join(map(repr, sites)), type(self).__name__.removeprefix("NoSync"),
                )  # fmt: skip
        return model_trace, guide_trace


class NoSyncTrace_ELBO(NoSync, Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` without host syncs (see :class:`NoSync`)."""


class NoSyncTraceMeanField_ELBO(NoSync, TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` without host syncs (see :class:`NoSync`)."""


class NoSyncTraceEnum_ELBO(NoSync, TraceEnum_ELBO):
    """:class:`~pyro.infer.TraceEnum_ELBO` without host syncs (see :class:`NoSync`)."""


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
        with _no_host_reads():
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
        if not getattr(_tracing, "on", False):
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            self._provenance = _provenance_of(model_trace, guide_trace)
            return model_trace, guide_trace
        from pyro.infer.enum import get_importance_trace

        return get_importance_trace("dense", self.max_plate_nesting, model, guide, args, kwargs)

    def _loss_and_surrogate_loss_particle(self, model_trace, guide_trace):
        if not getattr(_tracing, "on", False):
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


def no_sync(loss):
    """The no-sync twin of a Pyro ELBO instance (same settings: particles, vectorization,
    plate nesting), or ``loss`` itself when it has none (already no-sync, or another class).

    :param loss: a Pyro ELBO instance.
    :raises ValueError: for a loss that cannot train a pair in :func:`pyrovae.fit`: one with
        no ``differentiable_loss`` (``RenyiELBO``, ``ReweightedWakeSleep``, ...) or that is
        not an ELBO, naming what to use instead.
    """
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
    loss = copy.copy(loss)
    loss.__class__ = twin
    return loss


class CaptureError(RuntimeError):
    """The pair's loss cannot be captured and replayed safely; the message says why."""


class _Holder(nn.Module):
    # Gathers what a pair's loss reads, so torch.func.functional_call can swap it for graph
    # inputs while the loss runs: the modules it is bound to or registers with pyro.module, and
    # the unconstrained tensors of plain pyro.param sites (as buffers, installed in Pyro's param
    # store under their names for the duration of the call).
    def __init__(self, modules: Sequence[nn.Module], loss_fn: Callable, free: dict | None = None):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.loss_fn = loss_fn
        self.free = nn.Module()
        self._free_names: dict[str, tuple[str, object]] = {}  # buffer -> (param name, constraint)
        for i, (name, (tensor, constraint)) in enumerate((free or {}).items()):
            self.free.register_buffer(f"p{i}", tensor, persistent=False)
            self._free_names[f"p{i}"] = (name, constraint)

    def forward(self, *batch):
        store = pyro.get_param_store()
        for key, (name, constraint) in self._free_names.items():
            value = getattr(self.free, key)  # the swapped-in graph input
            store._params[name] = value
            store._constraints[name] = constraint
            store._param_to_name[value] = name
        return self.loss_fn(*batch)


@contextlib.contextmanager
def recording_modules(found: list[nn.Module], on_new: Callable[[nn.Module], None] | None = None):
    """Note every module passed to ``pyro.module`` while the block runs (appended to ``found``
    once each): how :func:`pyrovae.fit` finds the networks of a pair written as plain functions,
    in the style of Pyro's tutorials.

    :param list found: the modules noted (appended to).
    :param on_new: called with each module when it is first noted, before Pyro registers it
        (and so before the pair runs it).
    """
    import pyro.primitives

    original = pyro.primitives.module

    def module(name, nn_module, *args, **kwargs):
        if all(m is not nn_module for m in found):
            found.append(nn_module)
            if on_new is not None:
                on_new(nn_module)
        return original(name, nn_module, *args, **kwargs)

    pyro.module = pyro.primitives.module = module
    try:
        yield found
    finally:
        pyro.module = pyro.primitives.module = original


def _where(e: BaseException) -> str:
    # The innermost frame of the failure outside torch: in Pyro's ELBO, or in the user's code.
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    if "/pyro/infer/" in f.filename:
        return (
            f" (inside Pyro's loss, {f.filename.rsplit('/pyro/', 1)[-1]}:{f.lineno}: pass a loss "
            "without host reads, e.g. pyrovae.capture.no_sync(loss))"
        )
    if "/pyro/" in f.filename:
        return f" (inside Pyro, {f.filename.rsplit('/pyro/', 1)[-1]}:{f.lineno})"
    return f" (in your code, {f.filename}:{f.lineno}: {f.line})"


def _no_twin(loss) -> str | None:
    # For a Pyro loss that no_sync cannot map (a subclass of a mapped class, e.g. CEVAE's
    # TraceCausalEffect_ELBO, or another class): why Pyro's host reads inside it stay.
    if not isinstance(loss, ELBO) or isinstance(loss, NoSync) or type(loss) in NO_SYNC:
        return None
    cls = type(loss).__name__
    mapped = ", ".join(c.__name__ for c in NO_SYNC if not c.__name__.startswith("Jit"))
    return (
        f"the loss class {cls} has no no-sync twin (pyrovae.capture.no_sync maps {mapped} and "
        "their Jit variants, not their subclasses), so the host reads in Pyro's loss code stay "
        f"and the pair trains eagerly; for the fast path, if {cls}'s own code reads no values, "
        f"train with class NoSync{cls}(pyrovae.capture.NoSync, {cls})"
    )


def _in_pyro(e: BaseException) -> str | None:
    # "infer/util.py:135" when the innermost frame outside torch is in Pyro's code, else None.
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if frames and "/pyro/" in frames[-1].filename:
        return f"{frames[-1].filename.rsplit('/pyro/', 1)[-1]}:{frames[-1].lineno}"
    return None


def _explain(e: Exception, loss=None) -> str:
    # Why a fake-tensor trace failed, in terms of the user's model and guide or of the loss.
    name, text = type(e).__name__, (str(e).strip().splitlines() or [""])[0][:200]
    where = _where(e)
    read = "DataDependent" in name or "data-dependent" in text
    if read and _no_twin(loss) and _in_pyro(e):
        return f"{_no_twin(loss)} [{name} at {_in_pyro(e)}]"
    if read:
        return (
            "the loss reads a tensor's value in Python (data-dependent control flow, "
            f".item(), float(t), or a validation check) [{name}]{where}; such a pair trains "
            "eagerly: remove the value read to get the fast path back"
        )
    if "convert all Tensors to FakeTensors" in text:
        return (
            "the model or guide uses a tensor that is neither an argument nor a parameter or "
            f"buffer of its modules (e.g. a tensor held elsewhere){where}; register it in a "
            "module (a buffer), or pass it as data"
        )
    return f"{name}: {text}{where}"


def _check_tensors(batch) -> None:
    # A recorded graph takes tensors: a batch holding anything else (a PackedSequence built per
    # batch, whose sizes vary with the lengths) runs eagerly.
    other = next((b for b in batch if not isinstance(b, torch.Tensor)), None)
    if other is not None:
        raise CaptureError(
            f"the batch holds a {type(other).__name__}, not a tensor, which a recorded graph "
            "cannot take as an input"
        )


class CapturedLoss:
    """A pair's loss recorded as an ATen graph, replayed on the current parameters.

    Build it with :func:`capture`. Calling it with a batch of the captured shapes returns the
    loss (a scalar tensor with gradients to the parameters); a batch of another shape is traced
    once more and cached.
    """

    def __init__(self, holder: _Holder, graphs: dict):
        self._holder = holder
        self._graphs = graphs
        self._names = list(self._state())

    def _state(self) -> dict[str, torch.Tensor]:
        state = dict(self._holder.named_parameters())
        state.update(self._holder.named_buffers())
        return state

    def _trace(self, batch):
        from torch.fx.experimental.proxy_tensor import make_fx

        names = self._names

        def loss(state_values, *args):
            state = dict(zip(names, state_values, strict=True))
            return torch.func.functional_call(self._holder, state, args)

        # A fresh param store while tracing: pyro.param sites (PyroModule parameters) then read
        # the module's swapped-in graph inputs, and no fake tensor leaks into the real store.
        before = self._state()
        _tracing.on = True
        try:
            with pyro.validation_enabled(False), pyro.get_param_store().scope():
                # tensors the pair closes over (constants such as a fixed matrix) are kept by
                # reference; trained tensors must be graph inputs (checked below). Traced above
                # autograd (pre_dispatch): a .detach() stays a detach (below it, it is traced as
                # an alias, and the replay would differentiate through every stop-gradient of a
                # score-function estimator, Dice or baseline)
                graph = make_fx(
                    loss, tracing_mode="fake", pre_dispatch=True, _allow_non_fake_inputs=True
                )(list(before.values()), *batch)
        except CaptureError:  # a loss that knows it cannot be replayed (NoSyncTraceGraph_ELBO)
            raise
        except Exception as e:  # any failure to trace means: do not replay this pair
            raise CaptureError(_explain(e, getattr(self._holder.loss_fn, "elbo", None))) from e
        finally:
            _tracing.on = False
            self._restore(before)
        trained = [
            name
            for name, value in vars(graph).items()
            if isinstance(value, torch.Tensor) and value.requires_grad
        ]
        if trained:
            raise CaptureError(
                f"the loss reads {len(trained)} tensor(s) with gradients that are neither "
                "parameters of the pair's modules nor pyro.param sites; register them in a "
                "module or with pyro.param"
            )
        # On fake tensors a value read back (.item(), float(t)) traces as a symbol instead of
        # failing; replaying it would freeze that value, so such a loss is refused.
        reads = [
            n for n in graph.graph.nodes if n.target is torch.ops.aten._local_scalar_dense.default
        ]
        if reads:
            raise CaptureError(
                _no_twin(getattr(self._holder.loss_fn, "elbo", None))
                or f"the loss reads {len(reads)} value(s) back from the device (.item() or a "
                "Python number made from a tensor), e.g. Pyro's stock ELBOs; use "
                "pyrovae.capture.no_sync(loss)"
            )
        return graph

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        # Pyro may rebind a module's parameters while it runs (pyro.module); put back any
        # parameter or buffer object the trace replaced.
        for name, value in state.items():
            path, _, leaf = name.rpartition(".")
            module = self._holder.get_submodule(path)
            slots = module._parameters if leaf in module._parameters else module._buffers
            if slots.get(leaf) is not value:
                slots[leaf] = value

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        _check_tensors(batch)
        key = tuple((t.shape, t.dtype, t.device) for t in batch)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._trace(batch)
        return graph(list(self._state().values()), *batch)


def capture(
    loss_fn: Callable,
    modules: Sequence[nn.Module],
    batch: Sequence[torch.Tensor],
    check: bool = True,
    free: dict | None = None,
) -> CapturedLoss:
    """Record ``loss_fn(*batch)`` (e.g. an ``ELBOModule``) as a replayable graph.

    :param loss_fn: the loss of a model/guide pair, called as ``loss_fn(*batch)``.
    :param modules: the modules whose parameters and buffers the loss reads; anything else it
        reads must not be a tensor that changes between steps.
    :param batch: an example batch.
    :param bool check: replay once and compare with the eager loss under the same random state.
    :param dict free: plain ``pyro.param`` sites the loss reads, ``{name: (unconstrained
        tensor, constraint)}``; they become graph inputs like the modules' parameters.
    :raises CaptureError: if the pair cannot be replayed safely.
    """
    if not modules and not free:
        raise CaptureError("the pair has no parameters to capture")
    _check_tensors(batch)
    captured = CapturedLoss(_Holder(modules, loss_fn, free), {})
    devices = sorted({t.device.index or 0 for t in batch if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # capturing leaves the generators as they were
        captured(*batch)  # traces
    if check:
        # with gradients enabled: some ELBOs (TraceEnum_ELBO) refuse a loss without them
        with torch.random.fork_rng(devices=devices):
            seed = int(torch.randint(0, 2**31 - 1, ()))
            torch.manual_seed(seed)
            replayed = captured(*batch).detach()
            torch.manual_seed(seed)
            with pyro.validation_enabled(False):
                eager = loss_fn(*batch).detach()
        a, b = float(replayed), float(eager)
        if not (
            math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) or (math.isnan(a) and math.isnan(b))
        ):
            raise CaptureError(f"the replayed loss {a:.6g} differs from the eager loss {b:.6g}")
    return captured


class CudaGraphStep:
    """One whole training step recorded as a CUDA graph and replayed.

    Records, for a fixed batch size: gathering the batch from the device-resident ``tensors`` at
    the indices in :attr:`index`, the optional ``transform``, the replayed loss, backward, the
    optimizer step (which must be ``capturable``), and the accumulation of the loss and of the
    first non-finite step into device tensors. Three eager warm-up steps on a side stream come
    first, as CUDA graph capture requires; they are real training steps.

    :param loss: a :class:`CapturedLoss` (or any capturable loss callable).
    :param optimizer: a torch optimizer built with ``capturable=True``.
    :param tensors: the training tensors, on the GPU.
    :param int batch_size: the batch size recorded.
    :param transform: optional per-batch transform (it must be capturable).
    """

    def __init__(self, loss, optimizer, tensors, batch_size: int, transform=None):
        device = tensors[0].device
        self.optimizer = optimizer
        self.index = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.total = torch.zeros((), device=device)  # sum of losses since reset()
        self.step = torch.zeros((), dtype=torch.long, device=device)  # steps since reset()
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._loss = loss
        self._tensors, self._transform = tensors, transform
        self._graph = None
        self.failed = False  # recording the graph failed: callers go on without it

    @property
    def ready(self) -> bool:
        """Whether the graph has been recorded (after :meth:`warm_up`)."""
        return self._graph is not None

    def _body(self):
        batch = tuple(t.index_select(0, self.index) for t in self._tensors)
        if self._transform is not None:
            batch = tuple(self._transform(batch))
        loss = self._loss(*batch)
        loss.backward()
        self.optimizer.step()
        finite = torch.isfinite(loss)
        self.bad_step.copy_(torch.where(~finite & (self.bad_step < 0), self.step, self.bad_step))
        self.total.add_(loss.detach())
        self.step.add_(1)

    def warm_up(self, indices: Sequence[torch.Tensor], record: bool = True) -> None:
        """Run eager steps on a side stream (one per index tensor given), then record."""
        gc.collect()  # an earlier step's autograd graph must not survive into these
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for idx in indices:
                self.index.copy_(idx)
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        if not record:
            return
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step.clone()
        generator = torch.cuda.default_generators[self.index.device.index or 0]
        rng = generator.clone_state()  # a failed recording leaves the generator mid-capture
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as e:
            self.failed = True
            generator.graphsafe_set_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            self.step.copy_(step)  # recording ran nothing, but it counted
            raise CaptureError(f"CUDA graph capture failed: {e}") from e
        self.step.copy_(step)
        self._graph = graph

    def __call__(self, idx: torch.Tensor) -> None:
        """One training step on the datapoints at ``idx`` (of the recorded batch size)."""
        self.index.copy_(idx)
        self._graph.replay()

    def reset(self) -> None:
        """Zero the accumulated loss and step counters (at the start of an epoch)."""
        self.total.zero_()
        self.step.zero_()
        self.bad_step.fill_(-1)
