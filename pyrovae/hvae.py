"""A hierarchical VAE with two stochastic layers, z2 → z1 → x, as one Pyro model/guide pair.

The generative model and the inference model of the VampPrior paper's two-level HVAE [1]:

    p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1, z2)
    q(z1, z2 | x) = q(z2 | x) q(z1 | x, z2)

Any prior works on the top layer z2 (a :class:`~pyrovae.priors.VampPrior` is bound to the
q(z2|x) encoder, as in the paper). All latent sites sit in the ``"data"`` plate, so Pyro's ELBOs
train it and :func:`pyrovae.log_likelihood` scores it per datapoint, with the same importance
sampler as the one-layer VAE: log p(x) ≈ logsumexp_k log [p(x, z1_k, z2_k) / q(z1_k, z2_k | x)]
− log K [2].

References:
  [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
  [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import nn

from .guides import GaussianPosterior
from .likelihoods import Bernoulli, Likelihood
from .nets import MLP, GaussianHead, MLPEncoder
from .priors import StandardNormal, check_positive, check_prior
from .vae import BaseVAE

__all__ = ["HVAE", "TwoInputMLP"]


class TwoInputMLP(nn.Module):
    """Features of two inputs: one dense branch each, concatenated, then a joint trunk.

    The branches have width ``hidden[0]``; the joint trunk has the remaining hidden sizes
    (``hidden[1:]``, or ``hidden[:1]`` when there is only one). The inputs may have different
    leading batch dimensions as long as they broadcast (e.g. x ``(N, D)`` and z2 ``(K, N, M)``).

    :param int in_a: size of the first input.
    :param int in_b: size of the second input.
    :param hidden: hidden sizes.
    :param str activation: activation name (see :data:`pyrovae.nets.ACTIVATIONS`).
    :param bool gated: gated dense layers.
    """

    def __init__(self, in_a: int, in_b: int, hidden: Sequence[int], activation: str, gated: bool):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        first, rest = hidden[:1], hidden[1:] or hidden[:1]
        self.branch_a = MLP(in_a, first, activation, gated)
        self.branch_b = MLP(in_b, first, activation, gated)
        self.joint = MLP(2 * self.branch_a.out_features, rest, activation, gated)
        self.out_features = self.joint.out_features

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ha, hb = torch.broadcast_tensors(self.branch_a(a), self.branch_b(b))  # (..., H) each
        return self.joint(torch.cat([ha, hb], -1))  # (..., H')


class _JointGaussian(nn.Module):
    # q(z1 | x, z2): (loc, scale) of a diagonal Gaussian from two inputs
    def __init__(self, in_a, in_b, out, hidden, activation, gated):
        super().__init__()
        self.trunk = TwoInputMLP(in_a, in_b, hidden, activation, gated)
        self.head = GaussianHead(self.trunk.out_features, out)

    def forward(self, a, b):
        return self.head(self.trunk(a, b))  # (..., out) each


class _JointDecoder(nn.Module):
    # p(x | z1, z2): likelihood parameters (..., P, *x_shape) from two codes
    def __init__(self, x_shape, z1_dim, z2_dim, hidden, activation, gated, num_params):
        super().__init__()
        self.x_shape, self.num_params = tuple(x_shape), int(num_params)
        self.trunk = TwoInputMLP(z1_dim, z2_dim, hidden, activation, gated)
        self.out = nn.Linear(self.trunk.out_features, self.num_params * math.prod(self.x_shape))

    def forward(self, z1, z2):
        out = self.out(self.trunk(z1, z2))  # (..., P * D)
        return out.unflatten(-1, (self.num_params, *self.x_shape))  # (..., P, *x_shape)


class HVAE(BaseVAE):
    """The two-level hierarchical VAE of [1] with dense (optionally gated) networks.

    Networks (``hidden`` = (h₁, h₂, …), reversed for the generative side):

    - q(z2 | x): dense trunk on x, Gaussian head;
    - q(z1 | x, z2): one branch on x and one on z2, joined by a dense trunk, Gaussian head;
    - p(z1 | z2): dense trunk on z2, Gaussian head;
    - p(x | z1, z2): one branch each on z1 and z2, joined, then the likelihood's parameters.

    ``vae.model(x)`` has sample sites ``"z2"``, ``"z1"`` (scaled by β, like the VAE's ``"z"``)
    and ``"x"``; the guide has ``"z2"`` and ``"z1"``.

    :param x_shape: the shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param int z_dim: size of the top latent z2 (the prior's z_dim).
    :param hidden: hidden sizes, e.g. ``(300, 300)`` as in the paper.
    :param str activation: activation name.
    :param bool gated: GatedDense layers, as in the paper.
    :param prior: prior on z2 (a callable returning a distribution with event shape
        ``(z_dim,)``); default the standard normal.
    :param Likelihood likelihood: default :class:`~pyrovae.likelihoods.Bernoulli`.
    :param posteriors: ``(q2, q1)``, turning each encoder's ``(loc, scale)`` into q(z2|x) and
        q(z1|x, z2) (:class:`~pyrovae.guides.Posterior` s); default two mean-field Gaussians.
    :param int z1_dim: size of the lower latent z1; default ``z_dim``.
    :raises ValueError: for sizes or pieces that do not fit.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        hidden: Sequence[int] = (300, 300),
        activation: str = "relu",
        gated: bool = False,
        prior: Callable[[], dist.Distribution] | None = None,
        likelihood: Likelihood | None = None,
        posteriors: Sequence[Callable] | None = None,
        z1_dim: int | None = None,
    ):
        super().__init__(x_shape, likelihood if likelihood is not None else Bernoulli())
        self.z_dim = check_positive("z_dim", z_dim)
        self.z1_dim = check_positive("z1_dim", z1_dim if z1_dim is not None else z_dim)
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden sizes must be positive integers, got {hidden}")
        d, back = math.prod(self.x_shape), tuple(reversed(hidden))
        self.encoder = MLPEncoder(self.x_shape, self.z_dim, hidden, activation, gated)
        self.z1_encoder = _JointGaussian(d, self.z_dim, self.z1_dim, hidden, activation, gated)
        self.z1_decoder = MLPEncoder((self.z_dim,), self.z1_dim, back, activation, gated)
        self.decoder = _JointDecoder(
            self.x_shape,
            self.z1_dim,
            self.z_dim,
            back,
            activation,
            gated,
            self.likelihood.num_params,
        )
        if posteriors is None:
            posteriors = (GaussianPosterior(), GaussianPosterior())
        if len(posteriors) != 2:
            raise ValueError(f"posteriors must be a pair (q(z2|x), q(z1|x,z2)), got {posteriors}")
        self.posterior_z2, self.posterior_z1 = posteriors
        self.prior = prior if prior is not None else StandardNormal(self.z_dim)
        bind = getattr(self.prior, "bind", None)
        if callable(bind):
            bind(self.encoder, self.x_shape)
        check_prior(self.prior, self.z_dim)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.event_dim)  # (..., D)

    @pyro_method
    def model(self, x: torch.Tensor | None = None, n: int = 1, beta=None) -> None:
        """p(z2) p(z1|z2) p(x|z1, z2) for a batch ``x`` of shape ``(N, *x_shape)``; with
        ``x=None``, draws ``n`` images (for :class:`~pyro.infer.Predictive` without data);
        ``beta`` as for :meth:`pyrovae.VAE.model`."""
        size = self._plate_size(x, n)
        with pyro.plate("data", size, dim=-1):
            with self._latent_scale(beta):
                z2 = pyro.sample("z2", self.prior())  # (..., N, z_dim)
                loc, scale = self.z1_decoder(z2)  # (..., N, z1_dim) each
                z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))  # (..., N, z1_dim)
            params = self.decoder(z1, z2)  # (..., N, P, *x_shape)
            pyro.sample("x", self.likelihood(params, self.event_dim), obs=x)  # event x_shape

    @pyro_method
    def guide(self, x: torch.Tensor, beta=None) -> None:
        """q(z2|x) q(z1|x, z2), reparameterized; ``beta`` as for :meth:`model`."""
        self._check_shape(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            loc2, scale2 = self.encoder(x)  # (N, z_dim) each
            with self._latent_scale(beta):
                z2 = pyro.sample("z2", self.posterior_z2(loc2, scale2))  # (..., N, z_dim)
                loc1, scale1 = self.z1_encoder(self._flat(x), z2)  # (..., N, z1_dim) each
                pyro.sample("z1", self.posterior_z1(loc1, scale1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of q(z2|x) (the top layer), each ``(..., z_dim)``."""
        return self.encoder(x)

    def _decode(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z1, z2), self.event_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z1, z2) for a top-layer code z2 = ``z`` and z1 the mean of p(z1|z2):
        ``(..., *x_shape)``."""
        return self._decode(self.z1_decoder(z)[0], z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior means (z2 from q(z2|x), then z1 from q(z1|x, z2)):
        ``(N, *x_shape)``."""
        z2 = self.encoder(x)[0]  # (N, z_dim)
        z1 = self.z1_encoder(self._flat(x), z2)[0]  # (N, z1_dim)
        return self._decode(z1, z2)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Draw ``n`` images: z2 ~ p(z2), z1 ~ p(z1|z2), then the mean of p(x|z1, z2) (or a
        sample of it with ``mean=False``). Returns ``(n, *x_shape)``."""
        z2 = self.prior().sample((int(n),))  # (n, z_dim)
        loc, scale = self.z1_decoder(z2)
        z1 = dist.Normal(loc, scale).sample()  # (n, z1_dim)
        params = self.decoder(z1, z2)
        if mean:
            return self.likelihood.mean(params, self.event_dim)
        return self.likelihood(params, self.event_dim).sample()
