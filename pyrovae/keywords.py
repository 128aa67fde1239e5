"""Keyword arguments fed to a pair on every training step: ``fit(..., step_kwargs=...)``.

Pyro's examples pass per-step arguments to model and guide as keywords of ``svi.step``: the
Deep Markov Model's ``annealing_factor``, which scales the KL terms and rises over the first
epochs, is ``svi.step(mini_batch, ..., annealing_factor=a)``. Both engines take the same
``step_kwargs`` dict, ``{name: value}``:

- a :class:`~pyrovae.schedules.Schedule` (e.g. :class:`~pyrovae.schedules.Ramp`), a function
  of the step's :class:`~pyrovae.schedules.Clock` returning a number, is evaluated before every
  step and passed as a 0-dim tensor on the batch's device (one tensor, refilled every step:
  a pair that keeps the value past its step copies it);
- anything else (a number, a tensor, a function such as Pyro's AIR's ``z_pres_prior_p``) is a
  constant, passed as it is on every step (a captured loss records what it computes as
  constants). Those tensors ride after the batch's own, so a captured loss
  takes them as graph inputs: it is recorded once and replayed with each step's values.

The clock is the run's epoch and the step within it, so a resumed run feeds exactly the values
an uninterrupted one would. Every name is checked against the model's and the guide's
signatures before the first step (:class:`StepKeywords`); validation and scoring call the pair
without them (its defaults: for ``annealing_factor``, 1, the unscaled ELBO).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from .schedules import Clock, Schedule

__all__ = ["StepKeywords", "Keyworded", "not_accepted"]


def not_accepted(fn: Callable, names) -> list[str]:
    """The ``names`` that ``fn`` takes no keyword argument for (none if it takes ``**kwargs``
    or has no signature to read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [n for n in names if n not in named]


def _name(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return name.rpartition("<locals>.")[2]  # Chain.model, or a local function's own name


def _number(value, name: str, clock: Clock) -> float:
    # A schedule's value as a finite float, or one line naming the schedule and the step.
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"step_kwargs[{name!r}] gave {value!r} at epoch {clock.epoch + 1}, step "
            f"{clock.step + 1}; a schedule must return a finite number"
        )
    return number


class StepKeywords:
    """The ``step_kwargs`` of a run: checked against the pair once, then evaluated every step.

    :param dict kwargs: ``{name: constant or Schedule}`` (see the module docstring).
    :param model: the pair's model, which must accept every name as a keyword.
    :param guide: the pair's guide, likewise (Pyro calls both with the same arguments).
    :raises ValueError: for a name that is not an identifier, one the model or guide does not
        take, or a schedule that does not give a finite number at the first step.
    """

    def __init__(self, kwargs: dict, model: Callable, guide: Callable):
        if not isinstance(kwargs, dict):
            raise ValueError(f"step_kwargs must be a dict {{name: value}}, got {kwargs!r}")
        for name in kwargs:
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(f"step_kwargs: {name!r} is not a keyword argument name")
        for role, fn in (("model", model), ("guide", guide)):
            missing = not_accepted(fn, kwargs)
            if missing:
                takes = ", ".join(inspect.signature(fn).parameters)
                raise ValueError(
                    f"step_kwargs: the {role} {_name(fn)} takes no keyword argument "
                    f"{missing[0]!r} (it takes {takes or 'nothing'}); pass only arguments that "
                    "both model and guide accept"
                )
        self.constants = {k: v for k, v in kwargs.items() if not isinstance(v, Schedule)}
        self.scheduled = {k: v for k, v in kwargs.items() if isinstance(v, Schedule)}
        self.last: dict[str, float] = {}  # the values of the last step, for the epoch's record
        self._tensors: dict[tuple, torch.Tensor] = {}  # (name, device) -> the value fed
        for name, schedule in self.scheduled.items():
            _number(schedule(Clock(0, 0, 1)), name, Clock(0, 0, 1))

    def values(self, clock: Clock, device) -> tuple[torch.Tensor, ...]:
        """The schedules' values at ``clock``, as 0-dim tensors on ``device`` (noted in
        :attr:`last`). Each schedule has one tensor per device, filled in place: a fill is a
        kernel with the value as its argument, where a new CUDA tensor would be a copy from
        the host that waits for the queued work (a sync per step)."""
        out = []
        for name, schedule in self.scheduled.items():
            self.last[name] = _number(schedule(clock), name, clock)
            key = (name, torch.device(device))
            if key not in self._tensors:
                self._tensors[key] = torch.zeros((), dtype=torch.get_default_dtype(),
                                                 device=device)  # fmt: skip
            out.append(self._tensors[key].fill_(self.last[name]))
        return tuple(out)

    def bind(self, loss: Callable) -> Keyworded:
        """``loss`` called with the constants, and the schedules' values taken from the end of
        its positional arguments."""
        return Keyworded(loss, self.constants, tuple(self.scheduled))


class Keyworded(nn.Module):
    """A loss ``loss(*batch, **kwargs)`` called as ``f(*batch, *values)``: the last
    ``len(names)`` positional tensors are the scheduled keywords' values; the constants are
    passed on every call. What both engines' steps (eager or captured) call.

    :param loss: the pair's ``ELBOModule``.
    :param dict constants: keywords passed as they are.
    :param tuple names: the scheduled keywords, in the order their values follow the batch.
    """

    def __init__(self, loss: Callable, constants: dict, names: tuple[str, ...]):
        super().__init__()  # a module like the ELBOModule it wraps: capture sees the same tree
        self.loss, self.constants, self.names = loss, constants, names
        self.elbo = getattr(loss, "elbo", None)  # the Pyro loss, for capture's explanations

    def forward(self, *args):
        cut = len(args) - len(self.names)
        keywords = dict(zip(self.names, args[cut:], strict=True))
        return self.loss(*args[:cut], **self.constants, **keywords)
