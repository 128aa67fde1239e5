"""The names each registry offers, importable without torch.

:class:`~pyrovae.config.Config` declares its fields' choices with these tuples, and the ``pyrovae``
command builds its options from them, so ``pyrovae --help``, ``--version`` and ``completion``
answer without importing torch or Pyro. Each tuple is the keys of a registry that lives beside its
implementations in a module that imports torch (tests/test_choices.py checks that they agree).
"""

from __future__ import annotations

__all__ = [
    "DATASETS",
    "SPLITS",
    "BINARIZE",
    "STREAM",
    "NETS",
    "ACTIVATIONS",
    "MODELS",
    "PRIORS",
    "GUIDES",
    "LIKELIHOODS",
    "LOSSES",
]

#: :data:`pyrovae.data.DATASETS`
DATASETS = ("digits", "binarized-mnist", "mnist", "fashion-mnist", "photo-patches", "folder")
#: :data:`pyrovae.data.SPLITS`
SPLITS = ("train", "valid", "test")
#: :data:`pyrovae.data.BINARIZE`
BINARIZE = ("none", "threshold", "static", "dynamic")
#: How a folder's training images reach the model (``Config.stream``): ``auto`` (streamed when
#: the split would take more than 2 GiB decoded), ``yes`` or ``no`` (decoded up front).
STREAM = ("auto", "yes", "no")
#: :data:`pyrovae.nets.NETS`
NETS = ("mlp", "conv")
#: :data:`pyrovae.nets.ACTIVATIONS`
ACTIVATIONS = ("relu", "tanh", "elu", "softplus", "gelu")
#: :data:`pyrovae.config.MODELS`
MODELS = ("vae", "hvae")
#: :data:`pyrovae.priors.PRIORS`
PRIORS = ("normal", "learned", "mog", "vampprior", "flow")
#: :data:`pyrovae.guides.GUIDES`
GUIDES = ("normal", "flow")
#: :data:`pyrovae.likelihoods.LIKELIHOODS`
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "continuous-bernoulli",
               "discretized-gaussian", "discretized-logistic")  # fmt: skip
#: :data:`pyrovae.objectives.LOSSES`
LOSSES = ("elbo", "meanfield", "iwae")
