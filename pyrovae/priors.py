"""Priors p(z): swappable objects that return a distribution over the latent code.

A prior is any callable ``prior() -> Distribution`` whose event shape is ``(z_dim,)`` and whose
batch shape is ``()``; :class:`~pyrovae.VAE` samples it inside its ``"data"`` plate, which
broadcasts it over the batch. The built-in priors are :class:`~pyro.nn.PyroModule` s so that
learned priors (added by later releases) train with the rest of the model.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["Prior", "StandardNormal", "PRIORS", "make_prior", "check_prior"]


class Prior(PyroModule):
    """Base class of the built-in priors: subclasses define ``forward() -> Distribution``.

    :param int z_dim: dimension of the latent code.
    """

    def __init__(self, z_dim: int):
        if int(z_dim) < 1:
            raise ValueError(f"z_dim must be a positive integer, got {z_dim}")
        super().__init__()
        self.z_dim = int(z_dim)


class StandardNormal(Prior):
    """The standard normal prior p(z) = N(0, I).

    Its location and scale are buffers, so they follow the module across devices and are saved
    with it, but nothing about them is learned.

    :param int z_dim: dimension of the latent code.
    """

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.register_buffer("loc", torch.zeros(self.z_dim))
        self.register_buffer("scale", torch.ones(self.z_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)  # batch () event (z_dim,)


#: The priors the CLI and configs know by name: name -> class taking ``z_dim``.
PRIORS: dict[str, Callable[[int], Prior]] = {"normal": StandardNormal}


def make_prior(name: str, z_dim: int) -> Prior:
    """Build a prior by its name in :data:`PRIORS`.

    :raises ValueError: for an unknown name; the message lists the choices.
    """
    try:
        factory = PRIORS[name]
    except KeyError:
        raise ValueError(f"unknown prior {name!r}; choose from {', '.join(PRIORS)}") from None
    return factory(z_dim)


def check_prior(prior: Callable[[], dist.Distribution], z_dim: int) -> None:
    """Check that ``prior()`` is a distribution over vectors of size ``z_dim``.

    :raises ValueError: naming what is wrong with the prior.
    """
    d = prior()
    if not isinstance(d, torch.distributions.Distribution):
        raise ValueError(f"the prior must return a distribution, got {type(d).__name__}")
    if tuple(d.event_shape) != (z_dim,):
        raise ValueError(
            f"the prior's event shape is {tuple(d.event_shape)}, but the encoder and decoder use "
            f"z_dim={z_dim}: it must be ({z_dim},) (use .to_event(1) on a per-coordinate prior)"
        )
    if tuple(d.batch_shape) != ():
        raise ValueError(
            f"the prior's batch shape must be () (the 'data' plate broadcasts it), "
            f"got {tuple(d.batch_shape)}"
        )
