"""A conditional VAE (Sohn, Lee & Yan 2015) as a Pyro model/guide pair.

The pair models a target y given a context c with a latent z::

    z ~ p(z | c)            a prior network
    y ~ p(y | z, c)         a generation network (Bernoulli pixels)
    q(z | c, y)             the recognition network (the guide)

Two tasks:

- ``--task quadrants`` (default; needs no labels): c is an image with all but ``--visible``
  quadrants hidden, y the hidden pixels. Many completions fit one quadrant; the CVAE draws
  several, where a deterministic network can only predict their blurry average.
- ``--task class``: c is the one-hot class label and y the whole image, so the pair generates
  images of a chosen class (``--label``). This needs a labelled dataset.

The batch is a pair of tensors ``(context, target)``: ``pyrovae.fit`` passes them on as
``model(context, target)``, and ``pyrovae.log_likelihood`` scores log p(y | c) per test image the
same way, with no special case for the extra input. A baseline without a latent (a network
predicting independent Bernoulli pixels from c) is trained and scored by the same two calls, its
log-likelihood exact.

    python examples/cvae.py --dataset binarized-mnist --data-dir /path/to/data --epochs 20
    python examples/cvae.py --dataset fashion-mnist --task class --label 7

References: K. Sohn, H. Lee, X. Yan, "Learning Structured Output Representation using Deep
Conditional Generative Models", NeurIPS 2015.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch import nn

import pyrovae
from pyrovae import plots
from pyrovae.data import spread
from pyrovae.nets import MLPDecoder, MLPEncoder

__all__ = ["build_parser", "main", "CVAE", "Baseline", "quadrant_mask", "make_task"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="binarized-mnist", choices=list(pyrovae.data.DATASETS),
                   help="the images to train on")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--task", choices=["quadrants", "class"], default="quadrants",
                   help="complete images from quadrants, or draw images of a class")  # fmt: skip
    p.add_argument("--visible", type=int, default=1, choices=[1, 2, 3], help="quadrants shown")
    p.add_argument("--label", type=int, default=None,
                   help="class to generate (--task class; None: every class)")  # fmt: skip
    p.add_argument("--hidden", type=int, nargs="+", default=[500], help="hidden sizes")
    p.add_argument("--z-dim", type=int, default=16, help="latent size")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N images only (None: all)")  # fmt: skip
    p.add_argument("--eval-n", type=int, default=1000, help="test images scored (spread evenly)")
    p.add_argument("--num-samples", type=int, default=1000, help="K importance samples")
    p.add_argument("--out", default="cvae-out", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class CVAE(nn.Module):
    """p(z|c) p(y|z,c) with the guide q(z|c,y); all three are MLPs from :mod:`pyrovae.nets`.

    :param int context_dim: size of the context c.
    :param int target_dim: number of binary target pixels.
    :param int z_dim: latent size.
    :param hidden: hidden sizes of every network.
    """

    def __init__(self, context_dim: int, target_dim: int, z_dim: int, hidden=(500,)):
        super().__init__()
        self.z_dim = z_dim
        self.prior_net = MLPEncoder((context_dim,), z_dim, hidden)  # c -> loc, scale
        self.recognition = MLPEncoder((context_dim + target_dim,), z_dim, hidden)
        self.generation = MLPDecoder((target_dim,), z_dim + context_dim, hidden[::-1])

    def _logits(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = context.expand(*z.shape[:-1], context.shape[-1])  # particles: (K, N, C)
        return self.generation(torch.cat([z, context], -1))[..., 0, :]  # (..., N, T)

    def model(self, context: torch.Tensor, target: torch.Tensor) -> None:
        """p(z|c) p(y|z,c) for a batch: ``context`` ``(N, C)``, ``target`` ``(N, T)``."""
        pyro.module("cvae", self)
        with pyro.plate("data", context.shape[0]):
            loc, scale = self.prior_net(context)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            logits = self._logits(z, context)
            pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=target)

    def guide(self, context: torch.Tensor, target: torch.Tensor) -> None:
        """q(z|c,y)."""
        pyro.module("cvae", self)
        with pyro.plate("data", context.shape[0]):
            loc, scale = self.recognition(torch.cat([context, target], -1))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, context: torch.Tensor, n: int) -> torch.Tensor:
        """Mean targets for ``n`` draws z ~ p(z|c): ``(n, N, T)``."""
        loc, scale = self.prior_net(context)
        z = dist.Normal(loc, scale).sample((n,))
        return torch.sigmoid(self._logits(z, context))


class Baseline(nn.Module):
    """No latent: independent Bernoulli pixels y ~ p(y|c) from one MLP. Its guide is empty, and
    its log-likelihood is exact."""

    def __init__(self, context_dim: int, target_dim: int, hidden=(500,)):
        super().__init__()
        self.net = MLPDecoder((target_dim,), context_dim, hidden)

    def model(self, context: torch.Tensor, target: torch.Tensor) -> None:
        pyro.module("baseline", self)
        with pyro.plate("data", context.shape[0]):
            logits = self.net(context)[..., 0, :]
            pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=target)

    def guide(self, context: torch.Tensor, target: torch.Tensor) -> None:
        pass  # nothing latent to infer

    @torch.no_grad()
    def predict(self, context: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(context)[..., 0, :])


def quadrant_mask(x_shape, visible: int) -> torch.Tensor:
    """A boolean mask ``x_shape`` that is true on the first ``visible`` quadrants (reading order:
    top-left, top-right, bottom-left, bottom-right)."""
    _, h, w = x_shape
    mask = torch.zeros(x_shape, dtype=torch.bool)
    corners = [(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]
    for top, left in corners[:visible]:
        mask[:, top : top + h // 2, left : left + w // 2] = True
    return mask


def make_task(data: pyrovae.data.ImageDataset, task: str, visible: int = 1):
    """``(context, target)`` tensors for a task; see the module docstring.

    :raises pyrovae.DataError: for ``task="class"`` on a dataset without labels.
    """
    x = data.images
    if task == "class":
        if data.labels is None:
            raise pyrovae.DataError(
                f"--task class needs class labels and {data.name} has none; use --task "
                "quadrants, or a labelled dataset (digits, mnist, fashion-mnist)"
            )
        return F.one_hot(data.labels, 10).float(), x.flatten(1)
    mask = quadrant_mask(data.x_shape, visible)
    context = torch.where(mask, x, torch.full_like(x, -1.0)).flatten(1)  # -1: hidden pixel
    return context, x[:, ~mask]  # target: the hidden pixels, (N, T)


def main(args: argparse.Namespace) -> dict:
    """Train the CVAE and the baseline, print log p(y|c) of both; returns them as a dict."""
    for key in ("epochs", "batch_size", "eval_n", "num_samples", "z_dim"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.label is not None and not (args.task == "class" and 0 <= args.label < 10):
        raise ValueError("--label takes a class 0..9, with --task class")
    # One fixed binary draw per image: the context and the target must come from the same one.
    binarize = {"binarized-mnist": "none", "digits": "threshold"}.get(args.dataset, "static")
    train, test = (
        pyrovae.data.load(args.dataset, s, args.data_dir, binarize, seed=args.seed)
        for s in ("train", "test")
    )
    if args.limit is not None:
        train.images = train.images[: args.limit]
        train.labels = train.labels[: args.limit] if train.labels is not None else None
    if args.task == "quadrants" and (train.x_shape[1] % 2 or train.x_shape[2] % 2):
        raise ValueError(f"--task quadrants needs even image sides, got {train.x_shape}")
    ctx, target = make_task(train, args.task, args.visible)
    idx = spread(len(test), args.eval_n)
    test_ctx, test_target = (t[idx] for t in make_task(test, args.task, args.visible))
    what = f"{args.visible} quadrant(s) shown" if args.task == "quadrants" else "label given"
    print(
        f"CVAE on {args.dataset}, task {args.task} ({what}): context {ctx.shape[1]}, target "
        f"{target.shape[1]} pixels, {len(ctx)} training images"
    )
    hidden = tuple(args.hidden)
    pyro.set_rng_seed(args.seed)  # the initial weights too: the same command, the same result
    cvae = CVAE(ctx.shape[1], target.shape[1], args.z_dim, hidden)
    baseline = Baseline(ctx.shape[1], target.shape[1], hidden)
    common = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="cpu",
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    start = time.perf_counter()
    pyrovae.fit(cvae.model, cvae.guide, (ctx, target), loss=TraceMeanField_ELBO(), **common)
    pyrovae.fit(baseline.model, baseline.guide, (ctx, target), **common)
    seconds = time.perf_counter() - start

    pyro.set_rng_seed(args.seed)
    test_data = (test_ctx, test_target)
    baseline_log_p = pyrovae.log_likelihood(baseline.model, baseline.guide, test_data,
                                            num_samples=1)  # fmt: skip
    cvae_elbo = pyrovae.elbo(cvae.model, cvae.guide, test_data)
    cvae_log_p = pyrovae.log_likelihood(cvae.model, cvae.guide, test_data,
                                        num_samples=args.num_samples,
                                        progress=not args.no_progress)  # fmt: skip
    result = {
        "baseline_log_p": float(baseline_log_p.mean()),
        "cvae_elbo": float(cvae_elbo.mean()),
        "cvae_log_p": float(cvae_log_p.mean()),
        "train_seconds": seconds,
    }
    print(f"trained both for {args.epochs} epochs in {seconds:.1f} s")
    print(f"test (n={len(test_ctx)}): log p(target | context), nats per image")
    print(f"  baseline, no latent (exact)        {result['baseline_log_p']:9.2f}")
    print(f"  CVAE ELBO                          {result['cvae_elbo']:9.2f}")
    print(f"  CVAE log p, K={args.num_samples:<6} (importance) {result['cvae_log_p']:9.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_shape = test.x_shape
    if args.task == "quadrants":
        mask = quadrant_mask(x_shape, args.visible)
        n_show, n_draws = 8, 6

        def fill(hidden_pixels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
            # images (..., *x_shape) with the visible pixels from `known`, the rest filled in
            images = known.expand(*hidden_pixels.shape[:-1], *x_shape).clone()
            images[..., ~mask] = hidden_pixels
            return images

        pick = spread(len(idx), n_show)  # spread over the classes of an ordered test set
        x, c = test.images[idx[pick]], test_ctx[pick]
        shown = torch.where(mask, x, torch.full_like(x, 0.5))
        draws = cvae.sample(c, n_draws).transpose(0, 1)  # (n, draws, T)
        rows = torch.cat(
            [
                shown[:, None],
                x[:, None],
                fill(baseline.predict(c), x)[:, None],
                fill(draws, x[:, None]),
            ],
            dim=1,
        )  # (n, 3 + draws, *x_shape)
        plots.plot_image_rows(
            rows, out / "completions.png",
            f"CVAE completions: {n_draws} draws z ~ p(z|c), each decoded to the mean of "
            "p(y|z, c)\n(pixel probabilities, not draws of y); the baseline's mean beside them",
            col_labels=["context", "truth", "baseline", *[f"z{i + 1}" for i in range(n_draws)]],
        )  # fmt: skip
    else:
        labels = [args.label] if args.label is not None else list(range(10))
        onehot = F.one_hot(torch.tensor(labels), 10).float()
        draws = cvae.sample(onehot, 10).transpose(0, 1)  # (classes, 10, D)
        plots.plot_image_rows(
            draws.reshape(len(labels), 10, *x_shape), out / "classes.png",
            "CVAE, one class per row: z ~ p(z|c), decoded to the mean of p(x|z, c) (not a draw)",
            row_labels=[str(c) for c in labels],
        )  # fmt: skip
    print(f"wrote figures to {out}")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
