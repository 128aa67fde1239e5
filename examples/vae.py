"""The classic VAE (Kingma & Welling 2014) on binarized MNIST or Fashion-MNIST.

Trains ``pyrovae.build_vae``'s MLP VAE with SVI, then prints the test ELBO and the
importance-sampled test log p(x) (the number papers report), and writes figures to ``--out``:
the ELBO curves, reconstructions, prior samples, a t-SNE map of the posterior means, latent
traversals, interpolations, and a histogram of per-image log p(x).

Run from anywhere (data are read from ``--data-dir``, never downloaded)::

    python examples/vae.py --dataset binarized-mnist --data-dir /path/to/data --epochs 10
    python examples/vae.py --dataset digits --epochs 30   # scikit-learn's 8×8 digits, no files
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

import pyrovae
from pyrovae import plots
from pyrovae.data import spread
from pyrovae.training import resolve_device

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="binarized-mnist", choices=list(pyrovae.data.DATASETS),
                   help="the images to train on")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--hidden", type=int, nargs="+", default=[400], help="hidden sizes")
    p.add_argument("--z-dim", type=int, default=50, help="latent size")
    p.add_argument("--likelihood", default="bernoulli", help="p(x|z) of a pixel",
                   choices=list(pyrovae.likelihoods.LIKELIHOODS))  # fmt: skip
    p.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N images only (None: all)")  # fmt: skip
    p.add_argument("--eval-n", type=int, default=1000, help="test images scored (spread evenly)")
    p.add_argument("--num-samples", type=int, default=1000, help="K importance samples")
    p.add_argument("--embedding", choices=["tsne", "pca"], default="tsne",
                   help="how the latent codes are drawn in 2-D")  # fmt: skip
    p.add_argument("--out", default="vae-out", help="folder for the figures")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _load(args, split: str) -> pyrovae.data.ImageDataset:
    binarize = "none"
    if args.likelihood == "bernoulli" and args.dataset != "binarized-mnist":
        binarize = "threshold" if args.dataset == "digits" else "dynamic"
    return pyrovae.data.load(args.dataset, split, args.data_dir, binarize, seed=args.seed)


def main(args: argparse.Namespace) -> dict:
    """Train, score and plot; returns the printed numbers as a dict."""
    for key in ("epochs", "batch_size", "eval_n", "num_samples", "z_dim"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    device = resolve_device(args.device)
    out = Path(args.out)
    train, valid, test = (_load(args, s) for s in ("train", "valid", "test"))
    if args.limit is not None:
        train.images = train.images[: args.limit]
        train.labels = train.labels[: args.limit] if train.labels is not None else None
    config = pyrovae.Config(
        x_shape=train.x_shape, hidden=tuple(args.hidden), z_dim=args.z_dim,
        likelihood=args.likelihood,
    )  # fmt: skip
    vae = pyrovae.build_vae(config)
    transform = train.batch_transform
    vae.check_data(train.images if transform is None else transform(train.tensors)[0])
    val = valid.images[spread(len(valid), args.eval_n)]
    print(f"{args.dataset}: {len(train)} training images {train.x_shape}, {device}")
    start = time.perf_counter()
    history = pyrovae.fit(
        vae.model, vae.guide, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_data=val, device=device, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    train_s = time.perf_counter() - start

    idx = spread(len(test), args.eval_n)
    x, labels = test.images[idx].to(device), test.labels[idx] if test.labels is not None else None
    pyro.set_rng_seed(args.seed)
    vae.eval()
    start = time.perf_counter()
    test_elbo = pyrovae.elbo(vae.model, vae.guide, x)
    log_px = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=args.num_samples,
                                    progress=not args.no_progress)  # fmt: skip
    eval_s = time.perf_counter() - start
    result = {
        "train_elbo": history.train_elbo[-1],
        "test_elbo": float(test_elbo.mean()),
        "test_log_px": float(log_px.mean()),
        "n_test": len(x),
        "num_samples": args.num_samples,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
    }
    print(f"trained {args.epochs} epochs in {train_s:.1f} s: train ELBO {result['train_elbo']:.2f}")
    print(
        f"test (n={len(x)}): ELBO {result['test_elbo']:.2f}, importance-sampled log p(x) "
        f"{result['test_log_px']:.2f} nats (K={args.num_samples}, {eval_s:.1f} s)"
    )

    out.mkdir(parents=True, exist_ok=True)
    plots.plot_history(history.records(), out / "elbo.png")
    # the images shown are spread over the scored ones, which are spread over the (class-ordered)
    # split: the first 20 of binarized MNIST's test split would all be zeros
    shown = x[spread(len(x), 20)]
    plots.plot_reconstructions(shown.cpu(), vae.reconstruct(shown).cpu(), out / "recon.png")
    plots.plot_images(
        vae.sample(64).cpu(), out / "samples.png", "z ~ p(z) decoded: means of p(x|z)"
    )
    with torch.no_grad():
        means = vae.encode(x)[0].cpu()
    plots.plot_embedding(means, labels, out / "latent.png", args.embedding, args.seed,
                         classes=test.classes)  # fmt: skip
    # traverse the 8 most used coordinates (largest spread of the means) around the mean code,
    # each over μ ± 3σ of its encoded means; units the model does not use are greyed
    used = means.std(0).argsort(descending=True)[:8].sort().values.tolist()
    plots.plot_traversals(vae.decode, means.mean(0), out / "traversals.png", used, means=means)
    ends = spread(len(x), 12)  # 6 pairs, each from two different parts of the split
    a, b = ends[:6], ends[6:]
    plots.plot_interpolations(
        vae.decode, means[a], means[b], out / "interpolations.png",
        ends=(x[a], x[b]),
    )  # fmt: skip
    plots.plot_log_likelihood(log_px, out / "log_px.png", title=f"{args.dataset} test log p(x)")
    print(f"wrote figures to {out}")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
