"""A convolutional VAE on Fashion-MNIST: a CNN encoder and an up-sampling CNN decoder.

The VAE is assembled from pyrovae's pieces rather than from a config: ``ConvEncoder`` (two
stride-2 convolutions, 28 → 14 → 7, and a dense layer), ``ConvDecoder`` (a dense layer, then
nearest-neighbour up-sampling and 3×3 convolutions, 7 → 14 → 28), a prior and a likelihood, put
together by ``pyrovae.VAE``. The likelihood is a choice:

- ``bernoulli``: pixels binarized afresh each batch (dynamic binarization), the standard
  density for binary images;
- ``gaussian``: N(f(z), c·I) on the grey values with a fixed variance c (``--variance``);
- ``gaussian-learned``: the decoder also predicts a per-pixel scale.

Prints the test ELBO and importance-sampled log p(x) and writes a grid of samples from the
prior, reconstructions, the ELBO curves, and latent traversals (or, with ``--z-dim 2``, the
decoded 2-D manifold).

    python examples/conv_vae.py --data-dir /path/to/data --epochs 5 --likelihood gaussian
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
from pyrovae.likelihoods import make_likelihood
from pyrovae.nets import ConvDecoder, ConvEncoder
from pyrovae.priors import make_prior
from pyrovae.training import resolve_device

__all__ = ["build_parser", "main", "build_conv_vae"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=list(pyrovae.data.DATASETS),
                   help="the images to train on")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--likelihood", default="bernoulli", help="p(x|z) of a pixel",
                   choices=["bernoulli", "gaussian", "gaussian-learned"])  # fmt: skip
    p.add_argument("--variance", type=float, default=0.05, help="c of N(f(z), c·I)")
    p.add_argument("--channels", type=int, default=32, help="channels of the first conv layer")
    p.add_argument("--hidden", type=int, default=256, help="dense layer of the encoder")
    p.add_argument("--z-dim", type=int, default=16, help="latent size")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N images only (None: all)")  # fmt: skip
    p.add_argument("--eval-n", type=int, default=500, help="test images scored (spread evenly)")
    p.add_argument("--num-samples", type=int, default=1000, help="K importance samples")
    p.add_argument("--out", default="conv-vae-out", help="folder for the figures")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_conv_vae(
    x_shape, z_dim: int, likelihood: str, variance: float = 0.05, channels: int = 32, hidden=256
) -> pyrovae.VAE:
    """The CNN VAE from its pieces: encoder, decoder, standard normal prior, likelihood."""
    options = {"variance": variance} if likelihood == "gaussian" else {}
    lik = make_likelihood(likelihood, **options)
    encoder = ConvEncoder(x_shape, z_dim, channels=channels, hidden=hidden)
    decoder = ConvDecoder(x_shape, z_dim, channels=2 * channels, num_params=lik.num_params)
    return pyrovae.VAE(encoder, decoder, make_prior("normal", z_dim), lik, x_shape)


def main(args: argparse.Namespace) -> dict:
    """Train the CNN VAE, print its test scores, write the figures; returns the scores."""
    for key in ("epochs", "batch_size", "eval_n", "num_samples", "z_dim", "channels"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    device = resolve_device(args.device)
    binarize = "none"
    if args.likelihood == "bernoulli" and args.dataset != "binarized-mnist":
        binarize = "threshold" if args.dataset == "digits" else "dynamic"
    train, valid, test = (
        pyrovae.data.load(args.dataset, s, args.data_dir, binarize, seed=args.seed)
        for s in ("train", "valid", "test")
    )
    if args.limit is not None:
        train.images = train.images[: args.limit]
    vae = build_conv_vae(
        train.x_shape, args.z_dim, args.likelihood, args.variance, args.channels, args.hidden
    )
    transform = train.batch_transform
    vae.check_data(train.images if transform is None else transform(train.tensors)[0])
    idx = spread(len(test), args.eval_n)
    val = valid.images[spread(len(valid), args.eval_n)]
    print(
        f"CNN VAE ({args.likelihood}) on {args.dataset}: {len(train)} training images, "
        f"z {args.z_dim}, {sum(p.numel() for p in vae.parameters())} parameters, {device}"
    )
    start = time.perf_counter()
    history = pyrovae.fit(
        vae.model, vae.guide, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_data=val, device=device, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    x = test.images[idx].to(device)
    pyro.set_rng_seed(args.seed)
    result = {
        "train_elbo": history.train_elbo[-1],
        "test_elbo": float(pyrovae.elbo(vae.model, vae.guide, x).mean()),
        "test_log_px": float(
            pyrovae.log_likelihood(
                vae.model, vae.guide, x, num_samples=args.num_samples, progress=not args.no_progress
            ).mean()  # fmt: skip
        ),
        "train_seconds": seconds,
    }
    print(f"trained {args.epochs} epochs in {seconds:.1f} s: train ELBO {result['train_elbo']:.2f}")
    print(
        f"test (n={len(x)}): ELBO {result['test_elbo']:.2f}, log p(x) {result['test_log_px']:.2f} "
        f"nats (K={args.num_samples})"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_history(history.records(), out / "elbo.png")
    plots.plot_images(
        vae.sample(64).cpu(), out / "samples.png", "z ~ p(z) decoded: means of p(x|z)"
    )
    shown = x[spread(len(x), 30)]  # spread over the scored images, not the first 30
    plots.plot_reconstructions(shown.cpu(), vae.reconstruct(shown).cpu(), out / "recon.png")
    if args.z_dim == 2:
        plots.plot_manifold(vae.decode, out / "manifold.png", n=15)
    else:
        with torch.no_grad():
            means = vae.encode(x)[0]
        plots.plot_traversals(vae.decode, means.mean(0), out / "traversals.png", means=means)
    print(f"wrote figures to {out}")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
