"""Schedules: KL warm-up and β-VAE epoch by epoch (:class:`KLSchedule`), and values that change
every step (:class:`Ramp`, fed to the pair as keyword arguments by ``fit(step_kwargs=...)``).

A :class:`KLSchedule` is a :func:`pyrovae.fit` callback: it sets ``model.beta`` before the first
epoch and, after each epoch, for the next one. pyrovae's models scale the latent sites of model
and guide together by ``beta`` (``poutine.scale``), so the training objective is

    E_q[log p(x|z)] − β_e · E_q[log q(z|x) − log p(z)],   β_e = β · min(1, e / N)

for epoch e = 1, 2, … and N warm-up epochs (β_e rises linearly from β/N in the first epoch to β
at epoch N, and stays there; N = 0 means no warm-up). This is the schedule of the VampPrior
paper's code [1] (there with β = 1, N = 100); a constant β ≠ 1 is the β-VAE [2]. β_e is never 0
(``poutine.scale`` needs a positive scale, and β = 0 would leave q(z|x) unconstrained).

References:
  [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018; C. K. Sønderby et al.,
      "Ladder Variational Autoencoders", NeurIPS 2016 (warm-up).
  [2] I. Higgins et al., "β-VAE: Learning Basic Visual Concepts with a Constrained Variational
      Framework", ICLR 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KLSchedule", "Clock", "Schedule", "Ramp"]


class KLSchedule:
    """Sets ``target.beta`` to β · min(1, e / warmup) for each epoch e (1-based).

    Pass it as ``fit(..., callback=schedule)`` (or call it from your own callback): it returns
    ``False``, so it never stops training.

    :param target: the model, anything with a settable ``beta`` (e.g. :class:`~pyrovae.VAE`).
    :param int warmup: N, the number of warm-up epochs (0: β from the start).
    :param float beta: the final weight β > 0 (1: the ELBO).
    :raises ValueError: for a negative warm-up or a non-positive β.
    """

    def __init__(self, target, warmup: int = 0, beta: float = 1.0):
        if isinstance(warmup, bool) or int(warmup) != warmup or int(warmup) < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0, got {warmup}")
        if not (float(beta) > 0 and math.isfinite(float(beta))):
            raise ValueError(f"beta (the KL weight) must be a finite number > 0, got {beta}")
        self.target, self.warmup, self.beta = target, int(warmup), float(beta)
        self.set_epoch(1)

    def value(self, epoch: int) -> float:
        """β for (1-based) ``epoch``."""
        if self.warmup == 0 or epoch >= self.warmup:
            return self.beta
        return self.beta * max(int(epoch), 1) / self.warmup

    def set_epoch(self, epoch: int) -> None:
        """Set the target's β for ``epoch``."""
        self.target.beta = self.value(epoch)

    def __call__(self, record: dict) -> bool:
        """After epoch ``record["epoch"]``: set β for the next epoch; add ``record["beta"]``,
        the β the finished epoch trained with."""
        record["beta"] = self.value(record["epoch"])
        self.set_epoch(record["epoch"] + 1)
        return False


@dataclass(frozen=True)
class Clock:
    """Where a step stands in training, as both engines tell a step schedule.

    The same on every rank, and a function of the run's saved epoch: a resumed run feeds the
    same values as an uninterrupted one.
    """

    epoch: int  # epochs completed before this step (0 in the first epoch)
    step: int  # steps completed in this epoch (0 for its first step)
    steps: int | None  # steps per epoch (None: a stream of unknown length)


class Schedule:
    """A value for every training step, a function of the step's :class:`Clock`: what
    ``fit(step_kwargs=...)`` evaluates before each step (anything else there, a function
    included, is passed as it is). Subclass it and define ``__call__`` (as :class:`Ramp`
    does), or wrap a function::

        step_kwargs={"annealing_factor": Schedule(lambda clock: 0.5 if clock.epoch < 3 else 1.0)}

    :param fn: ``fn(clock) -> float``.
    """

    def __init__(self, fn):
        if not callable(fn):
            raise ValueError(f"Schedule wraps a function of the step's Clock, got {fn!r}")
        self.fn = fn

    def __call__(self, clock: Clock) -> float:
        """The value at ``clock``'s step."""
        return self.fn(clock)

    def __repr__(self) -> str:
        return f"Schedule({getattr(self.fn, '__name__', self.fn)!r})"


class Ramp(Schedule):
    """A value rising (or falling) linearly from ``start`` to ``end`` over the first ``epochs``
    epochs, step by step, then held: Pyro's DMM example's KL annealing [1]. At step ``s``
    (0-based) of epoch ``e`` (0-based) with ``N`` steps per epoch,

        value = start + (end − start) · min(1, (e·N + s + 1) / (epochs · N)),

    exactly the example's ``annealing_factor`` (with ``start`` its
    ``--minimum-annealing-factor``, ``end`` 1). On a stream of unknown length it moves once per
    epoch, ``(e + 1) / epochs``. Use it as ``fit(..., step_kwargs={"annealing_factor": Ramp(0.2,
    1.0, epochs=100)})``.

    :param float start: the value at the first step.
    :param float end: the value from step ``epochs · N`` on.
    :param int epochs: the epochs the ramp takes (0: ``end`` from the start).
    :raises ValueError: for a non-finite value or a negative number of epochs.

    References:
      [1] R. G. Krishnan, U. Shalit, D. Sontag, "Structured Inference Networks for Nonlinear
          State Space Models", AAAI 2017; pyro/examples/dmm.py.
    """

    def __init__(self, start: float, end: float = 1.0, epochs: int = 1):
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not math.isfinite(float(v)):
                raise ValueError(f"Ramp's {name} must be a finite number, got {v!r}")
        if isinstance(epochs, bool) or int(epochs) != epochs or int(epochs) < 0:
            raise ValueError(f"Ramp's epochs must be a whole number >= 0, got {epochs!r}")
        self.start, self.end, self.epochs = float(start), float(end), int(epochs)

    def __call__(self, clock: Clock) -> float:
        """The value at ``clock``'s step."""
        if self.epochs == 0:
            return self.end
        if clock.steps is None:
            done = (clock.epoch + 1) / self.epochs
        else:
            done = (clock.epoch * clock.steps + clock.step + 1) / (self.epochs * clock.steps)
        return self.start + (self.end - self.start) * min(1.0, done)

    def __repr__(self) -> str:
        return f"Ramp({self.start:g}, {self.end:g}, epochs={self.epochs})"
