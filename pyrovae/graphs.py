"""Recording a training step as a CUDA graph: PyTorch's whole-network capture recipe, written
once for :class:`pyrovae.capture.CudaGraphStep` (``fit``'s step) and the bench's hand-written
ceiling (:class:`pyrovae.bench.HandwrittenGraph`).

Capture needs a few eager steps on a side stream first (the allocator and cuBLAS warm up),
every gradient set to ``None`` and no autograd graph of an earlier step alive; a failed
recording leaves the CUDA generator mid-capture, so its state is restored.

References:
  [1] PyTorch, "CUDA Graphs", torch.cuda documentation (whole-network capture).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable

import torch

__all__ = ["warm_up", "record"]


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


def record(body: Callable[[], None], optimizer, device: torch.device) -> torch.cuda.CUDAGraph:
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
