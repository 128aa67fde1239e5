"""One small config for a training run, and the model it describes."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from .guides import GUIDES, make_posterior
from .hvae import HVAE
from .likelihoods import LIKELIHOODS, make_likelihood
from .nets import NETS
from .objectives import LOSSES
from .priors import PRIORS, check_positive, make_prior
from .vae import VAE, BaseVAE

__all__ = ["Config", "build_vae", "LOSSES", "MODELS", "STREAM"]


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
#: Upper bound of a network size (a guard against typos that would exhaust memory).
MAX_SIZE = 1 << 20
#: How a folder's training images reach the model (``Config.stream``).
STREAM = ("auto", "yes", "no")


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
    """Everything a run needs; saved as ``config.json`` beside the checkpoint."""

    # data
    dataset: str = "digits"  # a name in pyrovae.data.DATASETS (folder: data_dir is the images)
    data_dir: str | None = None  # data root; default $PYROVAE_DATA, else ~/.cache/pyrovae
    binarize: str = (
        "auto"  # auto (binarize grey data for Bernoulli) | none | threshold | static | dynamic
    )
    download: bool = False  # let torchvision download mnist / fashion-mnist
    image_size: int | None = None  # folder: resize and centre-crop images to this square size
    channels: int | None = None  # folder: convert images to 1 (grey) or 3 (RGB) channels
    skip_bad_files: bool = False  # folder: leave out unreadable files (counted in train.json)
    valid_fraction: float = 0.1  # folder without split subfolders: share of validation images
    test_fraction: float = 0.1  # folder without split subfolders: share of test images
    stream: str = "auto"  # folder: decode training images in DataLoader workers while training:
    #   auto (when the split would take more than 2 GiB decoded) | yes | no (decode up front)
    workers: int = 1  # folder, streamed: DataLoader worker processes (0: in the training one)
    # model
    net: str = "mlp"  # mlp | conv
    hidden: tuple[int, ...] = (256,)  # hidden sizes of the encoder (the decoder's are reversed)
    widths: tuple[int, ...] = (32, 64)  # conv: channels of the residual blocks, one per halving
    gated: bool = False  # GatedDense layers instead of dense + activation
    activation: str = "relu"
    z_dim: int = 8  # latent size (of the top layer z2 for the hvae)
    model: str = "vae"  # vae | hvae (two stochastic layers, z2 -> z1 -> x)
    prior: str = "normal"  # normal | learned | mog | vampprior | flow
    components: int = 500  # K: mixture components (mog) or pseudo-inputs (vampprior)
    guide: str = "normal"  # normal (mean-field Gaussian) | flow (IAF on the encoder's Gaussian)
    flows: int = 2  # autoregressive transforms of the flow prior and the flow guide
    likelihood: str = "bernoulli"  # bernoulli | gaussian | gaussian-learned
    variance: float = 0.1  # c in N(f(z), c·I) for the fixed-variance Gaussian likelihood
    mixtures: int = 10  # logistic components per pixel of the discretized-logistic likelihood
    allow_non_binary: bool = False  # let the Bernoulli likelihood score grey values
    x_shape: tuple[int, ...] | None = None  # shape of one datapoint; set from the data
    # training
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "elbo"  # elbo | meanfield | iwae
    particles: int = 1  # samples per datapoint (k of the iwae bound)
    beta: float = 1.0  # final KL weight (β-VAE when != 1)
    warmup: int = 0  # KL warm-up epochs: β rises linearly to `beta` over them
    patience: int | None = None  # early stopping on the validation ELBO (None: never)
    train_limit: int | None = None  # train on the first N training images
    seed: int = 0  # fixes the initial weights (build_vae), the data order and the noise
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N

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
        """Check names and sizes before any data is loaded or training starts.

        :raises ValueError: naming the setting.
        """
        from .data import BINARIZE, DATASETS

        choices = {
            "dataset": DATASETS,
            "net": NETS,
            "likelihood": LIKELIHOODS,
            "loss": LOSSES,
            "binarize": ("auto", *BINARIZE),
            "stream": STREAM,
            "model": MODELS,
            "prior": PRIORS,
            "guide": GUIDES,
        }
        for key, options in choices.items():
            if getattr(self, key) not in options:
                raise ValueError(
                    f"unknown {key} {getattr(self, key)!r}; choose from {', '.join(options)}"
                )
        positive = ("z_dim", "epochs", "batch_size", "components", "flows", "particles", "mixtures")
        for key in positive:
            check_positive(key, getattr(self, key))
        for key in ("patience", "train_limit"):
            if getattr(self, key) is not None:
                check_positive(key, getattr(self, key))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self._check_ranges()
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {self.hidden}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"conv widths must be positive integers, got {self.widths}")
        if not self.beta > 0:
            raise ValueError(f"beta (the KL weight) must be > 0, got {self.beta}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0, got {self.warmup}")
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

    def _check_ranges(self) -> None:
        # sizes a typo could make absurd, shapes, seeds and fractions
        sizes = {"z_dim": [self.z_dim], "hidden": self.hidden, "widths": self.widths,
                 "components": [self.components], "flows": [self.flows],
                 "particles": [self.particles], "mixtures": [self.mixtures]}  # fmt: skip
        for key, values in sizes.items():
            if any(v > MAX_SIZE for v in values):
                raise ValueError(f"{key} must be <= {MAX_SIZE}, got {values}")
        if self.x_shape is not None and (
            not 1 <= len(self.x_shape) <= 3 or any(s < 1 for s in self.x_shape)
        ):
            raise ValueError(f"x_shape must be 1 to 3 positive sizes, got {list(self.x_shape)}")
        if self.x_shape is not None and math.prod(self.x_shape) > 1 << 26:
            raise ValueError(f"x_shape {list(self.x_shape)} is too large")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        if not self.variance > 0:
            raise ValueError(f"variance must be > 0, got {self.variance}")
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers must be in [0, 256], got {self.workers}")
        for key in ("valid_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")


def _likelihood(config: Config):
    options = {
        "bernoulli": {"allow_non_binary": config.allow_non_binary},
        "gaussian": {"variance": config.variance},
        "discretized-logistic": {"mixtures": config.mixtures},
    }.get(config.likelihood, {})
    return make_likelihood(config.likelihood, **options)


def _prior(config: Config):
    options = {"components": config.components, "x_shape": config.x_shape}
    return make_prior(
        config.prior, config.z_dim, flows=config.flows, hidden=config.hidden, **options
    )


def _posterior(config: Config, z_dim: int):
    return make_posterior(config.guide, z_dim, flows=config.flows, hidden=config.hidden)


def _build_one_layer(config: Config) -> VAE:
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


#: Model families by name: name -> builder from a :class:`Config`.
MODELS: dict[str, Callable[[Config], BaseVAE]] = {"vae": _build_one_layer, "hvae": _build_two_layer}


def build_vae(config: Config) -> BaseVAE:
    """The model a config describes (``config.x_shape`` must be set): a :class:`~pyrovae.VAE`,
    or an :class:`~pyrovae.hvae.HVAE` for ``model="hvae"``, with its prior and guide. Its
    ``beta`` is ``config.beta`` (a warm-up schedule lowers it during training). Its initial
    weights are fixed by ``config.seed``: Pyro, torch, numpy and random are seeded with it
    before the networks are built, so one config always builds the same model."""
    import pyro

    if config.x_shape is None:
        raise ValueError("config.x_shape is not set: it comes from the data")
    config.validate()
    pyro.set_rng_seed(config.seed)
    model = MODELS[config.model](config)
    model.beta = config.beta
    return model
