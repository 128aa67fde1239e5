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
``Trace_ELBO``) cannot be traced, and :func:`capture` raises :class:`CaptureError` saying why;
so does a pair whose parameters live outside the modules it is bound to (plain ``pyro.param``
sites). :func:`pyrovae.fit` then trains eagerly.

On CUDA, :class:`CudaGraphStep` goes further and records the whole training step — batch
gather, replayed loss, backward, optimizer step, loss accumulation — as one CUDA graph
(the recipe of PyTorch's "whole network capture").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from torch import nn

__all__ = ["NoSyncTrace_ELBO", "CaptureError", "CapturedLoss", "capture", "CudaGraphStep"]


class NoSyncTrace_ELBO(Trace_ELBO):
    """Pyro's :class:`~pyro.infer.Trace_ELBO` computed without reading values back to the host.

    ``Trace_ELBO`` sums each site's log-density into a Python float (``torch_item``, one host
    sync per site), checks the loss for NaN and returns ``loss + (surrogate − surrogate.item())``.
    This keeps every term a tensor and returns ``loss + (surrogate − surrogate.detach())``: the
    same value and the same gradient estimator (score-function terms included), with nothing
    read back. :func:`pyrovae.fit` checks the loss for NaN itself, once per epoch on CUDA.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # Trace_ELBO's estimator with tensors where it uses torch_item.
        elbo, surrogate, log_r = 0.0, 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"].detach()
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"].detach()
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    surrogate = (
                        surrogate
                        + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
                    )
        return -elbo, -surrogate

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_p, surrogate_p = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        return loss + (surrogate - surrogate.detach())


class CaptureError(RuntimeError):
    """The pair's loss cannot be captured and replayed safely; the message says why."""


class _Holder(nn.Module):
    # Gathers the modules a pair is bound to, so their parameters and buffers can be swapped for
    # graph inputs by torch.func.functional_call while the loss runs.
    def __init__(self, modules: Sequence[nn.Module], loss_fn: Callable):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, *batch):
        return self.loss_fn(*batch)


def _explain(e: Exception) -> str:
    # Why a fake-tensor trace failed, in terms of the user's model and guide.
    name, text = type(e).__name__, (str(e).strip().splitlines() or [""])[0][:200]
    if "DataDependent" in name or "data-dependent" in text:
        return (
            "the model or guide reads a tensor's value in Python (data-dependent control flow, "
            f".item(), float(t), or a validation check) [{name}]"
        )
    if "convert all Tensors to FakeTensors" in text:
        return (
            "the model or guide uses a tensor that is neither an argument nor a parameter or "
            "buffer of its modules (e.g. a plain pyro.param, or a tensor held elsewhere)"
        )
    return f"{name}: {text}"


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
        try:
            with pyro.validation_enabled(False), pyro.get_param_store().scope():
                graph = make_fx(loss, tracing_mode="fake")(list(before.values()), *batch)
        except Exception as e:  # any failure to trace means: do not replay this pair
            raise CaptureError(_explain(e)) from e
        finally:
            self._restore(before)
        # On fake tensors a value read back (.item(), float(t)) traces as a symbol instead of
        # failing; replaying it would freeze that value, so such a loss is refused.
        reads = [
            n for n in graph.graph.nodes if n.target is torch.ops.aten._local_scalar_dense.default
        ]
        if reads:
            raise CaptureError(
                f"the loss reads {len(reads)} value(s) back from the device (.item() or a Python "
                "number made from a tensor), e.g. Pyro's stock Trace_ELBO; use "
                "pyrovae.capture.NoSyncTrace_ELBO"
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
) -> CapturedLoss:
    """Record ``loss_fn(*batch)`` (e.g. an ``ELBOModule``) as a replayable graph.

    :param loss_fn: the loss of a model/guide pair, called as ``loss_fn(*batch)``.
    :param modules: the modules whose parameters and buffers the loss reads; anything else it
        reads must not be a tensor that changes between steps.
    :param batch: an example batch.
    :param bool check: replay once and compare with the eager loss under the same random state.
    :raises CaptureError: if the pair cannot be replayed safely.
    """
    if not modules:
        raise CaptureError("the pair is bound to no torch module")
    captured = CapturedLoss(_Holder(modules, loss_fn), {})
    devices = sorted({t.device.index or 0 for t in batch if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # capturing leaves the generators as they were
        captured(*batch)  # traces
    if check:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            seed = int(torch.randint(0, 2**31 - 1, ()))
            torch.manual_seed(seed)
            replayed = captured(*batch)
            torch.manual_seed(seed)
            with pyro.validation_enabled(False):
                eager = loss_fn(*batch)
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
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as e:
            self.failed = True
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
