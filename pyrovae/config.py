"""One small config for a training run, and the VAE it describes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

from .likelihoods import LIKELIHOODS, make_likelihood
from .nets import NETS
from .priors import make_prior
from .vae import VAE

__all__ = ["Config", "build_vae", "LOSSES"]

#: Training objectives by name: Pyro ELBO class paths (imported on use).
LOSSES = {
    "elbo": "Trace_ELBO",  # Monte-Carlo KL, any prior
    "meanfield": "TraceMeanField_ELBO",  # closed-form KL where registered
}


@dataclass
class Config:
    """Everything a run needs; saved as ``config.json`` beside the checkpoint."""

    # data
    dataset: str = "digits"  # digits | binarized-mnist | mnist | fashion-mnist
    data_dir: str | None = None  # data root; default $PYROVAE_DATA, else ~/.cache/pyrovae
    binarize: str = (
        "auto"  # auto (binarize grey data for Bernoulli) | none | threshold | static | dynamic
    )
    download: bool = False  # let torchvision download mnist / fashion-mnist
    # model
    net: str = "mlp"  # mlp | conv
    hidden: tuple[int, ...] = (256,)  # hidden sizes of the encoder (the decoder's are reversed)
    gated: bool = False  # GatedDense layers instead of dense + activation
    activation: str = "relu"
    z_dim: int = 8  # latent size
    prior: str = "normal"
    likelihood: str = "bernoulli"  # bernoulli | gaussian | gaussian-learned
    variance: float = 0.1  # c in N(f(z), c·I) for the fixed-variance Gaussian likelihood
    allow_non_binary: bool = False  # let the Bernoulli likelihood score grey values
    x_shape: tuple[int, ...] | None = None  # shape of one datapoint; set from the data
    # training
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "elbo"  # elbo | meanfield
    seed: int = 0
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda | cuda:N

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Build from a dict (e.g. parsed JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("hidden", "x_shape"):
            if d.get(key) is not None:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)

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
        }
        for key, options in choices.items():
            if getattr(self, key) not in options:
                raise ValueError(
                    f"unknown {key} {getattr(self, key)!r}; choose from {', '.join(options)}"
                )
        make_prior(self.prior, max(1, self.z_dim))  # unknown prior names raise here
        for key in ("z_dim", "epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {self.hidden}")


def build_vae(config: Config) -> VAE:
    """The :class:`~pyrovae.VAE` a config describes (``config.x_shape`` must be set)."""
    if config.x_shape is None:
        raise ValueError("config.x_shape is not set: it comes from the data")
    options = {
        "bernoulli": {"allow_non_binary": config.allow_non_binary},
        "gaussian": {"variance": config.variance},
    }.get(config.likelihood, {})
    likelihood = make_likelihood(config.likelihood, **options)
    encoder, decoder = NETS[config.net](
        config.x_shape,
        config.z_dim,
        config.hidden,
        config.activation,
        config.gated,
        likelihood.num_params,
    )
    return VAE(encoder, decoder, make_prior(config.prior, config.z_dim), likelihood, config.x_shape)
