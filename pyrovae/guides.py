"""Amortized posteriors q(z|x): what the guide samples, given the encoder's output.

An encoder maps a batch to the ``(loc, scale)`` of a diagonal Gaussian; a *posterior* turns that
into the guide's distribution over z, with event shape ``(z_dim,)`` and batch shape
``loc.shape[:-1]``:

- :class:`GaussianPosterior`: the mean-field Gaussian N(loc, diag scale²) [1];
- :class:`FlowPosterior`: that Gaussian pushed through inverse autoregressive flow (IAF)
  transforms conditioned on the encoder's output [2], so q(z|x) can be skewed, correlated and
  multi-modal while sampling and scoring its own samples stay one parallel pass per transform.

Models take a posterior object (``VAE(..., posterior=FlowPosterior(z_dim))``); the CLI picks one
by name (``--guide normal|flow``) from :data:`GUIDES`.

References:
  [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
  [2] D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling, "Improved
      Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import ConditionalAutoRegressiveNN, PyroModule
from torch import nn

from .priors import check_flow_hidden, check_positive

__all__ = ["Posterior", "GaussianPosterior", "FlowPosterior", "GUIDES", "make_posterior"]


class Posterior(PyroModule):
    """Base class: ``forward(loc, scale)`` returns q(z|x) from the encoder's output, each
    ``(..., z_dim)``, as a distribution with batch shape ``(...)`` and event shape
    ``(z_dim,)``."""


class GaussianPosterior(Posterior):
    """The mean-field Gaussian q(z|x) = N(loc, diag scale²), reparameterized."""

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, scale).to_event(1)  # batch (...) event (z_dim,)


class FlowPosterior(Posterior):
    """q(z|x): the encoder's Gaussian followed by ``flows`` IAF transforms [2].

    z₀ ~ N(loc, diag scale²), then z_t = σ_t ⊙ z_{t−1} + (1 − σ_t) ⊙ m_t for t = 1..flows, where
    (m_t, σ_t) come from a MADE network on z_{t−1} and the context h(x) = (loc, log scale),
    autoregressive in z_{t−1} (Kingma et al.'s numerically stable gated form; σ_t in (0, 1)).
    log q(z|x) = log N(z₀) − Σ_t Σ_i log σ_t,i. Conditioning on the encoder's output, not on a
    hidden layer of it, lets the flow work with any encoder.

    Scoring a value the guide did not just sample would need the sequential inverse; Pyro's
    ELBOs and :func:`pyrovae.log_likelihood` only score the guide's own samples, which are
    cached.

    :param int z_dim: dimension of the latent code (at least 2).
    :param int flows: number of IAF transforms.
    :param hidden: hidden sizes of each transform's MADE network; each must be at least z_dim.
    """

    def __init__(self, z_dim: int, flows: int = 2, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.z_dim = check_positive("z_dim", z_dim)
        self.flows = check_positive("flows (the number of flow transforms)", flows)
        hidden = check_flow_hidden(self.z_dim, hidden)
        order = torch.arange(self.z_dim)
        self.transforms = nn.ModuleList(
            T.ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(
                    self.z_dim,
                    2 * self.z_dim,
                    hidden,
                    permutation=order if i % 2 == 0 else order.flip(0),
                ),
                stable=True,
            )
            for i in range(self.flows)
        )

    def forward(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TransformedDistribution:
        if loc.shape[-1] != self.z_dim:
            raise ValueError(f"the flow guide has z_dim={self.z_dim}, the encoder {loc.shape[-1]}")
        context = torch.cat([loc, scale.log()], -1)  # (..., 2 z_dim)
        base = dist.Normal(loc, scale).to_event(1)  # batch (...) event (z_dim,)
        return dist.TransformedDistribution(base, [t.condition(context) for t in self.transforms])


def _gaussian(z_dim: int, **_) -> Posterior:
    return GaussianPosterior()


def _flow(z_dim: int, flows: int = 2, hidden: Sequence[int] = (256, 256), **_) -> Posterior:
    return FlowPosterior(z_dim, flows, hidden)


#: The guides the CLI and configs know by name: name -> factory ``(z_dim, **options)`` with
#: options ``flows`` and ``hidden`` (flow); a factory ignores the options it does not take.
GUIDES: dict[str, Callable[..., Posterior]] = {"normal": _gaussian, "flow": _flow}


def make_posterior(name: str, z_dim: int, **options) -> Posterior:
    """Build a posterior by its name in :data:`GUIDES`.

    :raises ValueError: for an unknown name (the message lists the choices) or a bad option.
    """
    try:
        factory = GUIDES[name]
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; choose from {', '.join(GUIDES)}") from None
    return factory(z_dim, **options)
