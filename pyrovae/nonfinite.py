"""NaN and Inf in training: found without slowing the steps down, and undone.

:class:`NonFiniteGuard` is told every step's loss. On the CPU a bad loss stops the epoch at once,
before the update; on CUDA (and under Lightning) the first bad step is remembered on the device
(no host read per step) and read once when the epoch ends. A bad epoch restores the parameters
to the end of the last good one and raises :class:`~pyrovae.errors.NonFiniteLossError`, naming
the epoch and step.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteLossError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """The first non-finite step of the epoch, and the parameters at the end of the last good
    epoch.

    :param torch.device device: the training device.
    :param bool deferred: keep the first bad step on the device and never stop mid-epoch, as
        on CUDA (always so there), e.g. under DDP, where one rank cannot stop alone.
    """

    def __init__(self, device: torch.device, deferred: bool = False):
        self.device = device
        self.deferred = deferred or device.type == "cuda"
        self.params: list[torch.Tensor] = []
        self.good: list[torch.Tensor] = []  # copies of params at the end of the last good epoch
        self.start_epoch()

    def keep(self, params: list[torch.Tensor]) -> None:
        """Guard these parameters, from their values now."""
        self.params = list(params)
        self.good = [p.detach().clone() for p in self.params]

    def start_epoch(self) -> None:
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # () on device
        self.stopped = False  # a bad loss on the CPU: the epoch stops now

    def finite(self, step: int, loss: torch.Tensor) -> bool:
        """Whether to take the update of step ``step`` (0-based) with ``loss``. On CUDA always
        (the check stays on the device; the parameters are restored at the epoch's end), and
        when deferred."""
        finite = torch.isfinite(loss)
        if self.deferred:
            self.bad_step = torch.where(~finite & (self.bad_step < 0), step, self.bad_step)
            return True
        if not bool(finite):
            self.bad_step.fill_(step)
            self.stopped = True
            return False
        return True

    def merge(self, bad_step: torch.Tensor) -> None:
        """Join another counter's first bad step (a CUDA graph's, numbered like the epoch's)."""
        first = (bad_step >= 0) & ((self.bad_step < 0) | (bad_step < self.bad_step))
        self.bad_step = torch.where(first, bad_step, self.bad_step)

    def end_epoch(self, epoch: int, train_elbo: float, last_step: int, history=None) -> None:
        """Check the epoch (the one host read): keep the parameters as the good ones, or, if a
        step or the epoch's summed ELBO was not finite, restore them and raise.

        :param int epoch: the epoch (1-based).
        :param float train_elbo: the epoch's train ELBO (an overflowed sum is caught here).
        :param int last_step: the epoch's last step (0-based), blamed for an overflowed sum.
        :param history: the run's :class:`~pyrovae.training.History`, attached to the error.
        :raises NonFiniteLossError: after restoring the parameters.
        """
        if not math.isfinite(train_elbo) and int(self.bad_step) < 0:
            self.bad_step.fill_(last_step)
        bad = int(self.bad_step)
        if bad < 0:
            with torch.no_grad():
                for p, g in zip(self.params, self.good, strict=True):
                    g.copy_(p)
            return
        with torch.no_grad():
            for p, g in zip(self.params, self.good, strict=True):
                p.copy_(g)
        restored = f"the end of epoch {epoch - 1}" if epoch > 1 else "their initial values"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {bad + 1}; parameters were restored to "
            f"{restored}",
            epoch=epoch,
            step=bad + 1,
            history=history,
        )
