"""The VAE as a Pyro model/guide pair.

The model is the generative story p(z) p(x|z); the guide is the amortized posterior
q(z|x) = N(μ(x), diag σ(x)²). Both put the batch in one ``pyro.plate("data", ...)`` at dim -1, so
any Pyro ELBO can train them and :func:`pyrovae.log_likelihood` can score them per datapoint.

References:
  [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
  [2] D. J. Rezende, S. Mohamed, D. Wierstra, "Stochastic Backpropagation and Approximate
      Inference in Deep Generative Models", ICML 2014.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn

from .likelihoods import Bernoulli, Likelihood
from .priors import StandardNormal, check_prior

__all__ = ["VAE"]


class VAE(PyroModule):
    """A variational autoencoder built from an encoder, a decoder, a prior and a likelihood.

    ``vae.model(x)`` and ``vae.guide(x)`` are ordinary Pyro programs; train them with
    :func:`pyrovae.fit` (or Pyro's ``SVI``) and score them with :func:`pyrovae.log_likelihood`.

    :param nn.Module encoder: maps ``(..., *x_shape)`` to ``(loc, scale)``, each ``(..., z_dim)``.
    :param nn.Module decoder: maps ``(..., z_dim)`` to ``(..., likelihood.num_params, *x_shape)``.
    :param prior: a callable returning a distribution with event shape ``(z_dim,)``; default the
        standard normal.
    :param Likelihood likelihood: default :class:`~pyrovae.likelihoods.Bernoulli`.
    :param x_shape: the shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param int z_dim: latent size; read from the decoder's ``z_dim`` or the prior if omitted.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        prior: Callable[[], dist.Distribution] | None = None,
        likelihood: Likelihood | None = None,
        x_shape: Sequence[int] | None = None,
        z_dim: int | None = None,
    ):
        super().__init__()
        x_shape = x_shape if x_shape is not None else getattr(decoder, "x_shape", None)
        if x_shape is None:
            raise ValueError("pass x_shape, the shape of one datapoint (e.g. (1, 28, 28))")
        self.x_shape = tuple(int(s) for s in x_shape)
        if z_dim is None:
            z_dim = getattr(decoder, "z_dim", None) or getattr(prior, "z_dim", None)
        if z_dim is None:
            raise ValueError("pass z_dim: neither the decoder nor the prior says its size")
        self.z_dim = int(z_dim)
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior if prior is not None else StandardNormal(self.z_dim)
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        check_prior(self.prior, self.z_dim)
        dec_z = getattr(decoder, "z_dim", self.z_dim)
        if dec_z != self.z_dim:
            raise ValueError(f"z_dim={self.z_dim} does not match the decoder's z_dim={dec_z}")
        dec_p = getattr(decoder, "num_params", self.likelihood.num_params)
        if dec_p != self.likelihood.num_params:
            raise ValueError(
                f"the {type(self.likelihood).__name__} likelihood needs "
                f"{self.likelihood.num_params} decoder outputs per pixel, the decoder makes {dec_p}"
            )

    @property
    def event_dim(self) -> int:
        """Number of dimensions of one datapoint."""
        return len(self.x_shape)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`ValueError` unless ``x`` is a batch ``(N, *x_shape)`` it can score."""
        self._check_shape(x)
        self.likelihood.check_support(x)

    def _check_shape(self, x) -> None:
        # shapes only: no host sync
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor of images, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.x_shape or x.dim() != 1 + self.event_dim:
            raise ValueError(
                f"expected data of shape (N, {', '.join(map(str, self.x_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def model(self, x: torch.Tensor) -> None:
        """p(z) p(x|z) for a batch ``x`` of shape ``(N, *x_shape)``."""
        self._check_shape(x)
        if is_validation_enabled():
            self.likelihood.check_support(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior())  # (N, z_dim); (K, N, z_dim) with K particles
            params = self.decoder(z)  # (..., N, P, *x_shape)
            pyro.sample("x", self.likelihood(params, self.event_dim), obs=x)  # event x_shape

    def guide(self, x: torch.Tensor) -> None:
        """q(z|x) = N(μ(x), diag σ(x)²), reparameterized."""
        self._check_shape(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = self.encoder(x)  # (N, z_dim) each
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))  # event (z_dim,)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of q(z|x), each ``(..., z_dim)``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z), ``(..., *x_shape)``: pixel probabilities for Bernoulli."""
        return self.likelihood.mean(self.decoder(z), self.event_dim)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image: ``(N, *x_shape)``."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Draw ``n`` images from the model: z ~ p(z), then the mean of p(x|z) (or a sample of
        it with ``mean=False``). Returns ``(n, *x_shape)``."""
        z = self.prior().sample((int(n),))  # (n, z_dim)
        params = self.decoder(z)
        if mean:
            return self.likelihood.mean(params, self.event_dim)
        return self.likelihood(params, self.event_dim).sample()

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode ``steps`` points on the straight line between the posterior means of ``x1`` and
        ``x2`` (each ``x_shape`` or ``(B, *x_shape)``). Returns ``(steps, ...)``."""
        z1, z2 = self.encode(x1)[0], self.encode(x2)[0]
        t = torch.linspace(0, 1, int(steps), device=z1.device, dtype=z1.dtype)
        t = t.reshape(-1, *([1] * z1.dim()))  # (steps, 1, ..., 1)
        return self.decode(z1 + t * (z2 - z1))
