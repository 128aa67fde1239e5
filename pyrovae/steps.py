"""The step engines of :func:`pyrovae.fit`: how each optimizer step of an epoch runs.

All three take the same calls from fit's epoch loop (:class:`StepEngine`): ``start_epoch()``,
then ``step(i, items)`` for each step of the epoch (``items``: one index tensor or streamed
batch per objective), then ``end_epoch()``. A step computes the weighted loss of its batches,
tells the :class:`~pyrovae.nonfinite.NonFiniteGuard`, updates the parameters and adds its losses
to the objectives' sums for the epoch's ELBO.

- :class:`Eager` runs each ``ELBOModule`` (Pyro's handlers, traces and all) on every step.
- :class:`Captured` replays each objective's captured loss (:func:`pyrovae.capture.capture`),
  and runs the eager loss for a batch the capture cannot take (another shape).
- :class:`CudaGraph` replays the whole step as a CUDA graph
  (:class:`~pyrovae.graphs.CudaGraphStep`) for full batches, and steps as :class:`Captured`
  for the rest (the first step, a last partial batch, or all of them if recording failed).

:func:`build` chooses one after the first (eager) step has found the parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from .errors import CaptureError
from .graphs import CudaGraphStep
from .nonfinite import NonFiniteGuard
from .pair import capture_terms

__all__ = [
    "StepEngine",
    "Eager",
    "Captured",
    "CudaGraph",
    "build",
    "make_optimizer",
    "replay",
]

log = logging.getLogger("pyrovae")


class StepEngine(Protocol):
    """What fit's epoch loop calls. ``step`` and ``end_epoch`` return how many steps finished
    (for the progress bar: a CUDA graph's warm-up runs three queued steps at once)."""

    name: str
    optimizer: torch.optim.Optimizer

    def start_epoch(self) -> None: ...

    def step(self, step: int, items: list) -> int: ...

    def end_epoch(self) -> int: ...

    def running_elbo(self) -> float | None: ...


def replay(step_loss: Callable, elbo_module: Callable, batch) -> torch.Tensor:
    """The loss of ``batch``: replayed by ``step_loss`` (a captured loss), or computed by
    ``elbo_module`` when ``step_loss`` is ``elbo_module`` or the capture cannot take the batch.

    :param step_loss: the captured loss, or ``elbo_module`` itself.
    :param elbo_module: the eager loss, ``loss(model, guide)``.
    :param batch: a tuple of tensors.
    """
    if step_loss is elbo_module:
        return elbo_module(*batch)
    try:
        return step_loss(*batch)
    except CaptureError as e:
        log.info("pyrovae: an eager step for a batch of another shape: %s", e)
        return elbo_module(*batch)


class Eager:
    """Pyro's ``ELBOModule`` of each objective on every step, then backward and the update.

    :param terms: the objectives at run time (``batch``, ``weight``, ``train_loss``, and the
        running sums ``total``/``seen``).
    :param optimizer: the torch optimizer over every trained parameter.
    :param NonFiniteGuard guard: told every step's loss.
    """

    name = "eager"

    def __init__(self, terms: list, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard):
        self.terms, self.optimizer, self.guard = terms, optimizer, guard

    def start_epoch(self) -> None:
        pass

    def losses(self, batches: list) -> list[torch.Tensor]:
        return [t.train_loss(*b) for t, b in zip(self.terms, batches, strict=True)]

    def step(self, step: int, items: list) -> int:
        batches = [t.batch(i) for t, i in zip(self.terms, items, strict=True)]
        return self.update(step, batches, self.losses(batches))

    def update(self, step: int, batches: list, losses: list, backward: bool = True) -> int:
        """Step on Σ weight × loss (``backward=False``: its gradients are in place already).
        Runs in a frame of its own, so no loss, and with it the step's autograd graph, outlives
        the step (CUDA graph capture needs that)."""
        loss = sum(t.weight * v for t, v in zip(self.terms, losses, strict=True))
        if not self.guard.finite(step, loss):
            return 0
        if backward:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        for t, v, b in zip(self.terms, losses, batches, strict=True):
            t.add(v, len(b[0]))  # () on the device: no host read
        return 1

    def end_epoch(self) -> int:
        return 0

    def running_elbo(self) -> float | None:
        """The epoch's train ELBO per datapoint so far (a host read, for the progress bar)."""
        t = self.terms[0]
        return -float(t.total) / t.seen if t.seen else None


class Captured(Eager):
    """Each objective's captured loss replayed (:func:`replay`); an objective whose loss could
    not be captured runs eagerly."""

    name = "captured"

    def losses(self, batches: list) -> list[torch.Tensor]:
        pairs = zip(self.terms, batches, strict=True)
        return [replay(t.step_loss, t.train_loss, b) for t, b in pairs]


class CudaGraph(Captured):
    """One objective on device-resident data, every full batch's step replayed as a CUDA graph.

    Recording takes three eager warm-up steps (real training steps, queued, then run at once);
    an epoch too short to record runs its queued steps eagerly. The graph keeps its own sums and
    first bad step on the device, which join the epoch's in :meth:`end_epoch`.

    :param graph: the :class:`~pyrovae.graphs.CudaGraphStep` (optimizer built capturable).
    """

    name = "cuda-graph"

    def __init__(self, terms: list, optimizer, guard: NonFiniteGuard, graph: CudaGraphStep):
        super().__init__(terms, optimizer, guard)
        self.graph = graph
        self.queued: list[torch.Tensor] = []  # batches waiting for the graph's warm-up

    def start_epoch(self) -> None:
        self.graph.reset()

    def step(self, step: int, items: list) -> int:
        g, idx = self.graph, items[0]
        if g.failed or len(idx) != g.index.numel():
            return super().step(step, items)
        if g.ready:
            g(idx)
            return 1
        self.queued.append(idx)
        if len(self.queued) < 3:
            return 0
        try:
            g.warm_up(self.queued)
        except CaptureError as e:
            log.warning("pyrovae.fit: no CUDA graph, replaying eagerly: %s", e)
        return self._flush()

    def update(self, step: int, batches: list, losses: list, backward: bool = True) -> int:
        done = super().update(step, batches, losses, backward)
        self.graph.step.fill_(step + 1)  # the graph numbers its steps like the epoch's
        return done

    def _flush(self) -> int:
        done, self.queued = len(self.queued), []
        return done

    def end_epoch(self) -> int:
        g, t, done = self.graph, self.terms[0], 0
        if self.queued:
            g.warm_up(self.queued, record=False)
            done = self._flush()
        t.total = t.total + g.total
        t.seen = t.n
        self.guard.merge(g.bad_step)
        return done

    def running_elbo(self) -> float | None:
        t, g = self.terms[0], self.graph
        if not g.ready:
            return super().running_elbo()
        steps = int(g.step)  # every step of the epoch, replayed or not
        return -float(t.total + g.total) / (steps * t.batch_size) if steps else None


def make_optimizer(params, lr: float, optimizer=None, optim_args: dict | None = None,
                   capturable: bool = False) -> tuple[torch.optim.Optimizer, bool]:  # fmt: skip
    """The torch optimizer of both engines: a fused Adam by default where this torch has one for
    the device; ``capturable`` (for a CUDA graph) where the class takes it.

    :returns: ``(optimizer, whether it was built capturable)``.
    :raises ValueError: if the class does not take these arguments.
    """
    if optimizer is None:
        optimizer, args = torch.optim.Adam, {"fused": True}
    else:
        args = {}
    args = {"lr": lr, **args, **(optim_args or {})}
    tries = [{**args, "capturable": True}] if capturable else []
    tries += [args, {k: v for k, v in args.items() if k != "fused"}]
    for kwargs in tries:
        try:
            return optimizer(params, **kwargs), kwargs.get("capturable", False)
        except (RuntimeError, ValueError, TypeError) as e:
            error = e
    raise ValueError(f"cannot build the optimizer {optimizer!r} with {args}: {error}")


def build(terms: list, batches: list, modules, free: dict, *, fast: bool, device: torch.device,
          optimizer: Callable[[bool], tuple], guard: NonFiniteGuard) -> StepEngine:  # fmt: skip
    """The engine for a run, after its first eager step: :class:`CudaGraph` for one captured
    objective on device-resident CUDA data (when the optimizer can be built capturable),
    :class:`Captured` when a loss could be captured, else :class:`Eager`.

    :param batches: the first step's batches (the capture records on them).
    :param modules: the modules holding the pair's parameters.
    :param dict free: ``pyro.param`` sites outside every module (graph inputs of the capture).
    :param bool fast: try to capture the losses.
    :param optimizer: builds the optimizer: ``optimizer(capturable) -> (optimizer, capturable)``.
    """
    say = lambda reason: log.warning("pyrovae.fit: %s", reason)  # noqa: E731
    captured = capture_terms(terms, modules, batches, free, say) if fast else [False]
    graph = all(captured) and device.type == "cuda" and len(terms) == 1
    graph = graph and terms[0].stream is None and terms[0].full is None
    if graph and terms[0].keywords is not None and terms[0].keywords.scheduled:
        log.info("pyrovae.fit: no CUDA graph: step_kwargs schedules change every step "
                 "(the captured loss is replayed with each step's values)")  # fmt: skip
        graph = False
    opt, capturable = optimizer(graph)
    if graph and capturable:
        t = terms[0]
        step = CudaGraphStep(t.step_loss, opt, t.tensors, t.batch_size, t.transform)
        return CudaGraph(terms, opt, guard, step)
    return (Captured if any(captured) else Eager)(terms, opt, guard)
