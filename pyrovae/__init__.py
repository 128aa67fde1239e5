"""pyrovae: variational autoencoders as Pyro model/guide pairs.

Train any pair with :func:`fit` (SVI), score it with :func:`log_likelihood` (importance-sampled
log p(x) per datapoint), and build the classic VAE from swappable pieces with :class:`VAE`.
"""

from . import data, guides, likelihoods, nets, objectives, priors, schedules, selection
from .checkpoint import load_run, load_state, load_weights, save_run, save_state, save_weights
from .config import Config, build_vae
from .errors import CheckpointError, DataError, NonFiniteLossError, RunInUseError, WriteError
from .evaluation import elbo, iwae, log_likelihood
from .hvae import HVAE
from .objectives import IWAE
from .schedules import KLSchedule
from .selection import EarlyStopping
from .training import History, Objective, TrainState, fit
from .vae import VAE

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "HVAE",
    "IWAE",
    "KLSchedule",
    "EarlyStopping",
    "fit",
    "Objective",
    "History",
    "TrainState",
    "log_likelihood",
    "elbo",
    "iwae",
    "Config",
    "build_vae",
    "save_run",
    "load_run",
    "save_weights",
    "load_weights",
    "save_state",
    "load_state",
    "DataError",
    "CheckpointError",
    "NonFiniteLossError",
    "RunInUseError",
    "WriteError",
    "data",
    "likelihoods",
    "nets",
    "priors",
    "guides",
    "objectives",
    "schedules",
    "selection",
    "plots",
    "metrics",
]


def __getattr__(name: str):
    # pyrovae.plots and pyrovae.metrics load on first use (matplotlib only when a plot is drawn)
    if name in ("plots", "metrics"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
