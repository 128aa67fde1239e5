"""A linear-Gaussian model (probabilistic PCA) whose log p(x) and p(z|x) are closed form.

z ~ N(0, I_k),   x | z ~ N(W z + b, σ² I_d)
p(x)   = N(x; b, W Wᵀ + σ² I)
p(z|x) = N(M⁻¹ Wᵀ (x − b), σ² M⁻¹),   M = Wᵀ W + σ² I
"""

import math

import pyro
import pyro.distributions as dist
import torch

D, K, SIGMA = 4, 2, 0.5


class LinearGaussian:
    def __init__(self, seed=0, shift=0.0, widen=1.0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, K, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        # how wrong the mean-field guide is: its mean is off by `shift` posterior standard
        # deviations, and its scale is `widen` times the posterior's marginal scale
        self.shift, self.widen = shift, widen

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, SIGMA).to_event(1), obs=x)

    def posterior(self, x):
        M = self.W.T @ self.W + SIGMA**2 * torch.eye(K, dtype=x.dtype)
        mean = torch.linalg.solve(M, self.W.T @ (x - self.b).T).T  # (N, K)
        return mean, SIGMA**2 * torch.linalg.inv(M)  # (N, K), (K, K)

    def exact_guide(self, x):
        mean, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, cov))

    def q(self, x):
        mean, cov = self.posterior(x)
        std = cov.diagonal().sqrt()  # (K,)
        return mean + self.shift * std, std * self.widen  # a mean-field guess

    def guide(self, x):
        loc, scale = self.q(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def log_px(self, x):
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(D, dtype=x.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)  # (N,)

    def kl_q_posterior(self, x):
        loc, scale = self.q(x)
        mean, cov = self.posterior(x)
        q = torch.distributions.MultivariateNormal(loc, torch.diag_embed(scale**2))
        return torch.distributions.kl_divergence(
            q, torch.distributions.MultivariateNormal(mean, cov)
        )

    def closed_form_elbo(self, x):
        # E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)), both in closed form
        loc, scale = self.q(x)
        resid = x - loc @ self.W.T - self.b
        trace = (self.W**2 @ scale**2).sum()  # tr(W S Wᵀ), S = diag(scale²) shared by all x
        expected_loglik = -0.5 * D * math.log(2 * math.pi * SIGMA**2) - (
            (resid**2).sum(-1) + trace
        ) / (2 * SIGMA**2)
        kl_prior = 0.5 * (scale**2 + loc**2 - 1 - torch.log(scale**2)).sum(-1)
        return expected_loglik - kl_prior

    def data(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, K, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)
