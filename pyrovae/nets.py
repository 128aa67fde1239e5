"""Encoder and decoder networks.

Encoders map images ``(..., *x_shape)`` to the parameters ``(loc, scale)`` of q(z|x), each
``(..., z_dim)``. Decoders map codes ``(..., z_dim)`` to ``(..., num_params, *x_shape)``, the
numbers a :class:`~pyrovae.likelihoods.Likelihood` reads. Both accept any number of leading batch
dimensions, so Pyro can vectorize particles over them.

References:
  [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018 (GatedDense).
  [2] K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  [3] A. Odena, V. Dumoulin, C. Olah, "Deconvolution and Checkerboard Artifacts", Distill 2016
      (nearest-neighbour up-sampling then convolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "GatedDense",
    "MLP",
    "GaussianHead",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "ResidualDown",
    "ResidualUp",
    "ResConvEncoder",
    "ResConvDecoder",
    "conv_sizes",
    "NETS",
]

#: Activations known by name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}"
        ) from None


class GatedDense(nn.Module):
    """A gated dense layer h(x) · σ(g(x)), as in the VampPrior paper [1].

    :param int in_features: input size.
    :param int out_features: output size.
    :param activation: optional module applied to h(x).
    """

    def __init__(self, in_features: int, out_features: int, activation: nn.Module | None = None):
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h(x)
        if self.activation is not None:
            h = self.activation(h)
        return h * torch.sigmoid(self.g(x))


class MLP(nn.Sequential):
    """Hidden layers (dense + activation, or gated dense) followed by nothing: a feature trunk.

    :param int in_features: input size.
    :param hidden: hidden layer sizes, e.g. ``(400,)`` or ``(300, 300)``.
    :param str activation: a name in :data:`ACTIVATIONS`.
    :param bool gated: use :class:`GatedDense` layers (the gate replaces the activation).
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], activation: str = "relu", gated=False
    ):
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {tuple(hidden)}")
        _activation(activation)  # validate the name
        layers: list[nn.Module] = []
        for h in hidden:
            if gated:
                layers.append(GatedDense(in_features, int(h)))
            else:
                layers += [nn.Linear(in_features, int(h)), _activation(activation)]
            in_features = int(h)
        super().__init__(*layers)
        self.out_features = in_features


class GaussianHead(nn.Module):
    """Features ``(..., F)`` to the ``loc`` and ``scale`` ``(..., z_dim)`` of a diagonal
    Gaussian; a softplus keeps the scale positive and smooth.

    :param int in_features: F.
    :param int z_dim: the Gaussian's size.
    """

    def __init__(self, in_features: int, z_dim: int):
        super().__init__()
        self.loc = nn.Linear(in_features, z_dim)
        self.scale = nn.Linear(in_features, z_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), F.softplus(self.scale(h)) + 1e-5


class MLPEncoder(nn.Module):
    """q(z|x) parameters from a dense network on the flattened image.

    :param x_shape: image shape, e.g. ``(1, 28, 28)``.
    :param int z_dim: latent size.
    :param hidden: hidden sizes.
    :param str activation: activation name.
    :param bool gated: gated dense layers.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        gated: bool = False,
    ):
        super().__init__()
        self.x_shape = tuple(int(s) for s in x_shape)
        self.trunk = MLP(math.prod(self.x_shape), hidden, activation, gated)
        self.head = GaussianHead(self.trunk.out_features, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x.flatten(-len(self.x_shape)))  # (..., D) -> (..., H)
        return self.head(h)  # (..., z_dim) each


class MLPDecoder(nn.Module):
    """Likelihood parameters from a dense network on z.

    :param x_shape: image shape.
    :param int z_dim: latent size.
    :param hidden: hidden sizes (usually the encoder's, reversed).
    :param str activation: activation name.
    :param bool gated: gated dense layers.
    :param int num_params: numbers per pixel the likelihood needs.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        gated: bool = False,
        num_params: int = 1,
    ):
        super().__init__()
        self.x_shape = tuple(int(s) for s in x_shape)
        self.z_dim = int(z_dim)
        self.num_params = int(num_params)
        self.trunk = MLP(self.z_dim, hidden, activation, gated)
        self.out = nn.Linear(self.trunk.out_features, self.num_params * math.prod(self.x_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.out(self.trunk(z))  # (..., P * D)
        return out.unflatten(-1, (self.num_params, *self.x_shape))  # (..., P, *x_shape)


def _conv_shape(x_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(x_shape) != 3 or x_shape[1] % 4 or x_shape[2] % 4:
        raise ValueError(
            f"the CNN networks need images of shape (C, H, W) with H and W divisible by 4, "
            f"got {tuple(x_shape)}"
        )
    return int(x_shape[0]), int(x_shape[1]), int(x_shape[2])


class ConvEncoder(nn.Module):
    """q(z|x) parameters from two stride-2 convolutions (28×28 → 14×14 → 7×7) and a dense layer.

    :param x_shape: ``(C, H, W)`` with H, W divisible by 4.
    :param int z_dim: latent size.
    :param int channels: channels of the first convolution (the second has twice as many).
    :param int hidden: size of the dense layer.
    :param str activation: activation name.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        channels: int = 32,
        hidden: int = 256,
        activation: str = "relu",
    ):
        super().__init__()
        c, h, w = _conv_shape(x_shape)
        self.x_shape = (c, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 4, stride=2, padding=1),  # (C, H, W) -> (ch, H/2, W/2)
            _activation(activation),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),  # -> (2ch, H/4, W/4)
            _activation(activation),
            nn.Flatten(),
            nn.Linear(2 * channels * (h // 4) * (w // 4), hidden),
            _activation(activation),
        )
        self.head = GaussianHead(hidden, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[:-3]
        h = self.features(x.reshape(-1, *self.x_shape))  # (B, hidden)
        loc, scale = self.head(h)
        return loc.reshape(*batch, -1), scale.reshape(*batch, -1)  # (..., z_dim) each


class ConvDecoder(nn.Module):
    """Likelihood parameters from a dense layer and two up-sampling convolutions (7 → 14 → 28).

    Nearest-neighbour up-sampling followed by a 3×3 convolution avoids the checkerboard artefacts
    of transposed convolutions.

    :param x_shape: ``(C, H, W)`` with H, W divisible by 4.
    :param int z_dim: latent size.
    :param int channels: channels after the dense layer's reshape (halved by each up-sampling).
    :param str activation: activation name.
    :param int num_params: numbers per pixel the likelihood needs.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        channels: int = 64,
        activation: str = "relu",
        num_params: int = 1,
    ):
        super().__init__()
        c, h, w = _conv_shape(x_shape)
        self.x_shape = (c, h, w)
        self.z_dim = int(z_dim)
        self.num_params = int(num_params)
        self.net = nn.Sequential(
            nn.Linear(self.z_dim, channels * (h // 4) * (w // 4)),
            _activation(activation),
            nn.Unflatten(1, (channels, h // 4, w // 4)),
            nn.Upsample(scale_factor=2, mode="nearest"),  # -> (ch, H/2, W/2)
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            _activation(activation),
            nn.Upsample(scale_factor=2, mode="nearest"),  # -> (ch/2, H, W)
            nn.Conv2d(channels // 2, channels // 2, 3, padding=1),
            _activation(activation),
            nn.Conv2d(channels // 2, self.num_params * c, 3, padding=1),  # -> (P*C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, self.z_dim))  # (B, P*C, H, W)
        return out.reshape(*batch, self.num_params, *self.x_shape)  # (..., P, C, H, W)


def conv_sizes(x_shape: Sequence[int], downsamplings: int) -> list[tuple[int, int]]:
    """Spatial sizes ``[(H, W), (⌈H/2⌉, ⌈W/2⌉), ...]`` after each stride-2 down-sampling.

    :raises ValueError: unless ``x_shape`` is ``(C, H, W)``.
    """
    if len(x_shape) != 3 or min(int(s) for s in x_shape) < 1:
        raise ValueError(
            f"the conv networks need images of shape (C, H, W), got {tuple(x_shape)}; use --net "
            "mlp for other shapes"
        )
    h, w = int(x_shape[1]), int(x_shape[2])
    sizes = [(h, w)]
    for _ in range(downsamplings):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def _widths(widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(int(c) for c in widths)
    if not widths or min(widths) < 1:
        raise ValueError(f"conv widths must be positive integers, got {widths}")
    return widths


class ResidualDown(nn.Module):
    """A residual block [2] that halves the resolution (rounding up, so any size works):
    ``act(conv3×3(act(conv3×3/2(x))) + conv1×1/2(x))``.

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param str activation: activation name.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str = "relu"):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
            _activation(activation),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=2)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.main(x) + self.skip(x))  # (B, C', ⌈H/2⌉, ⌈W/2⌉)


class ResidualUp(nn.Module):
    """A residual block [2] that up-samples to ``size`` (nearest neighbour [3]) and then
    convolves: ``act(conv3×3(act(conv3×3(u))) + conv1×1(u))``, ``u`` the up-sampled input.

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param size: the output's ``(H, W)``.
    :param str activation: activation name.
    """

    def __init__(self, in_channels: int, out_channels: int, size, activation: str = "relu"):
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _activation(activation),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.interpolate(x, size=self.size, mode="nearest")  # (B, C, *size)
        return self.act(self.main(u) + self.skip(u))  # (B, C', *size)


class ResConvEncoder(nn.Module):
    """q(z|x) parameters from a residual CNN for images of any ``(C, H, W)``: a 3×3 stem, one
    :class:`ResidualDown` block per width (each halves H and W, rounding up), and a dense layer.

    :param x_shape: ``(C, H, W)``, e.g. ``(3, 32, 32)`` or ``(1, 28, 28)``.
    :param int z_dim: latent size.
    :param widths: channels of the blocks, e.g. ``(32, 64)`` (two down-samplings).
    :param int hidden: size of the dense layer.
    :param str activation: activation name.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        widths: Sequence[int] = (32, 64),
        hidden: int = 256,
        activation: str = "relu",
    ):
        super().__init__()
        widths = _widths(widths)
        sizes = conv_sizes(x_shape, len(widths))
        self.x_shape = tuple(int(s) for s in x_shape)
        ins = (widths[0], *widths[:-1])
        self.features = nn.Sequential(
            nn.Conv2d(self.x_shape[0], widths[0], 3, padding=1),  # (C, H, W) -> (w0, H, W)
            _activation(activation),
            *(ResidualDown(i, o, activation) for i, o in zip(ins, widths, strict=True)),
            nn.Flatten(),
            nn.Linear(widths[-1] * math.prod(sizes[-1]), int(hidden)),
            _activation(activation),
        )
        self.head = GaussianHead(int(hidden), z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[:-3]
        h = self.features(x.reshape(-1, *self.x_shape))  # (B, hidden)
        loc, scale = self.head(h)
        return loc.reshape(*batch, -1), scale.reshape(*batch, -1)  # (..., z_dim) each


class ResConvDecoder(nn.Module):
    """Likelihood parameters from z by the mirror of :class:`ResConvEncoder`: a dense layer, a
    reshape to the encoder's smallest resolution, one :class:`ResidualUp` block per width (back
    to the encoder's sizes exactly, odd ones included), and a 3×3 convolution to
    ``num_params · C`` channels.

    :param x_shape: ``(C, H, W)``.
    :param int z_dim: latent size.
    :param widths: the encoder's block channels (used in reverse).
    :param int hidden: size of the dense layer.
    :param str activation: activation name.
    :param int num_params: numbers per pixel the likelihood needs.
    """

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        widths: Sequence[int] = (32, 64),
        hidden: int = 256,
        activation: str = "relu",
        num_params: int = 1,
    ):
        super().__init__()
        widths = _widths(widths)
        sizes = conv_sizes(x_shape, len(widths))
        self.x_shape = tuple(int(s) for s in x_shape)
        self.z_dim = int(z_dim)
        self.num_params = int(num_params)
        outs = (widths[0], *widths[:-1])
        ups = [
            ResidualUp(widths[i], outs[i], sizes[i], activation)
            for i in reversed(range(len(widths)))
        ]
        self.net = nn.Sequential(
            nn.Linear(self.z_dim, int(hidden)),
            _activation(activation),
            nn.Linear(int(hidden), widths[-1] * math.prod(sizes[-1])),
            _activation(activation),
            nn.Unflatten(1, (widths[-1], *sizes[-1])),  # (w_last, H_L, W_L)
            *ups,  # -> (w0, H, W)
            nn.Conv2d(widths[0], self.num_params * self.x_shape[0], 3, padding=1),  # (P*C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, self.z_dim))  # (B, P*C, H, W)
        return out.reshape(*batch, self.num_params, *self.x_shape)  # (..., P, C, H, W)


def _mlp_pair(x_shape, z_dim, hidden, activation, gated, num_params, widths=None):
    # widths are the conv networks' option; the MLPs take their sizes from hidden
    return (
        MLPEncoder(x_shape, z_dim, hidden, activation, gated),
        MLPDecoder(x_shape, z_dim, tuple(reversed(hidden)), activation, gated, num_params),
    )


def _conv_pair(x_shape, z_dim, hidden, activation, gated, num_params, widths=(32, 64)):
    if gated:
        raise ValueError("gated layers are for the MLP networks; the CNN networks take gated=False")
    width = int(hidden[0]) if hidden else 256
    widths = (32, 64) if widths is None else widths
    return (
        ResConvEncoder(x_shape, z_dim, widths, width, activation),
        ResConvDecoder(x_shape, z_dim, widths, width, activation, num_params),
    )


#: Encoder/decoder families known by name: name -> builder of ``(encoder, decoder)`` taking
#: ``(x_shape, z_dim, hidden, activation, gated, num_params, widths)``. ``conv`` is the residual
#: CNN (:class:`ResConvEncoder`, :class:`ResConvDecoder`) with blocks of ``widths`` channels and
#: a dense layer of ``hidden[0]``; ``mlp`` ignores ``widths``.
NETS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "mlp": _mlp_pair,
    "conv": _conv_pair,
}
