"""The errors pyrovae raises. The bad-input errors are :class:`ValueError` s, so one
``except ValueError`` catches every one, and each message names the problem;
:class:`CaptureError` (a loss the fast path cannot replay) is a :class:`RuntimeError`, caught
by ``fit``, which then trains eagerly."""

from __future__ import annotations

import numbers

__all__ = [
    "DataError",
    "CheckpointError",
    "RunInUseError",
    "UnverifiedRunError",
    "WriteError",
    "NonFiniteLossError",
    "CaptureError",
    "count",
]


class DataError(ValueError):
    """Data that cannot be found, read or used: a missing folder or file, an empty dataset,
    non-finite values."""


class CheckpointError(ValueError):
    """A run directory or checkpoint that is missing, corrupt, inconsistent, or not a safe weights
    file."""


class RunInUseError(CheckpointError):
    """A run directory that another live process is writing (it holds the directory's lock)."""


class UnverifiedRunError(CheckpointError):
    """A run directory without a manifest (a run of an older pyrovae, or one copied without its
    ``manifest.json``): its files cannot be checked, so it is not used until it is adopted
    deliberately (``pyrovae verify RUN --adopt``)."""


class WriteError(CheckpointError):
    """A file of a run directory that could not be written (disk full, no permission, ...); the
    file it would have replaced is left as it was."""


class CaptureError(RuntimeError):
    """The pair's loss cannot be captured and replayed safely; the message says why."""


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss.

    :ivar epoch: the epoch (1-based) in which it happened.
    :vartype epoch: int
    :ivar step: the step within that epoch (1-based).
    :vartype step: int
    :ivar history: the :class:`~pyrovae.training.History` of the epochs that finished.
    """

    def __init__(self, message: str, epoch: int, step: int, history=None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.history = history


def count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``, for arguments that count things (epochs,
    samples, batch sizes): a whole number is taken whatever its type (``3``, ``3.0``,
    ``numpy.int64(3)``, a 0-d integer tensor); anything else is a :class:`ValueError` naming
    ``name``, never a silent truncation (``2.5`` epochs is not 2).

    :param name: the argument's name, as the caller knows it (``"epochs"``, ``"--epochs"``).
    :param value: what was passed.
    :param minimum: the smallest value allowed.
    """
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # a 0-d tensor or array
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole and isinstance(value, float) and value.is_integer():
        value, whole = int(value), True
    if not whole:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
