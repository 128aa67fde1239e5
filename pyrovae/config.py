"""One small config for a training run, and the model it describes.

Each :class:`Config` field declares, once, what it means (its help), its default, the names it
may take and the range of its values (a :class:`Setting` in the field's metadata).
:meth:`Config.validate` checks against these declarations, and ``pyrovae train`` builds its
options from them (``--z-dim`` for ``z_dim``, with the same default, choices and help). This module
imports neither torch nor Pyro until :func:`build_vae` is called, so the command's ``--help``
stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from . import choices
from .choices import STREAM

if TYPE_CHECKING:
    from .hvae import HVAE
    from .vae import VAE, BaseVAE

__all__ = ["Config", "Setting", "build_vae", "MODELS", "STREAM", "MAX_SIZE"]


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
#: Upper bound of a network size (a guard against typos that would exhaust memory).
MAX_SIZE = 1 << 20


@dataclass(frozen=True)
class Setting:
    """What one :class:`Config` field means and which values it takes; the field's metadata
    ``"setting"``. A tuple field's bounds hold for each of its values.

    :param help: one line saying what the setting does (``pyrovae train --help`` shows it).
    :param choices: the values it may take (none: any of its type).
    :param low: its smallest value (none: unbounded).
    :param high: its largest value (none: unbounded).
    :param low_open: ``low`` itself is excluded.
    :param high_open: ``high`` itself is excluded.
    :param unset: what ``None`` means, for a field that may be ``None`` (shown as its default).
    :param label: a few words naming it in errors, beside the key.
    """

    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unset: str | None = None
    label: str | None = None

    def check(self, key: str, value: Any, integer: bool) -> None:
        """Raise a one-line error naming ``key`` if ``value`` is not one of the choices or out
        of range (``integer``: the field holds integers).

        :raises ValueError: naming the key and the rule broken.
        """
        many = isinstance(value, tuple)
        if many and not value:
            raise ValueError(f"{key} must hold one or more sizes, got []")
        for v in value if many else (value,):
            if self.choices and v not in self.choices:
                options = ", ".join(map(str, self.choices))
                raise ValueError(f"unknown {key} {v!r}; choose from {options}")
            bounded = integer or self.low is not None or self.high is not None
            rule = self._broken(v, integer) if bounded else None
            if rule is None:
                continue
            if many:
                raise ValueError(f"{key} sizes must each be {rule}, got {list(value)}")
            name = f"{key} ({self.label})" if self.label else key
            raise ValueError(f"{name} must be {rule}, got {value!r}")

    def _broken(self, v: Any, integer: bool) -> str | None:
        # the rule v breaks ("a positive integer", "> 0", "<= 1048576", "in [0, 1)"), or None
        try:
            number = not isinstance(v, bool) and (int(v) == v if integer else v == float(v))
        except (TypeError, ValueError, OverflowError):
            number = False
        if not number:  # a NaN lands here too (it equals nothing)
            return self._rule(integer, low=True)
        if self.low is not None and not (v > self.low if self.low_open else v >= self.low):
            return self._rule(integer, low=True)
        if self.high is not None and not (v < self.high if self.high_open else v <= self.high):
            return self._rule(integer, low=False)
        return None

    def _rule(self, integer: bool, low: bool) -> str:
        lo, hi = self.low, self.high
        if not integer and lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if not low:
            return f"< {hi}" if self.high_open else f"<= {hi}"
        if integer:
            return "an integer" if lo is None else "a positive integer" if lo == 1 else \
                f"an integer >= {lo}"  # fmt: skip
        return "a number" if lo is None else f"> {lo}" if self.low_open else f">= {lo}"


def _setting(default: Any, help: str, **rules: Any) -> Any:
    # a dataclass field with its Setting (see Setting for the rules)
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **rules)})


#: Rules shared by several fields: a network size, a share of the images.
_SIZE = {"low": 1, "high": MAX_SIZE}
_FRACTION = {"low": 0, "high": 1, "high_open": True}


def _typed(key: str, value, kind: str):
    # value checked against a field's annotation (as a string: int, float | None, ...)
    base = kind.removesuffix(" | None")
    if value is None and base != kind:
        return None
    if base == "tuple[int, ...]":
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list of integers, got {value!r}")
        return tuple(_typed(key, v, "int") for v in value)
    ok = {
        "int": type(value) is int,
        "float": type(value) in (int, float) and math.isfinite(value),
        "bool": type(value) is bool,
        "str": type(value) is str,
    }[base]
    if not ok:
        raise ValueError(f"{key} must be {_KINDS[base]}, got {value!r}")
    return float(value) if base == "float" else value


@dataclass
class Config:
    """Everything a run needs; saved as ``config.json`` beside the checkpoint. Each field but
    ``x_shape`` is a ``pyrovae train`` option, described by its :class:`Setting`."""

    # data
    dataset: str = _setting("digits", "the images to train on (folder: your own, in the data "
                            "directory)", choices=choices.DATASETS)  # fmt: skip
    data_dir: str | None = _setting(None, "data root (folder: the folder of images)",
                                    unset="$PYROVAE_DATA, else ~/.cache/pyrovae")  # fmt: skip
    binarize: str = _setting("auto", "auto: for a Bernoulli likelihood, threshold digits and "
                             "binarize (M)NIST dynamically",
                             choices=("auto", *choices.BINARIZE))  # fmt: skip
    download: bool = _setting(False, "let torchvision download mnist / fashion-mnist")
    image_size: int | None = _setting(None, "folder: resize (shorter side) and centre-crop to "
                                      "S×S", unset="the images' own size", **_SIZE)  # fmt: skip
    channels: int | None = _setting(None, "folder: convert images to grey (1) or RGB (3)",
                                    choices=(1, 3), unset="the images' own")  # fmt: skip
    skip_bad_files: bool = _setting(False, "folder: skip unreadable files (counted in "
                                    "train.json)")  # fmt: skip
    valid_fraction: float = _setting(0.1, "folder without train/valid/test subfolders: "
                                     "validation share", **_FRACTION)  # fmt: skip
    test_fraction: float = _setting(0.1, "folder without train/valid/test subfolders: test share",
                                    **_FRACTION)  # fmt: skip
    stream: str = _setting("auto", "folder: decode training images in DataLoader workers while "
                           "training (auto: when they would take more than 2 GiB decoded; no: "
                           "decode up front)", choices=STREAM)  # fmt: skip
    workers: int = _setting(1, "folder, streamed: DataLoader worker processes (0: in the "
                            "training one)", low=0, high=256)  # fmt: skip
    # model
    net: str = _setting("mlp", "encoder and decoder networks", choices=choices.NETS)
    hidden: tuple[int, ...] = _setting((256,), "hidden sizes of the encoder (the decoder's are "
                                       "reversed)", **_SIZE)  # fmt: skip
    widths: tuple[int, ...] = _setting((32, 64), "conv: channels of the residual blocks, one "
                                       "per halving", **_SIZE)  # fmt: skip
    gated: bool = _setting(False, "GatedDense layers instead of dense + activation (VampPrior "
                           "paper)")  # fmt: skip
    activation: str = _setting("relu", "the hidden layers' nonlinearity",
                               choices=choices.ACTIVATIONS)  # fmt: skip
    z_dim: int = _setting(8, "latent size (of the top layer z2 for the hvae)", **_SIZE)
    model: str = _setting("vae", "hvae: two stochastic layers, z2 -> z1 -> x",
                          choices=choices.MODELS)  # fmt: skip
    prior: str = _setting("normal", "prior on z (z2 in the hvae)", choices=choices.PRIORS)
    components: int = _setting(500, "K: mixture components (mog) or pseudo-inputs (vampprior)",
                               **_SIZE)  # fmt: skip
    guide: str = _setting("normal", "normal: mean-field Gaussian; flow: IAF on the encoder's "
                          "Gaussian", choices=choices.GUIDES)  # fmt: skip
    flows: int = _setting(2, "autoregressive transforms of the flow prior and the flow guide",
                          **_SIZE)  # fmt: skip
    likelihood: str = _setting("bernoulli", "p(x|z) of a pixel (discretized-*: 8-bit images)",
                               choices=choices.LIKELIHOODS)  # fmt: skip
    variance: float = _setting(0.1, "c of the fixed-variance Gaussian N(f(z), c·I)", low=0,
                               low_open=True)  # fmt: skip
    mixtures: int = _setting(10, "logistic components per pixel (discretized-logistic)", **_SIZE)
    allow_non_binary: bool = _setting(False, "let the Bernoulli likelihood score grey values")
    x_shape: tuple[int, ...] | None = None  # shape of one datapoint; set from the data
    # training
    epochs: int = _setting(60, "passes over the training data", low=1)
    batch_size: int = _setting(64, "images per step", low=1)
    lr: float = _setting(1e-3, "Adam's learning rate", low=0, low_open=True)
    loss: str = _setting("elbo", "elbo (Trace_ELBO), meanfield (closed-form KL), iwae",
                         choices=choices.LOSSES)  # fmt: skip
    particles: int = _setting(1, "samples per datapoint (iwae's k)", **_SIZE)
    beta: float = _setting(1.0, "final KL weight (β-VAE when != 1)", low=0, low_open=True,
                           label="the KL weight")  # fmt: skip
    warmup: int = _setting(0, "KL warm-up epochs: β rises linearly to beta over them", low=0)
    patience: int | None = _setting(None, "stop after N epochs (after warm-up) without a better "
                                    "validation ELBO", low=1, unset="never")  # fmt: skip
    train_limit: int | None = _setting(None, "train on the first N training images", low=1,
                                       unset="all")  # fmt: skip
    seed: int = _setting(0, "fixes the initial weights, the data order and every draw", low=0,
                         high=2**63, high_open=True)  # fmt: skip
    device: str = _setting("auto", "auto (CUDA when there is one), cpu, cuda or cuda:N")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Build from a dict (e.g. parsed JSON), every value type-checked against its field (an
        int means an int: ``8.0`` or ``true`` is refused); unknown keys are an error.

        :raises ValueError: naming the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config is a JSON object of settings, not {type(d).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**{key: _typed(key, value, known[key]) for key, value in d.items()})

    def validate(self) -> None:
        """Check names and sizes before any data is loaded or training starts: each field
        against its :class:`Setting`, then the settings that must agree with each other.

        :raises ValueError: naming the setting.
        """
        for f in fields(self):
            value, setting = getattr(self, f.name), f.metadata.get("setting")
            if setting is not None and not (value is None and f.type.endswith("| None")):
                setting.check(f.name, value, integer="int" in f.type)
        self._check_shape()
        if self.loss == "iwae" and (self.beta != 1 or self.warmup):
            raise ValueError(
                "the iwae loss uses the model's unscaled densities: it takes no beta or warmup "
                f"(got beta={self.beta}, warmup={self.warmup}); use the elbo or meanfield loss"
            )
        if self.model == "hvae" and self.net != "mlp":
            raise ValueError(f"the hvae model is built from dense networks: use net 'mlp', "
                             f"not {self.net!r}")  # fmt: skip
        flows = [
            w for w, name in (("prior", "flow"), ("guide", "flow")) if getattr(self, w) == name
        ]
        if flows and self.z_dim < 2:
            raise ValueError(f"the flow {flows[0]} needs z_dim >= 2, got {self.z_dim}")
        if flows and min(self.hidden) < self.z_dim:
            raise ValueError(
                f"the flow {flows[0]}'s autoregressive networks use the hidden sizes "
                f"{self.hidden}, which must each be >= z_dim={self.z_dim}"
            )

    def _check_shape(self) -> None:
        # the data's shape: 1 to 3 positive sizes, not absurdly many values
        if self.x_shape is None:
            return
        if not 1 <= len(self.x_shape) <= 3 or any(s < 1 for s in self.x_shape):
            raise ValueError(f"x_shape must be 1 to 3 positive sizes, got {list(self.x_shape)}")
        if math.prod(self.x_shape) > 1 << 26:
            raise ValueError(f"x_shape {list(self.x_shape)} is too large")


def _likelihood(config: Config):
    from .likelihoods import make_likelihood

    options = {
        "bernoulli": {"allow_non_binary": config.allow_non_binary},
        "gaussian": {"variance": config.variance},
        "discretized-logistic": {"mixtures": config.mixtures},
    }.get(config.likelihood, {})
    return make_likelihood(config.likelihood, **options)


def _prior(config: Config):
    from .priors import make_prior

    options = {"components": config.components, "x_shape": config.x_shape}
    return make_prior(
        config.prior, config.z_dim, flows=config.flows, hidden=config.hidden, **options
    )


def _posterior(config: Config, z_dim: int):
    from .guides import make_posterior

    return make_posterior(config.guide, z_dim, flows=config.flows, hidden=config.hidden)


def _build_one_layer(config: Config) -> VAE:
    from .nets import NETS
    from .vae import VAE

    likelihood = _likelihood(config)
    encoder, decoder = NETS[config.net](
        config.x_shape,
        config.z_dim,
        config.hidden,
        config.activation,
        config.gated,
        likelihood.num_params,
        widths=config.widths,
    )
    posterior = _posterior(config, config.z_dim)
    return VAE(encoder, decoder, _prior(config), likelihood, config.x_shape, posterior=posterior)


def _build_two_layer(config: Config) -> HVAE:
    from .hvae import HVAE

    return HVAE(
        config.x_shape,
        config.z_dim,
        config.hidden,
        config.activation,
        config.gated,
        prior=_prior(config),
        likelihood=_likelihood(config),
        posteriors=(_posterior(config, config.z_dim), _posterior(config, config.z_dim)),
    )


#: Model families by name: name -> builder from a :class:`Config` (its networks, prior and
#: likelihood are imported when it is called: this module loads without torch).
MODELS: dict[str, Callable[[Config], BaseVAE]] = {"vae": _build_one_layer, "hvae": _build_two_layer}


def build_vae(config: Config) -> BaseVAE:
    """The model a config describes (``config.x_shape`` must be set): a :class:`~pyrovae.VAE`,
    or an :class:`~pyrovae.hvae.HVAE` for ``model="hvae"``, with its prior and guide. Its
    ``beta`` is ``config.beta`` (a warm-up schedule lowers it during training). Its initial
    weights are fixed by ``config.seed``: Pyro, torch, numpy and random are seeded with it
    before the networks are built, so one config always builds the same model.

    :raises ValueError: naming the setting, for a config that :meth:`Config.validate` refuses.
    """
    import pyro

    if config.x_shape is None:
        raise ValueError("config.x_shape is not set: it comes from the data")
    config.validate()
    pyro.set_rng_seed(config.seed)
    model = MODELS[config.model](config)
    model.beta = config.beta
    return model
