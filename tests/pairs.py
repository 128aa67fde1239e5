"""Pairs of a user's own, written the way Pyro's examples and tutorials write them, for
``pyrovae train --pair tests/pairs.py:NAME`` (tests/test_runs.py).

- :func:`tutorial_vae`: the VAE of Pyro's SVI tutorial part I (an ``nn.Module`` whose ``model``
  and ``guide`` register their networks with ``pyro.module``), on flattened images.
- :func:`prodlda`: Pyro's ProdLDA topic model (examples and tutorial), as a ``(model, guide)``
  pair of plain functions over bag-of-words counts, its networks registered with ``pyro.module``.
- :class:`Chain` / :func:`annealed_chain`: a tiny deep Markov model written as Pyro's DMM
  example writes its pair (the KL terms scaled by an ``annealing_factor`` keyword of model and
  guide), with a step schedule for it (``step_kwargs``), over sequences from :func:`chains`.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch import nn


class Encoder(nn.Module):
    def __init__(self, x_dim: int, z_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(x_dim, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden: int, x_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden)
        self.fc21 = nn.Linear(hidden, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class VAE(nn.Module):
    def __init__(self, x_dim: int = 64, z_dim: int = 4, hidden: int = 32):
        super().__init__()
        self.encoder = Encoder(x_dim, z_dim, hidden)
        self.decoder = Decoder(z_dim, hidden, x_dim)
        self.z_dim, self.x_dim = z_dim, x_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        x = x.reshape(-1, self.x_dim)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        x = x.reshape(-1, self.x_dim)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def tutorial_vae():
    return VAE()


def encoder_only():  # not a pair: an nn.Module without model and guide
    return Encoder(64, 4, 32)


class _TopicEncoder(nn.Module):
    def __init__(self, vocab: int, topics: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(vocab, hidden), nn.Linear(hidden, hidden)
        self.fcmu, self.fclv = nn.Linear(hidden, topics), nn.Linear(hidden, topics)
        self.bnmu = nn.BatchNorm1d(topics, affine=False)
        self.bnlv = nn.BatchNorm1d(topics, affine=False)

    def forward(self, inputs):
        h = F.softplus(self.fc2(F.softplus(self.fc1(inputs))))
        logtheta_loc = self.bnmu(self.fcmu(h))
        logtheta_scale = (0.5 * self.bnlv(self.fclv(h))).exp()
        return logtheta_loc, logtheta_scale


class _TopicDecoder(nn.Module):
    def __init__(self, vocab: int, topics: int):
        super().__init__()
        self.beta = nn.Linear(topics, vocab, bias=False)
        self.bn = nn.BatchNorm1d(vocab, affine=False)

    def forward(self, inputs):
        return F.softmax(self.bn(self.beta(inputs)), dim=1)


def prodlda(vocab: int = 40, topics: int = 3, hidden: int = 32):
    encoder, decoder = _TopicEncoder(vocab, topics, hidden), _TopicDecoder(vocab, topics)

    def model(docs):
        pyro.module("decoder", decoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc = docs.new_zeros((docs.shape[0], topics))
            logtheta_scale = docs.new_ones((docs.shape[0], topics))
            logtheta = pyro.sample(
                "logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1)
            )
            theta = F.softmax(logtheta, -1)
            count_param = decoder(theta)
            total_count = int(docs.sum(-1).max())
            pyro.sample("obs", dist.Multinomial(total_count, count_param), obs=docs)

    def guide(docs):
        pyro.module("encoder", encoder)
        with pyro.plate("documents", docs.shape[0]):
            logtheta_loc, logtheta_scale = encoder(docs)
            pyro.sample("logtheta", dist.Normal(logtheta_loc, logtheta_scale).to_event(1))

    return model, guide


def bag_of_words(path, docs: int = 240, vocab: int = 40, topics: int = 3, words: int = 30):
    """Write generated bag-of-words counts ``(docs, vocab)`` to an ``.npz`` file (one array)."""
    g = torch.Generator().manual_seed(0)
    beta = torch.softmax(3 * torch.randn(topics, vocab, generator=g), -1)  # topics' words
    theta = torch.distributions.Dirichlet(torch.full((topics,), 0.3)).sample((docs,))
    counts = torch.stack([torch.multinomial(t @ beta, words, replacement=True, generator=g)
                          .bincount(minlength=vocab) for t in theta])  # fmt: skip
    import numpy as np

    np.savez(path, counts=counts.float().numpy())


CHAIN = (4, 3, 2)  # time steps T, observed dimension D, latent dimension Z


class Chain(nn.Module):
    """A tiny deep-Markov-style pair over ``x (N, T, D)``: z_t ~ N(trans(z_{t-1}), 1),
    x_t ~ Bernoulli(emit(z_t)); the KL terms of z_t scaled by ``annealing_factor`` in model
    and guide (a keyword of both), as pyro/examples/dmm.py scales them."""

    def __init__(self):
        super().__init__()
        T, D, Z = CHAIN
        self.trans, self.emit = nn.Linear(Z, Z), nn.Linear(Z, D)
        self.enc = nn.Linear(T * D, 2 * T * Z)
        self.calls = 0  # how often the model's Python ran

    def model(self, x, annealing_factor=1.0):
        self.calls += 1
        pyro.module("chain", self)
        T, _, Z = CHAIN
        z = x.new_zeros(len(x), Z)
        with pyro.plate("data", len(x)):
            for t in range(T):
                with poutine.scale(scale=annealing_factor):
                    z = pyro.sample(f"z_{t}", dist.Normal(self.trans(z), 1.0).to_event(1))
                pyro.sample(f"x_{t}", dist.Bernoulli(logits=self.emit(z)).to_event(1),
                            obs=x[:, t])  # fmt: skip

    def guide(self, x, annealing_factor=1.0):
        pyro.module("chain", self)
        T, _, Z = CHAIN
        loc, scale = self.enc(x.flatten(1)).view(len(x), T, 2 * Z).chunk(2, -1)  # (N, T, Z)
        with pyro.plate("data", len(x)):
            for t in range(T):
                with poutine.scale(scale=annealing_factor):
                    pyro.sample(f"z_{t}", dist.Normal(loc[:, t], F.softplus(scale[:, t]) + 1e-3)
                                .to_event(1))  # fmt: skip


def annealed_chain():
    """A :class:`Chain` whose KL annealing factor rises from 0.2 to 1 over two epochs."""
    from pyrovae.schedules import Ramp

    chain = Chain()
    chain.step_kwargs = {"annealing_factor": Ramp(0.2, 1.0, epochs=2)}
    return chain


def chains(n: int = 96) -> torch.Tensor:
    """Binary sequences ``(n, T, D)``, seeded."""
    T, D, _ = CHAIN
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((n, T, D), 0.3), generator=g)
