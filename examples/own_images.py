"""A colour VAE on your own images: an image folder, a residual CNN, and the discretized logistic
mixture likelihood, scored in bits per dimension.

The folder is any tree of image files (PNG, JPEG, ...): subfolders are classes, and ``train/``,
``valid/``, ``test/`` subfolders are the splits when present (else a seeded 80/10/10 split).
Images are resized (shorter side) and centre-cropped to ``--image-size`` and converted to
``--channels``. The VAE is built from a config: ``--net conv`` (residual down-/up-sampling blocks
of ``--widths`` channels) and ``--likelihood discretized-logistic`` (a per-pixel mixture of
``--mixtures`` logistics over the 256 values of each 8-bit channel, with the colour channels
coupled, as in PixelCNN++ and VDVAE), so log p(x) is a probability and bits/dim
−log₂ p(x) / (C·H·W) is meaningful.

Without ``--data-dir`` it first writes the embedded colour patches (32×32 patches of
scikit-learn's two sample photographs) as a PNG folder, ``OUT/folder/{train,valid,test}/CLASS/``,
and trains on that: the same steps as with your own folder, offline. With ``--workers N`` the
training images are decoded lazily by N DataLoader workers (``pyrovae.data.FolderDataset``)
instead of being loaded into memory first.

Writes ``samples.png`` (means and draws of p(x|z) for z from the prior), ``reconstructions.png``,
``interpolations.png`` (decoded means between the codes of test images), ``elbo.png`` and
``results.json`` (test log p(x) in nats and bits/dim).

    python examples/own_images.py --data-dir ~/Pictures/cats-and-dogs --image-size 64 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch

import pyrovae
from pyrovae import plots
from pyrovae.data import FolderDataset, spread, write_folder
from pyrovae.likelihoods import bits_per_dim
from pyrovae.training import resolve_device

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", default=None,
                   help="image folder (None: the embedded colour patches)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=32, help="resize and centre-crop to S×S")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3,
                   help="convert images to grey (1) or RGB (3)")  # fmt: skip
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable files")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="conv block channels")
    p.add_argument("--hidden", type=int, default=256, help="dense layer of encoder and decoder")
    p.add_argument("--z-dim", type=int, default=32, help="latent size")
    p.add_argument("--mixtures", type=int, default=5, help="logistic components per pixel")
    p.add_argument("--epochs", type=int, default=40,
                   help="passes over the data (fewer leave colours washed out)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--workers", type=int, default=0,
                   help="decode images in N DataLoader workers (0: in memory)")  # fmt: skip
    p.add_argument("--eval-n", type=int, default=100, help="test images scored (spread evenly)")
    p.add_argument("--num-samples", type=int, default=1000, help="K importance samples")
    p.add_argument("--out", default="own-images-out", help="folder for the figures")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _demo_folder(out: Path) -> Path:
    # the embedded colour patches, written as OUT/folder/{train,valid,test}/{china,flower}/*.png
    root = out / "folder"
    for split in ("train", "valid", "test"):
        if not (root / split).is_dir():
            ds = pyrovae.data.load("photo-patches", split)
            write_folder(ds.images, ds.labels, ds.classes, root / split)
    return root


def _check(args) -> None:
    for key in ("epochs", "batch_size", "eval_n", "num_samples", "z_dim", "mixtures", "hidden"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


def main(args: argparse.Namespace) -> dict:
    """Train the colour VAE on the folder, score the test split, write the figures; returns the
    scores."""
    _check(args)
    out = Path(args.out)
    root = Path(args.data_dir) if args.data_dir else _demo_folder(out)
    options = {"image_size": args.image_size, "channels": args.channels}
    splits = {
        s: pyrovae.data.load("folder", s, root, skip_bad_files=args.skip_bad_files, **options)
        for s in ("train", "valid", "test")
    }
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    device = resolve_device(args.device)
    config = pyrovae.Config(
        x_shape=train.x_shape, net="conv", widths=tuple(args.widths), hidden=(args.hidden,),
        z_dim=args.z_dim, likelihood="discretized-logistic", mixtures=args.mixtures,
    )  # fmt: skip
    pyro.set_rng_seed(args.seed)
    vae = pyrovae.build_vae(config)
    vae.check_data(train.images)  # 8-bit pixels, before any training
    skipped = sum(len(s.skipped) for s in splits.values())
    print(
        f"colour VAE on {root}: {len(train)}/{len(valid)}/{len(test)} images {train.x_shape}"
        + (f" ({skipped} unreadable files skipped)" if skipped else "")
        + f", {sum(p.numel() for p in vae.parameters())} parameters, {device}"
    )
    data = train
    if args.workers:  # decode lazily in worker processes (for folders larger than memory)
        lazy = FolderDataset(root, "train", **options)
        data = torch.utils.data.DataLoader(lazy, args.batch_size, shuffle=True,
                                           num_workers=args.workers, drop_last=False)  # fmt: skip
    val = valid.images[spread(len(valid), args.eval_n)]
    start = time.perf_counter()
    history = pyrovae.fit(
        vae.model, vae.guide, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_data=val, device=device, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    x = test.images[spread(len(test), args.eval_n)].to(device)
    pyro.set_rng_seed(args.seed)
    log_px = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=args.num_samples,
                                    progress=not args.no_progress)  # fmt: skip
    bits = bits_per_dim(log_px, vae.x_shape)
    result = {
        "train_elbo": history.train_elbo[-1],
        "test_log_px": float(log_px.mean()),
        "test_bits_per_dim": float(bits.mean()),
        "n": len(x),
        "num_samples": args.num_samples,
        "epochs": args.epochs,
        "train_seconds": seconds,
    }
    print(f"trained {args.epochs} epochs in {seconds:.1f} s: train ELBO {result['train_elbo']:.1f}")
    print(
        f"test (n={len(x)}): log p(x) {result['test_log_px']:.1f} nats, "
        f"{result['test_bits_per_dim']:.3f} bits/dim (K={args.num_samples})"
    )
    _figures(vae, history, x, out)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote figures and results.json to {out}")
    return result


def _figures(vae, history, x: torch.Tensor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_history(history.records(), out / "elbo.png")
    means, draws = vae.sample(32).cpu(), vae.sample(32, mean=False).cpu()
    title = "samples: means of p(x|z) (top half), draws (bottom half)"
    plots.plot_images(torch.cat([means, draws]), out / "samples.png", title, nrow=8)
    # the images shown are spread over the scored ones (themselves spread over the split), not
    # the first few, which in a folder sorted by class would all be one class
    shown = x[spread(len(x), 30).to(x.device)]
    plots.plot_reconstructions(
        shown.cpu(), vae.reconstruct(shown).cpu(), out / "reconstructions.png"
    )
    rows = min(len(x) // 2, 6)
    if rows:
        ends = spread(len(x), 2 * rows).to(x.device)  # pairs from two different parts
        a, b = x[ends[:rows]], x[ends[rows:]]
        with torch.no_grad():
            z1, z2 = vae.encode(a)[0], vae.encode(b)[0]
        plots.plot_interpolations(vae.decode, z1, z2, out / "interpolations.png", steps=8,
                                  ends=(a, b))  # fmt: skip


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
