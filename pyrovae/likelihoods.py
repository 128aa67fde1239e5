"""Likelihoods p(x|z): turn the decoder's output into a distribution over whole images.

The decoder returns ``num_params`` numbers per pixel, laid out as ``(..., num_params, *x_shape)``;
a likelihood reads them and returns a distribution whose event shape is ``x_shape`` (all pixels of
one image are one event). The distributions are built with ``validate_args=False``: the data are
checked once, by :meth:`Likelihood.check_support`, instead of on every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

__all__ = [
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "LearnedGaussian",
    "LIKELIHOODS",
    "make_likelihood",
]


class Likelihood(PyroModule):
    """Base class: ``forward(params, event_dim)`` returns p(x|z) given the decoder's output."""

    num_params: int = 1
    """Numbers the decoder must produce per pixel."""

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`ValueError` if ``x`` holds values this likelihood cannot score."""

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        """The mean of p(x|z), of shape ``(..., *x_shape)``."""
        return self(params, event_dim).mean


def _param(params: torch.Tensor, event_dim: int, i: int) -> torch.Tensor:
    # params: (..., num_params, *x_shape) -> the i-th: (..., *x_shape)
    return params.select(-event_dim - 1, i)


class Bernoulli(Likelihood):
    """Bernoulli pixels with logits from the decoder, for binary images.

    :param bool allow_non_binary: score grey values in [0, 1] with the Bernoulli cross-entropy
        (not a normalized density on [0, 1]; opt in knowingly). Default: binary data only.
    """

    def __init__(self, allow_non_binary: bool = False):
        super().__init__()
        self.allow_non_binary = bool(allow_non_binary)

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        logits = _param(params, event_dim, 0)  # (..., *x_shape)
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(event_dim)

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return torch.sigmoid(_param(params, event_dim, 0))

    def check_support(self, x: torch.Tensor) -> None:
        if self.allow_non_binary:
            bad = (x < 0) | (x > 1)
            if bool(bad.any()):
                raise ValueError(
                    "the Bernoulli likelihood needs pixel values in [0, 1], but the data has "
                    f"values such as {x[bad].flatten()[0].item():.4g}"
                )
            return
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise ValueError(
                "the Bernoulli likelihood needs binary pixels (0 or 1), but the data has values "
                f"such as {x[bad].flatten()[0].item():.4g}: binarize the data (--binarize "
                "threshold|static|dynamic, or pyrovae.data.load(..., binarize=...)), use a "
                "Gaussian likelihood, or opt in with Bernoulli(allow_non_binary=True) "
                "(--allow-non-binary)"
            )


class Gaussian(Likelihood):
    """Gaussian pixels N(f(z), c·I) with a fixed variance ``c``.

    Small ``c`` weighs reconstruction more against the KL term; large ``c`` gives smoother, more
    regular latent spaces and blurrier reconstructions.

    :param float variance: the fixed per-pixel variance ``c`` (> 0).
    """

    def __init__(self, variance: float = 0.1):
        if not (variance > 0 and math.isfinite(variance)):
            raise ValueError(f"the Gaussian likelihood's variance must be > 0, got {variance}")
        super().__init__()
        self.variance = float(variance)

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        loc = _param(params, event_dim, 0)  # (..., *x_shape)
        return dist.Normal(loc, math.sqrt(self.variance), validate_args=False).to_event(event_dim)

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return _param(params, event_dim, 0)


class LearnedGaussian(Likelihood):
    """Gaussian pixels whose per-pixel scale the decoder predicts: N(f(z), diag g(z)²).

    :param float min_scale: floor added to ``softplus`` of the decoder's scale output, so the
        density stays bounded on near-constant pixels.
    """

    num_params = 2

    def __init__(self, min_scale: float = 1e-3):
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale}")
        super().__init__()
        self.min_scale = float(min_scale)

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        loc = _param(params, event_dim, 0)  # (..., *x_shape)
        scale = F.softplus(_param(params, event_dim, 1)) + self.min_scale  # (..., *x_shape)
        return dist.Normal(loc, scale, validate_args=False).to_event(event_dim)

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return _param(params, event_dim, 0)


#: The likelihoods the CLI and configs know by name.
LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "gaussian-learned": LearnedGaussian,
}


def make_likelihood(name: str, **options) -> Likelihood:
    """Build a likelihood by its name in :data:`LIKELIHOODS`, passing the options it takes.

    :raises ValueError: for an unknown name; the message lists the choices.
    """
    try:
        factory = LIKELIHOODS[name]
    except KeyError:
        raise ValueError(
            f"unknown likelihood {name!r}; choose from {', '.join(LIKELIHOODS)}"
        ) from None
    return factory(**options)
