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

The no-sync losses live in :mod:`pyrovae.nosync` (re-exported here, where the fast path's
users look for them); on CUDA, :class:`pyrovae.graphs.CudaGraphStep` goes further and records
the whole training step as one CUDA graph.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.infer import ELBO
from torch import nn

from .errors import CaptureError
from .nosync import (
    NO_SYNC,
    NoSync,
    NoSyncTrace_ELBO,
    NoSyncTrace_MMD,
    NoSyncTraceEnum_ELBO,
    NoSyncTraceGraph_ELBO,
    NoSyncTraceMeanField_ELBO,
    NoSyncTraceTMC_ELBO,
    no_sync,
    tracing,
)

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
    "CaptureError",
    "CapturedLoss",
    "capture",
    "recording_modules",
]


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
        tracing.on = True
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
            tracing.on = False
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
