"""Pyro's examples/svi_lightning.py model, as it is written there (global latents, and a plate
of the full size that scales each minibatch it is given up to the whole data), with data and
the whole-data ELBO per datapoint: shared by tests/test_pyro_idioms.py and test_lightning.py."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule


class Regression(PyroModule):
    """Pyro's examples/svi_lightning.py model, as it is written there: global latents, and a
    plate of the full size that scales each minibatch it is given up to the whole data."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, covariates, data=None):
        coeff = pyro.sample("coeff", dist.Normal(0, 1))
        bias = pyro.sample("bias", dist.Normal(0, 1))
        scale = pyro.sample("scale", dist.LogNormal(0, 1))
        with pyro.plate("data", self.size, len(covariates)):
            loc = bias + coeff * covariates
            return pyro.sample("obs", dist.Normal(loc, scale), obs=data)


def regression_data(n=2000):
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))  # (n,)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(1))
    return x, 0.5 + 2.0 * x + 0.3 * noise  # coeff 2, bias 0.5, scale 0.3


def elbo_per_datapoint(model, guide, x, y, particles=100) -> float:
    # The whole data's ELBO (global KL counted once) over n, with one plate over all of it.
    with torch.no_grad():
        loss = Trace_ELBO(num_particles=particles, vectorize_particles=False).loss(
            model, guide, x, y
        )
    return -loss / len(x)
