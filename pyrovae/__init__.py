"""pyrovae: variational autoencoders as Pyro model/guide pairs.

Train any pair with :func:`fit` (SVI), score it with :func:`log_likelihood` (importance-sampled
log p(x) per datapoint), and build the classic VAE from swappable pieces with :class:`VAE`.

The names below load on first use (PEP 562): ``import pyrovae`` imports neither torch nor
matplotlib, so the ``pyrovae`` command can choose OpenMP's settings before torch starts. Every
submodule is an attribute too, loaded the same way (``pyrovae.evaluation.inspect_pair`` after a
plain ``import pyrovae``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Each public name and the submodule it comes from.
_FROM = {
    "VAE": "vae",
    "HVAE": "hvae",
    "IWAE": "objectives",
    "KLSchedule": "schedules",
    "Ramp": "schedules",
    "Schedule": "schedules",
    "EarlyStopping": "selection",
    "fit": "training",
    "Trainer": "training",
    "Objective": "pair",
    "History": "training",
    "TrainState": "state",
    "log_likelihood": "evaluation",
    "log_likelihood_report": "evaluation",
    "elbo": "evaluation",
    "iwae": "evaluation",
    "Sequences": "sequences",
    "Config": "config",
    "build_vae": "config",
    "save_run": "checkpoint",
    "load_run": "checkpoint",
    "save_weights": "checkpoint",
    "load_weights": "checkpoint",
    "save_state": "checkpoint",
    "load_state": "checkpoint",
    "DataError": "errors",
    "CheckpointError": "errors",
    "NonFiniteLossError": "errors",
    "RunInUseError": "errors",
    "WriteError": "errors",
}
_SUBMODULES = ("data", "likelihoods", "nets", "priors", "guides", "objectives", "schedules",
               "selection", "plots", "metrics", "choices", "diagnostics", "ais",
               "sequences")  # fmt: skip

__all__ = [*_FROM, *_SUBMODULES]


def _submodules() -> set[str]:
    # Every module of the package (pyrovae.evaluation, pyrovae.capture, ...), found on disk.
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def __getattr__(name: str):
    if name in _FROM:
        value = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    elif name in _SUBMODULES or (not name.startswith("_") and name in _submodules()):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_submodules()})


if TYPE_CHECKING:  # for type checkers and editors: the names as if imported eagerly
    from . import (  # noqa: F401
        ais,
        choices,
        data,
        diagnostics,
        guides,
        likelihoods,
        metrics,
        nets,
        objectives,
        plots,
        priors,
        schedules,
        selection,
        sequences,
    )
    from .checkpoint import (  # noqa: F401
        load_run,
        load_state,
        load_weights,
        save_run,
        save_state,
        save_weights,
    )
    from .config import Config, build_vae  # noqa: F401
    from .errors import (  # noqa: F401
        CheckpointError,
        DataError,
        NonFiniteLossError,
        RunInUseError,
        WriteError,
    )
    from .evaluation import elbo, iwae, log_likelihood, log_likelihood_report  # noqa: F401
    from .hvae import HVAE  # noqa: F401
    from .objectives import IWAE  # noqa: F401
    from .pair import Objective  # noqa: F401
    from .schedules import KLSchedule, Ramp, Schedule  # noqa: F401
    from .selection import EarlyStopping  # noqa: F401
    from .sequences import Sequences  # noqa: F401
    from .state import TrainState  # noqa: F401
    from .training import History, Trainer, fit  # noqa: F401
    from .vae import VAE  # noqa: F401
