"""The errors pyrovae raises. All are :class:`ValueError` s, so one ``except ValueError`` catches
every bad-input error, and each message names the problem."""

from __future__ import annotations

__all__ = ["DataError", "CheckpointError", "RunInUseError", "WriteError", "NonFiniteLossError"]


class DataError(ValueError):
    """Data that cannot be found, read or used: a missing folder or file, an empty dataset,
    non-finite values."""


class CheckpointError(ValueError):
    """A run directory or checkpoint that is missing, corrupt, inconsistent, or not a safe weights
    file."""


class RunInUseError(CheckpointError):
    """A run directory that another live process is writing (it holds the directory's lock)."""


class WriteError(CheckpointError):
    """A file of a run directory that could not be written (disk full, no permission, ...); the
    file it would have replaced is left as it was."""


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
