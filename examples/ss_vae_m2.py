"""Kingma et al.'s M2 semi-supervised VAE, with the class label enumerated by ``TraceEnum_ELBO``.

The generative model treats the class y as a second latent, observed for a few labelled images::

    y ~ Cat(1/10),  z ~ N(0, I),  x | y, z ~ Bernoulli(f(y, z))

and the guide is q(y|x) q(z|x, y): the classifier q(y|x) is part of the guide. For an unlabelled
image, y is summed out exactly: Pyro enumerates its ten values in parallel (``"enumerate":
"parallel"`` on the guide's y site, ``TraceEnum_ELBO``), which gives M2's bound
U(x) = Σ_y q(y|x) [L(x, y)] + H(q(y|x)). For a labelled image, y is observed, and an auxiliary
loss α·(−log q(y|x)) (Kingma et al.'s eq. 9) trains the classifier on the labels, without which
it would learn from unlabelled images alone.

The pair is written as Pyro's SS-VAE example writes it: ``model(xs, ys=None)``,
``guide(xs, ys=None)``, ``model_classify``/``guide_classify``. One ``pyrovae.fit`` call trains
its three objectives — the ELBO on unlabelled images, the ELBO on labelled images and the
auxiliary loss, each on its own data — with one optimizer whose moments persist across steps and
epochs (``pyrovae.Objective``). Every step takes a batch from each. Pixels are grey values
scored with the Bernoulli cross-entropy (as in that tutorial; it is not a normalized density on
[0, 1], so this example reports accuracy, not log p(x)).

    python examples/ss_vae_m2.py --dataset fashion-mnist --data-dir /path/to/data --labels 3000

References: D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling, "Semi-Supervised Learning with
Deep Generative Models", NeurIPS 2014.
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
from pyro.infer import TraceEnum_ELBO
from torch import nn

import pyrovae
from pyrovae import plots
from pyrovae.data import spread
from pyrovae.nets import MLP

__all__ = ["build_parser", "main", "M2", "choose_labelled", "accuracy", "supervised_baseline"]

NUM_CLASSES = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=list(pyrovae.data.DATASETS),
                   help="the images to train on")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--labels", type=int, default=3000, help="labelled training images")
    p.add_argument("--unlabelled", type=int, default=None,
                   help="use N unlabelled images only (None: all the others)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=46.0, help="weight of α·log q(y|x)")
    p.add_argument(
        "--label-repeat", type=int, default=1, help="show each labelled image R times an epoch"
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[500], help="hidden sizes")
    p.add_argument("--z-dim", type=int, default=50, help="latent size (z, beside the class y)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=200, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument(
        "--baseline", action="store_true", help="also train the classifier on the labels alone"
    )
    p.add_argument("--out", default="m2-out", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _Joint(nn.Module):
    # h = MLP(act(A a + B b)): a dense layer on the concatenation [a, b] written as a sum, so
    # the term of the input that is not enumerated (x) is computed once, not once per class.
    def __init__(self, a_dim: int, b_dim: int, hidden, out: int):
        super().__init__()
        self.a = nn.Linear(a_dim, hidden[0])
        self.b = nn.Linear(b_dim, hidden[0], bias=False)
        self.rest = MLP(hidden[0], hidden[1:]) if len(hidden) > 1 else nn.Identity()
        self.out = nn.Linear(hidden[-1], out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(self.rest(F.relu(self.a(a) + self.b(b))))  # broadcasts a against b


class M2(nn.Module):
    """The M2 model/guide pair for flattened images of ``dim`` pixels.

    :param int dim: pixels per image.
    :param int z_dim: size of the continuous latent ("style").
    :param hidden: hidden sizes of the classifier, encoder and decoder.
    """

    def __init__(self, dim: int, z_dim: int = 50, hidden=(500,)):
        super().__init__()
        self.z_dim = z_dim
        self.classifier = nn.Sequential(MLP(dim, hidden), nn.Linear(hidden[-1], NUM_CLASSES))
        self.encoder = _Joint(dim, NUM_CLASSES, hidden, 2 * z_dim)  # q(z | x, y)
        self.decoder = _Joint(z_dim, NUM_CLASSES, hidden[::-1], dim)  # p(x | z, y)

    # -- the pair, as Pyro's SS-VAE example writes it -------------------------------------------
    def model(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """p(y) p(z) p(x|y,z) for images ``(N, D)``; ``ys`` one-hot ``(N, 10)`` where known."""
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(self.z_dim), 1.0).to_event(1))
            prior_y = dist.OneHotCategorical(logits=xs.new_zeros(NUM_CLASSES))
            y = pyro.sample("y", prior_y, obs=ys)  # enumerated: (10, 1, 10)
            logits = self.decoder(z, y)  # (10, N, D) when y is enumerated
            # validate_args=False: grey pixels scored with the Bernoulli cross-entropy
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs: torch.Tensor, ys: torch.Tensor | None = None) -> None:
        """q(y|x) q(z|x,y); y is observed (not sampled) for labelled images."""
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:  # q(y|x), summed over its ten values in parallel
                qy = dist.OneHotCategorical(logits=self.classifier(xs))
                ys = pyro.sample("y", qy, infer={"enumerate": "parallel"})
            loc, raw = self.encoder(xs, ys).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    def model_classify(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """Kingma et al.'s auxiliary term log q(y|x) on labelled images (weighted by α in fit),
        without which the classifier would learn from unlabelled images alone."""
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            qy = dist.OneHotCategorical(logits=self.classifier(xs))
            pyro.sample("y_aux", qy, obs=ys)

    def guide_classify(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """The auxiliary loss has no latent sites."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y|x), ``(N,)``."""
        return self.classifier(x).argmax(-1)


def choose_labelled(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A boolean mask picking ``n`` images, ``n / 10`` of each class, at random.

    :raises ValueError: if ``n`` is not a positive multiple of 10 or a class has too few images.
    """
    if n < NUM_CLASSES or n % NUM_CLASSES:
        raise ValueError(f"--labels must be a positive multiple of {NUM_CLASSES}, got {n}")
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        where = (labels == c).nonzero().flatten()
        if len(where) < n // NUM_CLASSES:
            raise ValueError(
                f"class {c} has {len(where)} training images, fewer than the "
                f"{n // NUM_CLASSES} per class that --labels {n} asks for"
            )
        mask[where[torch.randperm(len(where), generator=g)[: n // NUM_CLASSES]]] = True
    return mask


def accuracy(m2: M2, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of images whose most probable class under q(y|x) is ``y``."""
    return float((m2.predict(x) == y).float().mean())


def supervised_baseline(x, y, dim: int, hidden, epochs: int = 50, lr=1e-3, seed: int = 0) -> M2:
    """The same classifier network trained on the labelled images alone (cross-entropy, Adam,
    batches of 100), for comparison: what the unlabelled images add."""
    torch.manual_seed(seed)
    m2 = M2(dim, 1, hidden)  # only its classifier is used
    opt = torch.optim.Adam(m2.classifier.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            F.cross_entropy(m2.classifier(x[idx]), y[idx]).backward()
            opt.step()
    return m2


def main(args: argparse.Namespace) -> dict:
    """Train M2 with a few labels, print the test accuracy per epoch; returns it in a dict."""
    for key in ("epochs", "batch_size", "z_dim", "label_repeat"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    train, valid, test = (
        pyrovae.data.load(args.dataset, s, args.data_dir) for s in ("train", "valid", "test")
    )
    if train.labels is None:
        raise pyrovae.DataError(
            f"M2 needs class labels for its labelled images and {args.dataset} has none; use a "
            "labelled dataset (digits, mnist, fashion-mnist)"
        )
    x, labels = train.images.flatten(1), train.labels
    labelled = choose_labelled(labels, args.labels, args.seed)
    if args.unlabelled is not None:  # keep every labelled image and N unlabelled ones
        keep = labelled | (torch.cumsum(~labelled, 0) <= args.unlabelled)
        x, labels, labelled = x[keep], labels[keep], labelled[keep]
    n_labelled, n_unlabelled = int(labelled.sum()), int((~labelled).sum())
    x_l, y_l = x[labelled], F.one_hot(labels[labelled], NUM_CLASSES).to(x.dtype)
    x_u = x[~labelled]  # the model never sees an unlabelled image's class
    x_val, y_val = valid.images.flatten(1), valid.labels
    x_test, y_test = test.images.flatten(1), test.labels
    print(
        f"M2 on {args.dataset}: {n_labelled} labelled (each shown {args.label_repeat}× an epoch) "
        f"and {n_unlabelled} unlabelled training images, α={args.alpha:g}, hidden "
        f"{args.hidden}, z {args.z_dim}"
    )
    pyro.set_rng_seed(args.seed)  # the initial weights too: the same command, the same result
    m2 = M2(x.shape[1], args.z_dim, tuple(args.hidden))
    curve: list[dict] = []

    def report(record: dict) -> None:
        record["valid_accuracy"] = accuracy(m2, x_val, y_val)
        curve.append(record)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in record["parts"].items())
        print(
            f"epoch {record['epoch']}: per image {parts}; validation accuracy "
            f"{record['valid_accuracy']:.4f} ({record['seconds']:.1f} s)"
        )

    # Three objectives, one optimizer (Adam with the betas of Pyro's SS-VAE example): the ELBO
    # of unlabelled images with y enumerated, the ELBO of labelled images, and α·(−log q(y|x)).
    # Every step takes a batch of each; labelled batches are sized so that each labelled image
    # is seen label_repeat times an epoch (an epoch is one pass over the unlabelled images).
    steps = -(-n_unlabelled // args.batch_size)
    labelled_batch = max(1, -(-args.label_repeat * n_labelled // steps))
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    objectives = [
        pyrovae.Objective(m2.model, m2.guide, x_u, loss=enum, name="unlabelled"),
        pyrovae.Objective(m2.model, m2.guide, (x_l, y_l), batch_size=labelled_batch,
                          name="labelled"),
        pyrovae.Objective(m2.model_classify, m2.guide_classify, (x_l, y_l),
                          batch_size=labelled_batch, weight=args.alpha, name="classifier"),
    ]  # fmt: skip
    start = time.perf_counter()
    pyrovae.fit(
        objectives, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optim_args={"betas": (0.95, 0.999)}, device="cpu", seed=args.seed, callback=report,
        progress=not args.no_progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    result = {
        "test_accuracy": accuracy(m2, x_test, y_test),
        "valid_accuracy": curve[-1]["valid_accuracy"],
        "labelled": n_labelled,
        "unlabelled": n_unlabelled,
        "epochs": args.epochs,
        "train_seconds": seconds,
    }
    print(
        f"test accuracy {result['test_accuracy']:.4f} on {len(x_test)} images, with "
        f"{result['labelled']} labels, after {args.epochs} epochs ({seconds:.0f} s)"
    )
    if args.baseline:
        start = time.perf_counter()
        alone = supervised_baseline(
            x_l, labels[labelled], x.shape[1], tuple(args.hidden), lr=args.lr, seed=args.seed
        )
        result["baseline_accuracy"] = accuracy(alone, x_test, y_test)
        print(
            f"the same classifier trained on the {result['labelled']} labelled images alone "
            f"(50 epochs, {time.perf_counter() - start:.0f} s): test accuracy "
            f"{result['baseline_accuracy']:.4f}"
        )

    # Kingma et al.'s analogies: infer the style z of a test image, then decode it as each class.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pick = spread(len(x_test), 8)  # spread over the split, which may be ordered by class
    with torch.no_grad():
        xs = x_test[pick]
        y_hat = F.one_hot(m2.predict(xs), NUM_CLASSES).float()
        z = m2.encoder(xs, y_hat).chunk(2, -1)[0]  # (8, z_dim) means of q(z|x, ŷ)
        eye = torch.eye(NUM_CLASSES)
        decoded = torch.sigmoid(m2.decoder(z[:, None], eye[None]))  # (8, 10, D)
    rows = torch.cat([xs[:, None], decoded], 1).reshape(8, NUM_CLASSES + 1, *test.x_shape)
    names = getattr(test, "classes", None) or [str(c) for c in range(NUM_CLASSES)]
    plots.plot_image_rows(
        rows, out / "analogies.png",
        "a test image, then its style z (mean of q(z|x, ŷ)) decoded with each class y:\n"
        "the mean of p(x|z, y), not a draw",
        row_labels=[f"ŷ = {names[int(k)]}" for k in y_hat.argmax(-1)],
        col_labels=["test image", *names],
    )  # fmt: skip
    print(f"wrote figures to {out}")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
