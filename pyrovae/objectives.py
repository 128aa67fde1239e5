"""Training objectives by name: the ELBO, the ELBO with closed-form KL, and the per-datapoint
importance-weighted bound (IWAE).

:data:`LOSSES` maps ``--loss`` names to factories taking the number of particles:

- ``elbo``: :class:`~pyro.infer.Trace_ELBO` (Monte-Carlo KL; any prior);
- ``meanfield``: :class:`~pyro.infer.TraceMeanField_ELBO` (closed-form KL where one is
  registered, e.g. a Gaussian guide against a Gaussian prior; Monte Carlo otherwise);
- ``iwae``: :class:`IWAE`, log (1/k) Σ_j p(x_i, z_ij)/q(z_ij|x_i) summed over datapoints [1].

Pyro's :class:`~pyro.infer.RenyiELBO` with ``alpha=0`` is also an importance-weighted bound, but it
sums the log weights over every plate that not all sites share: it is per datapoint only while
every site sits in the data plate, and as soon as one site does not (a global latent), it forms
one weight per particle *for the whole batch*, a bound that tends to the ELBO as the batch grows.
It also has no ``differentiable_loss``, so :func:`pyrovae.fit` cannot use it. :class:`IWAE` is
computed from :func:`pyrovae.evaluation.log_weights`: always one weight per particle and
datapoint, and a clear error for a site outside the data plate.

References:
  [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from .evaluation import inspect_pair, log_weights
from .priors import check_positive

__all__ = ["IWAE", "LOSSES", "make_loss"]


class IWAE(ELBO):
    """The importance-weighted autoencoder bound [1], per datapoint:

        IWAE_k(x_i) = log (1/k) Σ_{j=1..k} p(x_i, z_ij) / q(z_ij | x_i),   z_ij ~ q(z | x_i).

    The loss is −Σ_i IWAE_k(x_i), differentiated through reparameterized samples (the guide's
    sites must be reparameterizable; pyrovae's guides are). k=1 is the ELBO; the bound rises with
    k towards log p(x_i). Use it with :func:`pyrovae.fit` (``loss=IWAE(k)``) or Pyro's ``SVI``.

    The importance weights use the model's unscaled densities, so a KL weight β ≠ 1 (warm-up,
    β-VAE) cannot apply; a model whose ``beta`` is not 1 is refused rather than silently
    trained without it.

    :param int num_particles: k, samples per datapoint (vectorized).
    :param int max_plate_nesting: plates the model nests; guessed from one run if omitted.
    :param str data_plate: the name of the plate over datapoints (default: found from a trace).
    """

    def __init__(
        self,
        num_particles: int = 5,
        max_plate_nesting: int | float = float("inf"),
        data_plate: str | None = None,
    ):
        k = check_positive("particles (k, the IWAE's samples per datapoint)", num_particles)
        # particles are vectorized by log_weights itself, not by Pyro's ELBO machinery
        super().__init__(num_particles=k, max_plate_nesting=max_plate_nesting)
        self.data_plate = data_plate
        self._layout = None  # how log_weights runs the pair, found on the first call

    def _get_trace(self, model, guide, args, kwargs):
        # Pyro's ELBO interface; the weights come from log_weights instead of single traces.
        raise TypeError(
            "IWAE builds no single traces: its weights come from pyrovae.evaluation.log_weights"
        )

    def per_datapoint(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The bound of each datapoint, ``(N,)`` in nats, with gradients.

        :raises ValueError: for a site outside the data plate, keyword arguments, or a model
            with ``beta != 1``.
        """
        if kwargs:
            raise ValueError("IWAE passes the batch positionally; got keyword arguments")
        owner = getattr(model, "__self__", model)
        beta = getattr(owner, "beta", 1.0)
        if beta != 1.0:
            raise ValueError(
                f"the iwae loss weighs the model's unscaled densities, so beta={beta} (KL "
                "warm-up or β-VAE) would be ignored; set beta to 1 or use the elbo or "
                "meanfield loss"
            )
        if self._layout is None:  # found once, without drawing random numbers
            self._layout = inspect_pair(model, guide, args, self.data_plate)
            if self._layout.subsample is not None:
                raise ValueError(
                    f"the model subsamples its plate {self._layout.plate!r} itself; the iwae "
                    "loss takes batches: write pyro.plate(name, x.shape[0]) over the batch"
                )
        nesting = self.max_plate_nesting
        lw = log_weights(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self._layout.nesting if nesting == float("inf") else int(nesting),
            data_plate=self._layout.plate,
            vectorized=self._layout.vectorized,
            looped=self._layout.looped,
        )  # (k, N)
        return lw.logsumexp(0) - math.log(self.num_particles)  # (N,)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """−Σ_i IWAE_k(x_i), a scalar tensor with gradients."""
        return -self.per_datapoint(model, guide, *args, **kwargs).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """−Σ_i IWAE_k(x_i) as a float, without gradients."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after back-propagating it (for Pyro's ``SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _elbo(num_particles: int) -> ELBO:
    if num_particles == 1:
        return Trace_ELBO()
    return Trace_ELBO(num_particles=num_particles, vectorize_particles=True)


def _meanfield(num_particles: int) -> ELBO:
    if num_particles == 1:
        return TraceMeanField_ELBO()
    return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True)


#: Training objectives by name: name -> factory taking the number of particles.
LOSSES: dict[str, Callable[[int], ELBO]] = {
    "elbo": _elbo,
    "meanfield": _meanfield,
    "iwae": IWAE,
}


def make_loss(name: str, particles: int = 1) -> ELBO:
    """The Pyro ELBO instance for a loss name in :data:`LOSSES`.

    :param str name: ``elbo``, ``meanfield`` or ``iwae``.
    :param int particles: samples per datapoint (averaged for the ELBOs, importance-weighted for
        ``iwae``).
    :raises ValueError: for an unknown name or a non-positive particle count.
    """
    try:
        factory = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None
    return factory(check_positive("particles", particles))
