"""Priors p(z): swappable objects that return a distribution over the latent code.

A prior is any callable ``prior() -> Distribution`` whose event shape is ``(z_dim,)`` and whose
batch shape is ``()``; :class:`~pyrovae.VAE` samples it inside its ``"data"`` plate, which
broadcasts it over the batch. The built-in priors are small :class:`~pyro.nn.PyroModule` s, so
learned priors train with the rest of the model and are saved in its checkpoint:

- :class:`StandardNormal`: N(0, I);
- :class:`LearnedNormal`: N(μ, diag σ²) with learned μ and σ;
- :class:`MixtureOfGaussians`: a learned mixture of K diagonal Gaussians;
- :class:`VampPrior`: the mixture of the variational posteriors of K learned pseudo-inputs,
  p(z) = (1/K) Σ_k q(z | u_k) [1];
- :class:`FlowPrior`: a masked autoregressive flow on a standard normal [2, 3].

A prior that needs the model's encoder (the VampPrior) has a ``bind(encoder, x_shape)`` method;
the model calls it when it is built, so the encoder is shared, never copied, and the checkpoint
holds only the prior's own parameters.

References:
  [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
  [2] G. Papamakarios, T. Pavlakou, I. Murray, "Masked Autoregressive Flow for Density
      Estimation", NeurIPS 2017.
  [3] X. Chen et al., "Variational Lossy Autoencoder", ICLR 2017 (autoregressive-flow priors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import AutoRegressiveNN, PyroModule
from torch import nn

__all__ = [
    "Prior",
    "StandardNormal",
    "LearnedNormal",
    "MixtureOfGaussians",
    "VampPrior",
    "FlowPrior",
    "DiagonalGaussianMixture",
    "PRIORS",
    "make_prior",
    "check_prior",
    "check_positive",
    "check_flow_hidden",
]

#: Bound on (points × components) that :class:`DiagonalGaussianMixture` materializes at once
#: when scoring; larger batches are scored in chunks (128 MiB of float64 each).
MIXTURE_CHUNK_ELEMENTS = 2**24


def check_positive(name: str, value) -> int:
    """``int(value)`` if it is a positive integer.

    :raises ValueError: naming the setting otherwise.
    """
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Prior(PyroModule):
    """Base class of the built-in priors: subclasses define ``forward() -> Distribution`` with
    event shape ``(z_dim,)`` and batch shape ``()``.

    :param int z_dim: dimension of the latent code.
    """

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = check_positive("z_dim", z_dim)

    def bind(self, encoder: Callable, x_shape: Sequence[int]) -> None:
        """Called by the model that owns the prior with its encoder (``x -> (loc, scale)``) and
        the shape of one datapoint. Priors that do not need them ignore the call."""


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


class LearnedNormal(Prior):
    """A diagonal Gaussian prior N(μ, diag σ²) whose mean and scale are learned.

    Starts at N(0, I); σ = exp(log σ) stays positive. With ``--loss meanfield`` its KL to the
    Gaussian guide is in closed form.

    :param int z_dim: dimension of the latent code.
    """

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.loc = nn.Parameter(torch.zeros(self.z_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.z_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)  # event (z_dim,)


class DiagonalGaussianMixture(TorchDistribution):
    """A mixture of K diagonal Gaussians over vectors, p(z) = Σ_k w_k N(z; μ_k, diag σ_k²).

    Unlike :class:`~pyro.distributions.MixtureSameFamily`, scoring never materializes a
    (points × K × dim) tensor: the K squared distances of a point come from two matrix products,
    in float64, and at most ``max_chunk_elements`` (points × K) numbers are held at once, so a
    500-component prior scores the millions of particles of a K=5000 log-likelihood estimate
    fast and in bounded memory. The
    parameters are shared by the whole batch (expanding only changes the batch shape). Samples
    are not reparameterized (the component is discrete).

    :param torch.Tensor logits: ``(K,)`` unnormalized log weights.
    :param torch.Tensor loc: ``(K, D)`` component means.
    :param torch.Tensor scale: ``(K, D)`` component standard deviations (> 0).
    :param batch_shape: batch shape (default ``()``).
    :param int max_chunk_elements: memory bound for :meth:`log_prob`.
    """

    arg_constraints = {
        "logits": constraints.real,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        logits: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
        max_chunk_elements: int = MIXTURE_CHUNK_ELEMENTS,
    ):
        if loc.dim() != 2 or loc.shape != scale.shape or logits.shape != loc.shape[:1]:
            raise ValueError(
                f"expected logits (K,), loc and scale (K, D); got {tuple(logits.shape)}, "
                f"{tuple(loc.shape)}, {tuple(scale.shape)}"
            )
        self.logits, self.loc, self.scale = logits, loc, scale
        self.max_chunk_elements = int(max_chunk_elements)
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> DiagonalGaussianMixture:
        return DiagonalGaussianMixture(
            self.logits,
            self.loc,
            self.scale,
            batch_shape,
            validate_args=False,
            max_chunk_elements=self.max_chunk_elements,
        )

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights ``(K,)``."""
        return self.logits.softmax(-1)

    @property
    def mean(self) -> torch.Tensor:
        m = self.weights @ self.loc  # (D,)
        return m.expand(self.batch_shape + m.shape)

    @property
    def variance(self) -> torch.Tensor:
        second = self.weights @ (self.scale**2 + self.loc**2)  # (D,) E[z²]
        v = second - (self.weights @ self.loc) ** 2
        return v.expand(self.batch_shape + v.shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]  # sample + batch
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits).sample(shape)  # shape
            eps = torch.randn(
                shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device
            )
            return self.loc[k] + self.scale[k] * eps  # (*shape, D)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        d = value.shape[-1]
        # Σ_d ((z_d - μ_kd) / σ_kd)² = z² · (1/σ_k²) - 2 z · (μ_k/σ_k²) + Σ_d μ_kd²/σ_kd²: two
        # matrix products per chunk instead of a (m, K, D) tensor. The three terms are large and
        # their sum can be small (z near μ_k, σ_k small), so this runs in float64.
        inv_var = self.scale.double().pow(-2)  # (K, D)
        loc = self.loc.double()  # (K, D)
        # per component: log w_k - D/2 log 2π - Σ_d log σ_kd - ½ Σ_d μ_kd²/σ_kd²
        const = (
            self.logits.double().log_softmax(-1)
            - 0.5 * d * math.log(2 * math.pi)
            - self.scale.double().log().sum(-1)
            - 0.5 * (loc.square() * inv_var).sum(-1)
        )  # (K,)
        flat = value.reshape(-1, d).double()  # (M, D)
        step = max(1, self.max_chunk_elements // max(1, self.loc.shape[0]))
        parts = []
        scaled_loc = (loc * inv_var).T  # (D, K)
        for z in flat.split(step):
            # const - ½ z²·(1/σ²) + z·(μ/σ²), fused into the products
            log_joint = torch.addmm(const, z.square(), inv_var.T, alpha=-0.5)  # (m, K)
            log_joint = torch.addmm(log_joint, z, scaled_loc)  # (m, K)
            parts.append(torch.logsumexp(log_joint, -1))  # (m,)
        lp = torch.cat(parts).to(value.dtype).reshape(value.shape[:-1])  # (...)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))


class MixtureOfGaussians(Prior):
    """A learned mixture of K diagonal Gaussians, p(z) = Σ_k w_k N(z; μ_k, diag σ_k²).

    Means start as draws from N(0, I), scales at 1 and weights equal; all three are learned.

    :param int z_dim: dimension of the latent code.
    :param int components: K, the number of mixture components.
    """

    def __init__(self, z_dim: int, components: int = 10):
        super().__init__(z_dim)
        self.components = check_positive(
            "components (K, the mixture's component count)", components
        )
        self.logits = nn.Parameter(torch.zeros(self.components))
        self.loc = nn.Parameter(torch.randn(self.components, self.z_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.components, self.z_dim))

    def forward(self) -> DiagonalGaussianMixture:
        return DiagonalGaussianMixture(self.logits, self.loc, self.log_scale.exp())  # event (D,)


class VampPrior(Prior):
    """The VampPrior [1]: the mixture of the variational posteriors of K learned pseudo-inputs,

        p(z) = (1/K) Σ_k q(z | u_k),   log p(z) = logsumexp_k log q(z | u_k) − log K.

    The prior needs the model's encoder, ``x -> (loc, scale)`` of a diagonal Gaussian; the model
    hands it over when it is built (:meth:`bind`). The prior keeps a plain reference to it, not
    a submodule, so the checkpoint holds the encoder once (under the model) and the prior's only
    state is the pseudo-inputs. As in the
    paper's code, a pseudo-input is ``hardtanh(P_k, 0, 1)`` of a free parameter ``P_k``
    initialized from N(0.05, 0.01²), so pseudo-inputs stay in the pixel range.

    With a flow guide the components are the encoder's Gaussians (the flow's base), which keeps
    the prior a cheap mixture of Gaussians.

    :param int z_dim: dimension of the latent code.
    :param int components: K, the number of pseudo-inputs (the paper uses 500).
    :param x_shape: the shape of one datapoint; if omitted, taken from :meth:`bind`.
    :param float init_mean: mean of the pseudo-inputs' initial values.
    :param float init_std: standard deviation of the pseudo-inputs' initial values.
    """

    def __init__(
        self,
        z_dim: int,
        components: int = 500,
        x_shape: Sequence[int] | None = None,
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ):
        super().__init__(z_dim)
        self.components = check_positive("components (K, the number of pseudo-inputs)", components)
        self.init_mean, self.init_std = float(init_mean), float(init_std)
        self.x_shape: tuple[int, ...] | None = None
        self.__dict__["_encoder"] = None  # not a submodule: the model owns the encoder
        self.register_parameter("pseudo_inputs", None)
        if x_shape is not None:
            self._make_pseudo_inputs(x_shape)

    def _make_pseudo_inputs(self, x_shape: Sequence[int]) -> None:
        self.x_shape = tuple(int(s) for s in x_shape)
        init = torch.randn(self.components, *self.x_shape) * self.init_std + self.init_mean
        self.pseudo_inputs = nn.Parameter(init)  # (K, *x_shape)

    def bind(self, encoder: Callable, x_shape: Sequence[int]) -> None:
        """Use ``encoder`` (``x -> (loc, scale)``) for the components q(z | u_k).

        :raises ValueError: if the pseudo-inputs were made for another datapoint shape.
        """
        x_shape = tuple(int(s) for s in x_shape)
        if self.pseudo_inputs is None:
            self._make_pseudo_inputs(x_shape)
        elif self.x_shape != x_shape:
            raise ValueError(
                f"the VampPrior's pseudo-inputs have shape {self.x_shape}, but the model's "
                f"datapoints have shape {x_shape}"
            )
        self.__dict__["_encoder"] = encoder

    @property
    def encoder(self) -> Callable | None:
        """The encoder the prior was bound to (``None`` before :meth:`bind`)."""
        return self.__dict__["_encoder"]

    def pseudo(self) -> torch.Tensor:
        """The pseudo-inputs u_k = hardtanh(P_k, 0, 1): ``(K, *x_shape)``."""
        if self.pseudo_inputs is None:
            raise ValueError("the VampPrior has no pseudo-inputs yet: pass x_shape or bind it")
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0)

    def forward(self) -> DiagonalGaussianMixture:
        if self.encoder is None:
            raise ValueError(
                "the VampPrior needs the model's encoder: build the model with it "
                "(VAE(..., prior=VampPrior(...))) or call prior.bind(encoder, x_shape)"
            )
        loc, scale = self.encoder(self.pseudo())  # (K, z_dim) each
        logits = torch.zeros(self.components, dtype=loc.dtype, device=loc.device)  # (K,)
        return DiagonalGaussianMixture(logits, loc, scale)  # event (z_dim,)


class FlowPrior(Prior):
    """A normalizing-flow prior: z = f⁻¹(ε), ε ~ N(0, I), with f a stack of masked
    autoregressive (MAF) transforms [2], so that log p(z) = log N(f(z)) + log |det ∂f/∂z| takes
    one parallel pass per transform (sampling, which inverts them, takes ``z_dim`` passes).

    Built from Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive` used in the
    inverse direction. Each transform has its own fixed variable order (a buffer saved with the
    checkpoint): reversed on every other transform.

    :param int z_dim: dimension of the latent code (at least 2).
    :param int flows: number of autoregressive transforms.
    :param hidden: hidden sizes of each transform's MADE network; each must be at least z_dim.
    """

    def __init__(self, z_dim: int, flows: int = 2, hidden: Sequence[int] = (256, 256)):
        super().__init__(z_dim)
        self.flows = check_positive("flows (the number of flow transforms)", flows)
        hidden = check_flow_hidden(self.z_dim, hidden)
        self.register_buffer("loc", torch.zeros(self.z_dim))
        self.register_buffer("scale", torch.ones(self.z_dim))
        order = torch.arange(self.z_dim)
        self.transforms = nn.ModuleList(
            T.AffineAutoregressive(
                AutoRegressiveNN(
                    self.z_dim, hidden, permutation=order if i % 2 == 0 else order.flip(0)
                )
            )
            for i in range(self.flows)
        )

    def forward(self) -> dist.TransformedDistribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)  # event (z_dim,)
        return dist.TransformedDistribution(base, [t.inv for t in self.transforms])


def check_flow_hidden(z_dim: int, hidden: Sequence[int]) -> list[int]:
    """The hidden sizes of an autoregressive network on ``z_dim`` inputs, checked.

    :raises ValueError: for z_dim < 2, no hidden layer, or a layer narrower than z_dim.
    """
    if z_dim < 2:
        raise ValueError(
            f"flows need z_dim >= 2 (an autoregressive flow on 1 number is affine), got {z_dim}"
        )
    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < z_dim:
        raise ValueError(
            f"the flow's autoregressive networks need hidden sizes >= z_dim={z_dim}, "
            f"got {tuple(hidden)}"
        )
    return hidden


def _learned_normal(z_dim: int, **_) -> Prior:
    return LearnedNormal(z_dim)


def _standard_normal(z_dim: int, **_) -> Prior:
    return StandardNormal(z_dim)


def _mog(z_dim: int, components: int = 10, **_) -> Prior:
    return MixtureOfGaussians(z_dim, components)


def _vampprior(z_dim: int, components: int = 500, x_shape=None, **_) -> Prior:
    return VampPrior(z_dim, components, x_shape)


def _flow(z_dim: int, flows: int = 2, hidden: Sequence[int] = (256, 256), **_) -> Prior:
    return FlowPrior(z_dim, flows, hidden)


#: The priors the CLI and configs know by name: name -> factory ``(z_dim, **options)``. The
#: options are ``components`` (mog, vampprior), ``x_shape`` (vampprior), ``flows`` and
#: ``hidden`` (flow); a factory ignores the options it does not take.
PRIORS: dict[str, Callable[..., Prior]] = {
    "normal": _standard_normal,
    "learned": _learned_normal,
    "mog": _mog,
    "vampprior": _vampprior,
    "flow": _flow,
}


def make_prior(name: str, z_dim: int, **options) -> Prior:
    """Build a prior by its name in :data:`PRIORS`.

    :param str name: ``normal``, ``learned``, ``mog``, ``vampprior`` or ``flow``.
    :param int z_dim: dimension of the latent code.
    :param options: ``components``, ``x_shape``, ``flows``, ``hidden`` (see :data:`PRIORS`).
    :raises ValueError: for an unknown name (the message lists the choices) or a bad option.
    """
    try:
        factory = PRIORS[name]
    except KeyError:
        raise ValueError(f"unknown prior {name!r}; choose from {', '.join(PRIORS)}") from None
    return factory(z_dim, **options)


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
