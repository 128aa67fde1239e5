"""The VAE as a Pyro model/guide pair.

The model is the generative story p(z) p(x|z); the guide is the amortized posterior q(z|x),
by default N(μ(x), diag σ(x)²) (see :mod:`pyrovae.guides` for a flow). Both put the batch in one
``pyro.plate("data", ...)`` at dim -1, so any Pyro ELBO can train them and
:func:`pyrovae.log_likelihood` can score them per datapoint.

KL warm-up and β-VAE [3] scale the latent sites of model and guide together by ``vae.beta``
(``poutine.scale``), so every ELBO weighs log p(z) − log q(z|x) by β while p(x|z) keeps weight 1;
:func:`pyrovae.log_likelihood` reads the unscaled densities, so scores stay the true log p(x).

References:
  [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
  [2] D. J. Rezende, S. Mohamed, D. Wierstra, "Stochastic Backpropagation and Approximate
      Inference in Deep Generative Models", ICML 2014.
  [3] I. Higgins et al., "β-VAE: Learning Basic Visual Concepts with a Constrained Variational
      Framework", ICLR 2017; S. R. Bowman et al., "Generating Sentences from a Continuous Space",
      CoNLL 2016 (KL annealing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule, pyro_method
from torch import nn

from .guides import GaussianPosterior
from .likelihoods import Bernoulli, Likelihood
from .priors import StandardNormal, check_prior

__all__ = ["BaseVAE", "VAE"]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BaseVAE(PyroModule):
    """What pyrovae's models share: the datapoint shape, the likelihood, data checks, the KL
    weight β, and interpolation. Subclasses define ``model``, ``guide``, ``encode``, ``decode``,
    ``reconstruct`` and ``sample``.

    :param x_shape: the shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param Likelihood likelihood: p(x|·).
    """

    def __init__(self, x_shape: Sequence[int], likelihood: Likelihood):
        super().__init__()
        self.x_shape = tuple(int(s) for s in x_shape)
        self.likelihood = likelihood
        self._beta = 1.0
        # β as a tensor too: captured/replayed losses (pyrovae.capture) and CUDA graphs read it
        # as an input, so a schedule's in-place updates reach them. Not saved in checkpoints.
        self.register_buffer("_beta_tensor", torch.ones(()), persistent=False)

    @property
    def beta(self) -> float:
        """The weight β > 0 of the latent sites (log p(z) − log q(z|x)) in training objectives;
        1 is the ELBO. Set by :class:`pyrovae.schedules.KLSchedule` for warm-up. Evaluation
        (:func:`pyrovae.log_likelihood`, :func:`pyrovae.elbo`) ignores it."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"beta (the KL weight) must be a finite number > 0, got {value}")
        self._beta = value
        with torch.no_grad():
            self._beta_tensor.fill_(value)

    def _latent_scale(self, beta=None) -> poutine.scale_messenger.ScaleMessenger:
        # poutine.scale by the β tensor for the latent sites (or by a step's own β, a keyword
        # of model and guide: fit(step_kwargs={"beta": Ramp(...)})). β > 0 was checked when it
        # was set, so Pyro's own check (a host sync on every step) is skipped.
        with pyro.validation_enabled(False):
            return poutine.scale(scale=self._beta_tensor if beta is None else beta)

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
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"expected floating-point images in [0, 1], got dtype {x.dtype}: convert them, "
                "e.g. x.float() (or x.float() / 255 for 8-bit pixels)"
            )
        dtype = next((p.dtype for p in self.parameters()), torch.get_default_dtype())
        if x.dtype != dtype:
            raise ValueError(
                f"expected {_name(dtype)} images (the dtype of the model's parameters), got "
                f"{_name(x.dtype)}: convert them with x.to(torch.{_name(dtype)}), or the model "
                f"with vae.to(torch.{_name(x.dtype)})"
            )
        if tuple(x.shape[1:]) != self.x_shape or x.dim() != 1 + self.event_dim:
            raise ValueError(
                f"expected data of shape (N, {', '.join(map(str, self.x_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def _check_support(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        if is_validation_enabled():
            self.likelihood.check_support(x)

    def _plate_size(self, x: torch.Tensor | None, n: int) -> int:
        # The data plate's size: the batch's, checked; or n datapoints to draw when x is None.
        if x is None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"n, the number of images to draw, must be an int >= 1, got {n!r}")
            return n
        self._check_support(x)
        return x.shape[0]

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode ``steps`` points on the straight line between the posterior means of ``x1`` and
        ``x2`` (each ``x_shape`` or ``(B, *x_shape)``), with the subclass's ``encode`` (mean and
        scale of the top-layer posterior) and ``decode`` (mean of p(x|z)). Returns
        ``(steps, ...)``."""
        z1, z2 = self.encode(x1)[0], self.encode(x2)[0]
        t = torch.linspace(0, 1, int(steps), device=z1.device, dtype=z1.dtype)
        t = t.reshape(-1, *([1] * z1.dim()))  # (steps, 1, ..., 1)
        return self.decode(z1 + t * (z2 - z1))


class VAE(BaseVAE):
    """A variational autoencoder built from an encoder, a decoder, a prior and a likelihood.

    ``vae.model(x)`` and ``vae.guide(x)`` are ordinary Pyro programs; train them with
    :func:`pyrovae.fit` (or Pyro's ``SVI``) and score them with :func:`pyrovae.log_likelihood`.

    :param nn.Module encoder: maps ``(..., *x_shape)`` to ``(loc, scale)``, each ``(..., z_dim)``.
    :param nn.Module decoder: maps ``(..., z_dim)`` to ``(..., likelihood.num_params, *x_shape)``.
    :param prior: a callable returning a distribution with event shape ``(z_dim,)``; default the
        standard normal. A prior with a ``bind(encoder, x_shape)`` method (the
        :class:`~pyrovae.priors.VampPrior`) is handed the encoder here.
    :param Likelihood likelihood: default :class:`~pyrovae.likelihoods.Bernoulli`.
    :param x_shape: the shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param int z_dim: latent size; read from the decoder's ``z_dim`` or the prior if omitted.
    :param posterior: turns the encoder's ``(loc, scale)`` into q(z|x) (a
        :class:`~pyrovae.guides.Posterior`); default the mean-field Gaussian.
    :raises ValueError: if the pieces do not fit (z_dim, event shapes, decoder outputs).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        prior: Callable[[], dist.Distribution] | None = None,
        likelihood: Likelihood | None = None,
        x_shape: Sequence[int] | None = None,
        z_dim: int | None = None,
        posterior: Callable[[torch.Tensor, torch.Tensor], dist.Distribution] | None = None,
    ):
        x_shape = x_shape if x_shape is not None else getattr(decoder, "x_shape", None)
        if x_shape is None:
            raise ValueError("pass x_shape, the shape of one datapoint (e.g. (1, 28, 28))")
        super().__init__(x_shape, likelihood if likelihood is not None else Bernoulli())
        if z_dim is None:
            z_dim = getattr(decoder, "z_dim", None) or getattr(prior, "z_dim", None)
        if z_dim is None:
            raise ValueError("pass z_dim: neither the decoder nor the prior says its size")
        self.z_dim = int(z_dim)
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior if prior is not None else StandardNormal(self.z_dim)
        self.posterior = posterior if posterior is not None else GaussianPosterior()
        bind = getattr(self.prior, "bind", None)
        if callable(bind):
            bind(self.encoder, self.x_shape)
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

    @pyro_method
    def model(self, x: torch.Tensor | None = None, n: int = 1, beta=None) -> None:
        """p(z) p(x|z) for a batch ``x`` of shape ``(N, *x_shape)``; with ``x=None``, draws
        ``n`` images from the model (what :class:`~pyro.infer.Predictive` does without data).
        ``beta`` (default :attr:`beta`) weighs the latent sites, e.g. a step schedule's:
        ``fit(vae.model, vae.guide, x, step_kwargs={"beta": Ramp(0.01, 1.0, epochs=10)})``."""
        size = self._plate_size(x, n)
        with pyro.plate("data", size, dim=-1):
            with self._latent_scale(beta):
                z = pyro.sample("z", self.prior())  # (N, z_dim); (K, N, z_dim) with K particles
            params = self.decoder(z)  # (..., N, P, *x_shape)
            pyro.sample("x", self.likelihood(params, self.event_dim), obs=x)  # event x_shape

    @pyro_method
    def guide(self, x: torch.Tensor, beta=None) -> None:
        """q(z|x) from the encoder and the posterior (default N(μ(x), diag σ(x)²)),
        reparameterized; ``beta`` as for :meth:`model`."""
        self._check_shape(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = self.encoder(x)  # (N, z_dim) each
            with self._latent_scale(beta):
                pyro.sample("z", self.posterior(loc, scale))  # event (z_dim,)

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
