"""Likelihoods p(x|z): turn the decoder's output into a distribution over whole images.

The decoder returns ``num_params`` numbers per pixel, laid out as ``(..., num_params, *x_shape)``;
a likelihood reads them and returns a distribution whose event shape is ``x_shape`` (all pixels of
one image are one event). The distributions are built with ``validate_args=False``: the data are
checked once, by :meth:`Likelihood.check_support`, instead of on every step.

For 8-bit images (pixel values k/255, k = 0..255, as pyrovae's loaders give them) the discretized
likelihoods put a probability mass on each of the 256 values, so log p(x) is a log-probability
and bits per dimension, −log₂ p(x) / (C·H·W), is meaningful (:attr:`Likelihood.levels`).

References:
  [1] T. Salimans, A. Karpathy, X. Chen, D. P. Kingma, "PixelCNN++: Improving the PixelCNN with
      Discretized Logistic Mixture Likelihood and Other Modifications", ICLR 2017.
  [2] R. Child, "Very Deep VAEs Generalize Autoregressive Models and Can Outperform Them on
      Images", ICLR 2021 (VDVAE; the discretized logistic mixture as a VAE's p(x|z)).
  [3] J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020
      (the discretized Gaussian decoder).
  [4] G. Loaiza-Ganem, J. P. Cunningham, "The continuous Bernoulli: fixing a pervasive error in
      variational autoencoders", NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch.distributions import constraints

__all__ = [
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "LearnedGaussian",
    "ContinuousBernoulli",
    "DiscretizedGaussian",
    "DiscretizedLogisticMixture",
    "DiscretizedNormal",
    "DiscretizedLogisticMixtureDistribution",
    "LEVELS",
    "on_grid",
    "check_8bit",
    "bits_per_dim",
    "LIKELIHOODS",
    "make_likelihood",
]


class Likelihood(PyroModule):
    """Base class: ``forward(params, event_dim)`` returns p(x|z) given the decoder's output."""

    num_params: int = 1
    """Numbers the decoder must produce per pixel."""

    levels: int | None = None
    """The number of pixel values p(x|z) puts probability mass on (256 for the discretized
    likelihoods), or ``None`` for a density. With a mass, log p(x) ≤ 0 and bits per dimension
    are reported."""

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`ValueError` if ``x`` holds values this likelihood cannot score."""

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        """The mean of p(x|z), of shape ``(..., *x_shape)``."""
        return self(params, event_dim).mean


def _outside_unit(x: torch.Tensor) -> torch.Tensor:
    return (x < 0) | (x > 1) | x.isnan()


def _param(params: torch.Tensor, event_dim: int, i: int) -> torch.Tensor:
    # params: (..., num_params, *x_shape) -> the i-th: (..., *x_shape)
    return params.select(-event_dim - 1, i)


#: Values checked at a time by the support checks: no temporary the size of the data is made
#: (a split of 4.5 GiB once needed five times that to check).
CHECK_CHUNK = 2**22


def first_bad(x: torch.Tensor, is_bad: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
    """The first value of ``x`` for which ``is_bad`` (elementwise, bool) holds, or ``None``;
    checked :data:`CHECK_CHUNK` values at a time, with one host sync when all are good."""
    flat = x.reshape(-1)  # (numel,)
    found = torch.zeros((), dtype=torch.bool, device=x.device)
    for chunk in flat.split(CHECK_CHUNK):
        found |= is_bad(chunk).any()
    if not bool(found):
        return None
    for chunk in flat.split(CHECK_CHUNK):
        bad = is_bad(chunk)
        if bool(bad.any()):
            return chunk[bad][0].item()
    return None


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
            value = first_bad(x, _outside_unit)
            if value is not None:
                raise ValueError(
                    "the Bernoulli likelihood needs pixel values in [0, 1], but the data has "
                    f"values such as {value:.4g}"
                )
            return
        value = first_bad(x, lambda c: (c != 0) & (c != 1))
        if value is not None:
            raise ValueError(
                "the Bernoulli likelihood needs binary pixels (0 or 1), but the data has values "
                f"such as {value:.4g}: binarize the data (--binarize "
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
    pixel = dist.Normal  # the per-pixel distribution of (loc, scale)

    def __init__(self, min_scale: float = 1e-3):
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale}")
        super().__init__()
        self.min_scale = float(min_scale)

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        loc = _param(params, event_dim, 0)  # (..., *x_shape)
        scale = F.softplus(_param(params, event_dim, 1)) + self.min_scale  # (..., *x_shape)
        return self.pixel(loc, scale, validate_args=False).to_event(event_dim)

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return _param(params, event_dim, 0)


class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli pixels [4]: a normalized density on [0, 1] with logits from the
    decoder, for grey values (the Bernoulli cross-entropy on grey values is not a density).

    Its mean is not sigmoid(logits); :meth:`mean` returns the true mean, which is what the
    reconstructions and samples show.
    """

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        logits = _param(params, event_dim, 0)  # (..., *x_shape)
        return dist.ContinuousBernoulli(logits=logits, validate_args=False).to_event(event_dim)

    def check_support(self, x: torch.Tensor) -> None:
        value = first_bad(x, _outside_unit)
        if value is not None:
            raise ValueError(
                "the continuous-bernoulli likelihood needs pixel values in [0, 1], but the data "
                f"has values such as {value:.4g}"
            )


# ---------------------------------------------------------------------------------------------
# 8-bit pixels: probability masses on the values k/255.

#: Values of an 8-bit pixel: k/255 for k = 0..255.
LEVELS = 256
_HALF_BIN = 0.5 / (LEVELS - 1)  # half the distance between neighbouring values


def on_grid(x: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    """Which values of ``x`` lie on the grid k/(levels − 1), k = 0..levels − 1 (bool, same
    shape; float32 rounding is tolerated)."""
    k = x * (levels - 1)
    return (x >= 0) & (x <= 1) & ((k - k.round()).abs() < 1e-3)


def check_8bit(x: torch.Tensor, name: str) -> None:
    """Raise :class:`ValueError` naming the likelihood ``name`` unless ``x`` is on the 8-bit
    grid."""
    value = first_bad(x, lambda c: ~on_grid(c))
    if value is not None:
        raise ValueError(
            f"the {name} likelihood needs 8-bit pixels (values k/255 in [0, 1]), but the data "
            f"has values such as {value:.6g}; use --likelihood gaussian "
            "or continuous-bernoulli for data that is not 8-bit"
        )


def bits_per_dim(log_px: torch.Tensor, x_shape) -> torch.Tensor:
    """−log₂ p(x) / D per datapoint, D the number of pixel values (C·H·W) of one datapoint:
    the usual score of image models with 8-bit likelihoods (8 for a uniform mass on 256 values).

    :param log_px: log p(x) in nats, e.g. ``(N,)`` from :func:`pyrovae.log_likelihood`.
    :param x_shape: the shape of one datapoint, e.g. ``(3, 32, 32)``.
    """
    return -log_px / (math.prod(x_shape) * math.log(2))


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    # log(1 − exp(−d)) for d > 0, accurate for small and large d (Mächler 2012)
    return torch.where(
        d < math.log(2), torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d.clamp(min=1e-30)))
    )


def _quantize(v: torch.Tensor) -> torch.Tensor:
    # continuous values -> the nearest 8-bit value k/255 in [0, 1]
    return (v * (LEVELS - 1)).round().clamp(0, LEVELS - 1) / (LEVELS - 1)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the bins of value 0 and of value 1 reach to −∞ and +∞
    return x < _HALF_BIN, x > 1 - _HALF_BIN


def _clamped_logistic_mean(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # E[clamp(Y, 0, 1)], Y ~ logistic(loc, scale): ∫_0^1 P(Y > t) dt
    #   = 1 − s · (softplus((1 − loc)/s) − softplus(−loc/s))
    return 1 - scale * (F.softplus((1 - loc) / scale) - F.softplus(-loc / scale))


#: How far beyond the value an end bin reaches, in pixel units: "infinity" for the logistic (its
#: mass there is 1 to float precision for any location within ±10⁵), but finite, so that no
#: gradient meets 0 × ∞.
_FAR = 1e6


def _bin_edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # how far each value's bin reaches (up, down, their sum): the bin is [x − down, x + up];
    # the bin of 0 reaches down and the bin of 1 up by _FAR (x's shape each)
    low, high = _edges(x)
    up = torch.full_like(x, _HALF_BIN).masked_fill_(high, _FAR)  # in x's dtype
    down = torch.full_like(x, _HALF_BIN).masked_fill_(low, _FAR)
    return up, down, up + down


def _logistic_mass_parts(
    x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, edges
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(x) = A + log R of a logistic(loc, scale) discretized to x's bin, with A ≤ 0 and R
    in (0, 1] of moderate size: a mixture sums e^A·R over its components and takes one
    logarithm per pixel, not one per component (logarithms are the costly part of scoring).

    With a and b the bin's upper and lower edge in units of s, the mass is
    σ(a) − σ(b) = σ(a) σ(−b) (1 − e^(b − a)), and σ(y) = e^(min(y, 0)) σ(|y|), so
    A = min(a, 0) + min(−b, 0) and R = σ(|a|) σ(|b|) (1 − e^(−(a − b))); the end bins reach
    :data:`_FAR` beyond their value, where σ is 1. ``edges`` are :func:`_bin_edges` of x.
    Shapes broadcast; all (..., C, S) here.
    """
    up, down, width = edges
    inv = scale.reciprocal()
    centred = x - loc
    a = (centred + up) * inv  # the upper edge
    b = (centred - down) * inv  # the lower edge (not a − width/s: a may be huge)
    log_scale = a.clamp(max=0) - b.clamp(min=0)
    factor = torch.sigmoid(a.abs()) * torch.sigmoid(b.abs()) * -torch.expm1(-width * inv)
    return log_scale, factor


def _normal_log_mass(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # log(Φ(u) − Φ(l)), computed in the lower tail (mirrored when the bin lies above the mean)
    u = (x - loc + _HALF_BIN) / scale
    lo = (x - loc - _HALF_BIN) / scale
    flip = (u + lo) > 0
    hi_, lo_ = torch.where(flip, -lo, u), torch.where(flip, -u, lo)
    log_hi = torch.special.log_ndtr(hi_)
    interior = log_hi + _log1mexp((log_hi - torch.special.log_ndtr(lo_)).clamp(min=1e-30))
    low, high = _edges(x)
    return torch.where(
        low, torch.special.log_ndtr(u), torch.where(high, torch.special.log_ndtr(-lo), interior)
    )


class DiscretizedNormal(dist.TorchDistribution):
    """A normal N(loc, scale²) discretized to the 256 values k/255 of an 8-bit pixel [3]: value
    k gets the normal's mass on its bin [k/255 − 1/510, k/255 + 1/510], and the end values 0 and
    1 get the tails. Elementwise (use ``.to_event`` for images).

    :param torch.Tensor loc: location, in pixel units ([0, 1]).
    :param torch.Tensor scale: scale (> 0), broadcastable with ``loc``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return DiscretizedNormal(self.loc.expand(shape), self.scale.expand(shape), False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return _normal_log_mass(value, self.loc, self.scale)  # (batch)

    @property
    def mean(self) -> torch.Tensor:
        """The location clamped to [0, 1] (the mean up to the discretization and the tails)."""
        return self.loc.clamp(0, 1)

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
            return _quantize(self.loc + self.scale * eps)


class DiscretizedLogisticMixtureDistribution(dist.TorchDistribution):
    """A per-pixel mixture of K discretized logistics over the 8-bit values of whole images
    ``(C, *spatial)``, with the channels of a pixel coupled as in PixelCNN++ [1]: under
    component k, channel c has location ``loc[k, c] + coeff[k, c] · x[c − 1]``, so one pixel's
    channels are drawn in order and the mixture weight is shared by them.

    PixelCNN++ couples blue to both red and green; here each channel is coupled to the one
    before it (G to R, B to G), so every channel takes the same number of decoder outputs.

    :param logits: mixture logits ``(..., K, S)``, S the pixels per channel.
    :param locs: locations ``(..., K, C, S)``.
    :param scales: scales ``(..., K, C, S)`` (> 0).
    :param coeffs: coupling coefficients ``(..., K, C − 1, S)``.
    :param event_shape: the image shape, ``(C, *spatial)`` with C·S elements.
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, logits, locs, scales, coeffs, event_shape, validate_args=None):
        self.logits, self.locs, self.scales, self.coeffs = logits, locs, scales, coeffs
        batch_shape = torch.broadcast_shapes(
            logits.shape[:-2], locs.shape[:-3], scales.shape[:-3], coeffs.shape[:-3]
        )
        super().__init__(batch_shape, torch.Size(event_shape), validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.unit_interval, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        grow = lambda t, n: t.expand(shape + t.shape[-n:])  # noqa: E731
        return DiscretizedLogisticMixtureDistribution(
            grow(self.logits, 2), grow(self.locs, 3), grow(self.scales, 3),
            grow(self.coeffs, 3), self.event_shape, False,
        )  # fmt: skip

    def _split(self, value: torch.Tensor) -> torch.Tensor:
        # (..., *event_shape) -> (..., 1, C, S): channels of each pixel, a mixture axis of 1
        c = self.locs.shape[-2]
        return value.reshape(*value.shape[: value.dim() - len(self.event_shape)], 1, c, -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # log Σ_k π_k P_k(x) per pixel, one component at a time (temporaries (..., C, S), no
        # tensor with a mixture axis), as a running log-sum-exp of e^(logit_k + A_k) R_k
        # (_logistic_mass_parts): the exponentials are cheap, and the one logarithm per pixel
        # comes at the end; then − logsumexp_k(logit_k) normalizes the weights.
        x = self._split(value)[..., 0, :, :]  # (..., C, S)
        edges = _bin_edges(x)  # (..., C, S) each
        top, total = self._component(x, 0, edges)  # (..., S): the running max and sum
        for i in range(1, self.locs.shape[-3]):
            a, r = self._component(x, i, edges)
            new_top = torch.maximum(top, a)
            total = total * (top - new_top).exp() + r * (a - new_top).exp()
            top = new_top
        return (top + total.log() - self.logits.logsumexp(-2)).sum(-1)  # (...)

    def _component(self, x: torch.Tensor, i: int, edges) -> tuple[torch.Tensor, torch.Tensor]:
        # component i's logit_i + log P_i(x) as (A, R) with the channels' parts combined: (..., S)
        loc = self.locs[..., i, :, :]  # (..., C, S)
        if loc.shape[-2] > 1:  # channel c's location moves with the value of channel c − 1
            loc = loc + F.pad(self.coeffs[..., i, :, :] * x[..., :-1, :], (0, 0, 1, 0))
        a, r = _logistic_mass_parts(x, loc, self.scales[..., i, :, :], edges)  # (..., C, S)
        if a.shape[-2] == 1:  # one channel: nothing to combine
            return a[..., 0, :] + self.logits[..., i, :], r[..., 0, :]
        return a.sum(-2) + self.logits[..., i, :], r.prod(-2)

    @property
    def mean(self) -> torch.Tensor:
        """Σ_k π_k m_k per pixel, m_k the mean of component k's logistic clamped to [0, 1]
        (exact up to the rounding to 8-bit values); a coupled channel is evaluated at the mean
        m_k of the channel before it."""
        c = self.locs.shape[-2]
        m = [_clamped_logistic_mean(self.locs[..., 0, :], self.scales[..., 0, :])]  # (..., K, S)
        for i in range(1, c):
            loc = self.locs[..., i, :] + self.coeffs[..., i - 1, :] * m[-1]
            m.append(_clamped_logistic_mean(loc, self.scales[..., i, :]))
        weights = self.logits.softmax(-2).unsqueeze(-2)  # (..., K, 1, S)
        mean = (weights * torch.stack(m, dim=-2)).sum(-3)  # (..., C, S)
        return mean.reshape(*mean.shape[:-2], *self.event_shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            logits = self.logits.expand(shape + self.logits.shape[-2:])  # (..., K, S)
            k = torch.distributions.Categorical(logits=logits.transpose(-1, -2)).sample()
            index = k[..., None, None, :]  # (..., 1, 1, S): the component of each pixel

            def pick(t):  # (..., K, C', S) -> (..., C', S) of the chosen components
                t = t.expand(shape + t.shape[-3:])
                return t.gather(-3, index.expand(*shape, 1, *t.shape[-2:])).squeeze(-3)

            locs, scales, coeffs = pick(self.locs), pick(self.scales), pick(self.coeffs)
            u = torch.rand_like(locs).clamp(1e-5, 1 - 1e-5)
            noise = scales * (u.log() - (-u).log1p())  # logistic(0, s): (..., C, S)
            x = [_quantize(locs[..., 0, :] + noise[..., 0, :])]
            for i in range(1, locs.shape[-2]):
                shifted = locs[..., i, :] + coeffs[..., i - 1, :] * x[-1]
                x.append(_quantize(shifted + noise[..., i, :]))
            return torch.stack(x, dim=-2).reshape(*shape, *self.event_shape)


class DiscretizedGaussian(LearnedGaussian):
    """Discretized Gaussian pixels [3]: N(f(z), diag g(z)²) discretized to the 256 values of
    8-bit pixels (:class:`DiscretizedNormal`), so p(x|z) is a probability mass. The decoder's
    outputs are read as by :class:`LearnedGaussian`.

    :param float min_scale: floor added to ``softplus`` of the decoder's scale output.
    """

    pixel = DiscretizedNormal
    levels = LEVELS

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return _param(params, event_dim, 0).clamp(0, 1)

    def check_support(self, x: torch.Tensor) -> None:
        check_8bit(x, "discretized-gaussian")


class DiscretizedLogisticMixture(Likelihood):
    """A per-pixel mixture of discretized logistics over 8-bit values, with channel coupling for
    colour images, as in PixelCNN++ [1] and VDVAE [2]
    (:class:`DiscretizedLogisticMixtureDistribution`).

    The decoder gives ``3 · mixtures`` numbers per channel of each pixel: for channel 0 the
    mixture logits, for channel c > 0 the coupling coefficients to channel c − 1 (through tanh);
    then the locations; then the scales (through softplus, plus ``min_scale``). Images are
    ``(C, H, W)``; other shapes are one channel.

    :param int mixtures: K, logistic components per pixel.
    :param float min_scale: floor of the scales (pixel units; a bin is 1/255 wide).
    """

    levels = LEVELS

    def __init__(self, mixtures: int = 10, min_scale: float = 1e-3):
        if isinstance(mixtures, bool) or int(mixtures) != mixtures or mixtures < 1:
            raise ValueError(f"mixtures must be an integer >= 1, got {mixtures}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale}")
        super().__init__()
        self.mixtures = int(mixtures)
        self.num_params = 3 * self.mixtures
        self.min_scale = float(min_scale)

    def forward(self, params: torch.Tensor, event_dim: int) -> dist.TorchDistribution:
        x_shape = params.shape[params.dim() - event_dim :]
        c = x_shape[0] if event_dim == 3 else 1
        p = params.reshape(*params.shape[: -event_dim - 1], 3, self.mixtures, c, -1)
        first, locs, raw = p.unbind(-4)  # (..., K, C, S) each
        logits = first[..., 0, :]  # (..., K, S)
        coeffs = torch.tanh(first[..., 1:, :])  # (..., K, C - 1, S)
        scales = F.softplus(raw) + self.min_scale  # (..., K, C, S)
        return DiscretizedLogisticMixtureDistribution(
            logits, locs, scales, coeffs, x_shape, validate_args=False
        )

    def mean(self, params: torch.Tensor, event_dim: int) -> torch.Tensor:
        return self(params, event_dim).mean

    def check_support(self, x: torch.Tensor) -> None:
        check_8bit(x, "discretized-logistic")


#: The likelihoods the CLI and configs know by name.
LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "gaussian-learned": LearnedGaussian,
    "continuous-bernoulli": ContinuousBernoulli,
    "discretized-gaussian": DiscretizedGaussian,
    "discretized-logistic": DiscretizedLogisticMixture,
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
