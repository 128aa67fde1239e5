"""Where :func:`pyrovae.fit` takes its batches from: data kept on the training device and
indexed (the fast default for data that fit in memory), or a stream of batches from a
:class:`torch.utils.data.DataLoader` (data larger than memory, decoded by the loader's workers).

A DataLoader, or any iterable of batches, is streamed as it is. A map-style ``Dataset`` without
``tensors`` is streamed when ``stream=True``, or by default when its size (estimated from its
first item) exceeds :data:`STREAM_BYTES`; otherwise it is collated once into tensors. The time
the training loop waits for the stream is measured, so the loader is shown not to be the
bottleneck (the ``data_seconds`` of each epoch's record).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from .data import check_tuple
from .errors import DataError

__all__ = ["STREAM_BYTES", "should_stream", "validation_streams", "Stream"]

#: Map-style datasets larger than this (bytes, estimated) are streamed unless told otherwise.
STREAM_BYTES = 2 * 2**30


def _item_bytes(item) -> int:
    items = item if isinstance(item, (tuple, list)) else (item,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


def should_stream(data, stream: bool | None) -> bool:
    """Whether ``data`` is streamed rather than collated into device-resident tensors.

    :param data: what was passed to :func:`pyrovae.fit`.
    :param stream: ``True``/``False`` to force; ``None`` to decide by kind and size.
    :raises DataError: if ``stream=False`` is asked of a DataLoader or another iterable.
    """
    if isinstance(data, torch.Tensor) or hasattr(data, "tensors"):
        return bool(stream)
    check_tuple(data, "the training data")
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return bool(stream)
    is_map = isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__")
    if not is_map and isinstance(data, Iterable):  # a DataLoader or a generator of batches
        if stream is False:
            raise DataError("a DataLoader or iterable of batches can only be streamed")
        return True
    if stream is not None or not is_map:
        return bool(stream)
    try:
        return len(data) * _item_bytes(data[0]) > STREAM_BYTES
    except (TypeError, IndexError):
        return False


def validation_streams(val_data, stream: bool | None) -> bool:
    """Whether validation data are streamed: tensors already in memory never are (a run
    whose training images stream scores its validation tensors in place); other data as
    :func:`should_stream` decides with the training data's ``stream``."""
    in_memory = isinstance(val_data, torch.Tensor) or (
        isinstance(val_data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in val_data)
    )
    return False if in_memory else should_stream(val_data, stream)


def _as_batch(batch, what: str) -> tuple[torch.Tensor, ...]:
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        kinds = [type(t).__name__ for t in items]
        raise DataError(
            f"{what}: a streamed batch must be a tensor or a tuple of tensors, got {kinds}; "
            "give the Dataset a transform that returns tensors (e.g. torchvision's ToImage)"
        )
    return items


class Stream:
    """Batches from a DataLoader (or any iterable of batches), moved to the training device.

    :param data: a DataLoader, an iterable of batches, or a map-style Dataset (then wrapped in
        a shuffling DataLoader of ``batch_size`` with ``num_workers`` worker processes).
    :param int batch_size: batch size for a Dataset.
    :param int num_workers: DataLoader workers for a Dataset (decoding in parallel).
    :param device: the training device.
    :param str what: the data's name in error messages.
    """

    def __init__(self, data, batch_size: int, num_workers: int, device, what: str):
        if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__getitem__"):
            data = torch.utils.data.DataLoader(
                data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                pin_memory=torch.device(device).type == "cuda",
            )  # fmt: skip
        self.loader, self.device, self.what = data, torch.device(device), what
        try:
            self.steps: int | None = len(data)
        except TypeError:
            self.steps = None  # an iterable without a length: an epoch is one pass
        self.wait = 0.0  # seconds spent waiting for batches this epoch
        self._it = None

    def start_epoch(self) -> None:
        self._it, self.wait = iter(self.loader), 0.0

    def next(self, cycle: bool = True) -> tuple[torch.Tensor, ...] | None:
        """The next batch on the device; at the end of a pass, a new pass if ``cycle`` (an
        objective with fewer batches than the longest one), else ``None``."""
        start = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            if not cycle:
                return None
            self._it = iter(self.loader)
            batch = next(self._it)
        items = _as_batch(batch, self.what)
        out = tuple(t.to(self.device, non_blocking=True) for t in items)
        self.wait += time.perf_counter() - start
        return out
