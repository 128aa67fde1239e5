"""Training steps recorded as CUDA graphs: PyTorch's whole-network capture recipe
(:func:`warm_up`, :func:`record_graph`), written once for :class:`CudaGraphStep` (``fit``'s step on
CUDA) and the bench's hand-written ceiling (:class:`pyrovae.bench.HandwrittenGraph`).

Capture needs a few eager steps on a side stream first (the allocator and cuBLAS warm up),
every gradient set to ``None`` and no autograd graph of an earlier step alive; a failed
recording leaves the CUDA generator mid-capture, so its state is restored.

References:
  [1] PyTorch, "CUDA Graphs", torch.cuda documentation (whole-network capture).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence

import torch

from .errors import CaptureError

__all__ = ["warm_up", "record_graph", "CudaGraphStep"]


def warm_up(steps: Iterable[Callable[[], None]], body: Callable[[], None], optimizer) -> None:
    """Run eager training steps on a side stream: for each of ``steps`` (which sets the step's
    inputs, e.g. copies a batch's indices into place), zero the gradients and run ``body``.

    :param steps: one callable per step, run before ``body``.
    :param body: the step to record later (loss, backward, optimizer step, sums).
    :param optimizer: the step's optimizer (built ``capturable``).
    """
    gc.collect()  # an earlier step's autograd graph must not survive into these
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for set_inputs in steps:
            set_inputs()
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)


def record_graph(body: Callable[[], None], optimizer, device: torch.device) -> torch.cuda.CUDAGraph:
    """Record ``body`` as a CUDA graph (after :func:`warm_up`), gradients set to ``None``.

    :raises RuntimeError: if capture fails; the CUDA generator and the gradients are as before.
    """
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    generator = torch.cuda.default_generators[device.index or 0]
    rng = generator.clone_state()  # a failed recording leaves the generator mid-capture
    try:
        with torch.cuda.graph(graph):
            body()
    except RuntimeError:
        generator.graphsafe_set_state(rng)
        optimizer.zero_grad(set_to_none=True)
        raise
    return graph


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
        warm_up([lambda idx=idx: self.index.copy_(idx) for idx in indices], self._body,
                self.optimizer)  # fmt: skip
        if not record:
            return
        step = self.step.clone()
        try:
            graph = record_graph(self._body, self.optimizer, self.index.device)
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
