"""A model/guide pair written from scratch in plain Pyro, trained and scored by pyrovae.

The model is probabilistic PCA, a linear-Gaussian latent variable model::

    z ~ p(z)                      (N(0, I), or a heavy-tailed Student-t with --prior student-t)
    x | z ~ N(W z + b, σ² I)

and the guide is an amortized linear-Gaussian posterior q(z|x) = N(A x + c, diag s²). Nothing in
pyrovae knows this pair: ``pyrovae.fit`` trains it and ``pyrovae.log_likelihood`` scores it
because both only need a model and a guide that put the data in a ``pyro.plate("data", N)``.

With the normal prior, log p(x) is known exactly (x ~ N(b, W Wᵀ + σ² I)), and so is the best
any such model can do (Tipping & Bishop's closed-form maximum-likelihood solution), so the
example prints the importance-sampled estimate beside the exact value. With the Student-t prior
there is no closed form; it prints the importance-weighted bounds for growing K instead, which
rise towards log p(x).

    python examples/custom_model_guide.py                       # digits, normal prior
    python examples/custom_model_guide.py --prior student-t --df 3

References: M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis", JRSS B
1999.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import constraints

import pyrovae

__all__ = ["build_parser", "main", "make_pair", "exact_log_likelihood", "ppca_mle"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="digits", choices=list(pyrovae.data.DATASETS),
                   help="the images to fit")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--z-dim", type=int, default=8, help="k, the number of latent factors")
    p.add_argument("--prior", choices=["normal", "student-t"], default="normal",
                   help="prior on the latent factors")  # fmt: skip
    p.add_argument("--df", type=float, default=3.0, help="degrees of freedom of the Student-t")
    p.add_argument("--epochs", type=int, default=300, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--lr", type=float, default=0.02, help="Adam's learning rate")
    p.add_argument("--limit", type=int, default=None,
                   help="use the first N training images (None: all)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=5000, help="K importance samples")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def make_pair(dim: int, z_dim: int, prior: str = "normal", df: float = 3.0):
    """The probabilistic-PCA model and its amortized linear guide, as plain Pyro functions.

    :param int dim: D, the size of one (flattened) datapoint.
    :param int z_dim: k, the number of latent factors.
    :param str prior: ``"normal"`` or ``"student-t"``.
    :param float df: the Student-t's degrees of freedom.
    :returns: ``(model, guide)``, each called with a batch ``x`` of shape ``(N, D)``.
    """

    def model(x):
        w = pyro.param("W", lambda: 0.1 * torch.randn(dim, z_dim))
        b = pyro.param("b", lambda: torch.zeros(dim))
        sigma = pyro.param("sigma", lambda: torch.tensor(1.0), constraint=constraints.positive)
        zeros = torch.zeros(z_dim)
        p_z = dist.Normal(zeros, 1.0) if prior == "normal" else dist.StudentT(df, zeros, 1.0)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", p_z.to_event(1))  # (N, k); (K, N, k) with K particles
            pyro.sample("x", dist.Normal(z @ w.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        a = pyro.param("A", lambda: torch.zeros(dim, z_dim))
        c = pyro.param("c", lambda: torch.zeros(z_dim))
        s = pyro.param("s", lambda: torch.ones(z_dim), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a + c, s).to_event(1))

    return model, guide


def exact_log_likelihood(x: torch.Tensor, w, b, sigma) -> torch.Tensor:
    """log p(x) of probabilistic PCA with a standard normal prior: x ~ N(b, W Wᵀ + σ² I).

    :returns: ``(N,)`` in nats.
    """
    cov = w @ w.T + sigma**2 * torch.eye(len(b), dtype=w.dtype)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def ppca_mle(x: torch.Tensor, z_dim: int):
    """Tipping & Bishop's closed-form maximum-likelihood ``(W, b, σ)`` for data ``(N, D)``:
    b is the mean, σ² the mean of the discarded eigenvalues of the covariance, and
    W = U_k (Λ_k − σ² I)^½ from its top k eigenvectors."""
    x = x.double()
    b = x.mean(0)
    cov = (x - b).T @ (x - b) / len(x)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[z_dim:].mean()
    w = evecs[:, :z_dim] * (evals[:z_dim] - sigma2).clamp_min(0).sqrt()
    return w, b, sigma2.sqrt()


def main(args: argparse.Namespace) -> dict:
    """Train the pair, print its scores next to the exact values; returns them as a dict."""
    if args.z_dim < 1 or args.epochs < 1 or args.num_samples < 1:
        raise ValueError("--z-dim, --epochs and --num-samples must be >= 1")
    if args.prior == "student-t" and not args.df > 0:
        raise ValueError(f"--df must be > 0, got {args.df}")
    train = pyrovae.data.load(args.dataset, "train", args.data_dir).images.flatten(1)
    test = pyrovae.data.load(args.dataset, "test", args.data_dir).images.flatten(1)
    if args.limit is not None:
        train = train[: args.limit]
    dim, k = train.shape[1], args.z_dim
    if k >= dim:
        raise ValueError(f"--z-dim must be smaller than the data's {dim} dimensions, got {k}")
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide = make_pair(dim, k, args.prior, args.df)
    # Closed-form KL(q(z|x) ‖ p(z)) where Pyro knows it (Normal ‖ Normal); Monte Carlo otherwise.
    loss = TraceMeanField_ELBO() if args.prior == "normal" else Trace_ELBO()
    print(
        f"probabilistic PCA, k={k}, {args.prior} prior, on {args.dataset}: {dim} pixels, "
        f"{len(train)} training and {len(test)} test images"
    )
    start = time.perf_counter()
    history = pyrovae.fit(
        model, guide, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        loss=loss, device="cpu", seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s")

    pyro.set_rng_seed(args.seed)
    result: dict = {"train_elbo_last_epoch": history.train_elbo[-1]}
    rows = []
    for name, x in (("train", train), ("test", test)):
        result[f"{name}_elbo"] = float(pyrovae.elbo(model, guide, x, num_particles=10).mean())
        result[f"{name}_log_px"] = float(
            pyrovae.log_likelihood(
                model, guide, x, num_samples=args.num_samples, progress=not args.no_progress
            ).mean()  # fmt: skip
        )
    rows.append(("ELBO (10 particles)", result["train_elbo"], result["test_elbo"]))
    is_row = (f"IS log p(x), K={args.num_samples}", result["train_log_px"], result["test_log_px"])
    rows.append(is_row)
    if args.prior == "normal":
        w, b, sigma = (pyro.param(n).detach().double() for n in ("W", "b", "sigma"))
        mle = ppca_mle(train, k)
        for key, params in (("exact", (w, b, sigma)), ("mle", mle)):
            for name, x in (("train", train), ("test", test)):
                ll = exact_log_likelihood(x.double(), *params)
                result[f"{name}_{key}"] = float(ll.mean())
        rows.append(("exact log p(x), trained model", result["train_exact"], result["test_exact"]))
        rows.append(("exact log p(x), pPCA maximum (T&B)", result["train_mle"], result["test_mle"]))
    else:
        for kk in (1, 10, 100):  # the bound rises with K towards the K-sample estimate above
            if kk < args.num_samples:
                bound = [float(pyrovae.iwae(model, guide, x, kk).mean()) for x in (train, test)]
                rows.append((f"IWAE bound, K={kk}", *bound))
                result[f"iwae_{kk}"] = tuple(bound)
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'nats per image':<{width}}{'train':>10}{'test':>10}")
    for label, tr, te in rows:
        print(f"{label:<{width}}{tr:>10.2f}{te:>10.2f}")
    if args.prior == "normal":
        gap = result["test_log_px"] - result["test_exact"]
        print(f"IS estimate − exact value on the test set: {gap:+.3f} nats")
        if not math.isfinite(gap):
            raise ValueError("the log-likelihood is not finite; try a smaller --lr")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
