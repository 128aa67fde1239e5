"""Kingma et al.'s M2 semi-supervised VAE, with the class label enumerated by ``TraceEnum_ELBO``.

The generative model treats the class y as a second latent, observed for a few labelled images::

    y ~ Cat(1/10),  z ~ N(0, I),  x | y, z ~ Bernoulli(f(y, z))

and the guide is q(y|x) q(z|x, y): the classifier q(y|x) is part of the guide. For an unlabelled
image, y is summed out exactly: Pyro enumerates its ten values in parallel (``"enumerate":
"parallel"`` on the guide's y site, ``TraceEnum_ELBO``), which gives M2's bound
U(x) = Σ_y q(y|x) [L(x, y)] + H(q(y|x)). For a labelled image, y is observed and the model adds
the classification term α·log q(y|x) (Kingma et al.'s eq. 9), without which the classifier would
learn from unlabelled images alone.

Each batch mixes labelled and unlabelled images: the data are three tensors
``(x, y, labelled)`` that ``pyrovae.fit`` passes on as ``model(x, y, labelled)``. Inside, the
batch splits into a ``"labelled"`` plate and an ``"unlabelled"`` plate, so the 3000 labelled
images are seen once per epoch, as in Pyro's SS-VAE tutorial, with no second training loop.
Pixels are grey values scored with the Bernoulli cross-entropy (as in that tutorial; it is not a
normalized density on [0, 1], so this example reports accuracy, not log p(x)).

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
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch import nn

import pyrovae
from pyrovae import plots
from pyrovae.nets import MLP

__all__ = ["build_parser", "main", "M2", "choose_labelled", "accuracy", "supervised_baseline"]

NUM_CLASSES = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=list(pyrovae.data.DATASETS))
    p.add_argument("--data-dir", default=None, help="data root (default $PYROVAE_DATA)")
    p.add_argument("--labels", type=int, default=3000, help="labelled training images")
    p.add_argument("--unlabelled", type=int, default=None, help="use N unlabelled images only")
    p.add_argument("--alpha", type=float, default=46.0, help="weight of α·log q(y|x)")
    p.add_argument(
        "--label-repeat", type=int, default=1, help="show each labelled image R times an epoch"
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[500])
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--baseline", action="store_true", help="also train the classifier on the labels alone"
    )
    p.add_argument("--out", default="m2-out", help="folder for the figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
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
    :param float alpha: weight of the classification term on labelled images.
    """

    def __init__(self, dim: int, z_dim: int = 50, hidden=(500,), alpha: float = 46.0):
        super().__init__()
        self.z_dim, self.alpha = z_dim, float(alpha)
        self.classifier = nn.Sequential(MLP(dim, hidden), nn.Linear(hidden[-1], NUM_CLASSES))
        self.encoder = _Joint(dim, NUM_CLASSES, hidden, 2 * z_dim)  # q(z | x, y)
        self.decoder = _Joint(z_dim, NUM_CLASSES, hidden[::-1], dim)  # p(x | z, y)

    # -- model ---------------------------------------------------------------------------------
    def _generate(self, plate: str, x: torch.Tensor, y: torch.Tensor | None) -> None:
        with pyro.plate(plate, x.shape[0]):
            z = pyro.sample(f"z_{plate}", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            prior_y = dist.OneHotCategorical(logits=x.new_zeros(NUM_CLASSES))
            y_value = pyro.sample(f"y_{plate}", prior_y, obs=y)  # enumerated: (10, 1, 10)
            logits = self.decoder(z, y_value)  # (10, N, D) when y is enumerated
            # validate_args=False: grey pixels scored with the Bernoulli cross-entropy
            px = dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
            pyro.sample(f"x_{plate}", px, obs=x)
            if y is not None:
                # Kingma et al.'s α·log q(y|x): the classifier also learns from the labels
                with poutine.scale(scale=self.alpha):
                    qy = dist.OneHotCategorical(logits=self.classifier(x))
                    pyro.sample("y_aux", qy, obs=y)

    def model(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> None:
        """p(y) p(z) p(x|y,z) for a batch: images ``(N, D)``, labels ``(N,)`` (read only where
        ``labelled``), and the boolean mask ``labelled`` ``(N,)``."""
        pyro.module("m2", self)
        x_l, y_l = x[labelled], F.one_hot(y[labelled], NUM_CLASSES).to(x.dtype)
        if len(x_l):
            self._generate("labelled", x_l, y_l)
        if not bool(labelled.all()):
            self._generate("unlabelled", x[~labelled], None)

    # -- guide ---------------------------------------------------------------------------------
    def _infer(self, plate: str, x: torch.Tensor, y: torch.Tensor | None) -> None:
        with pyro.plate(plate, x.shape[0]):
            if y is None:  # q(y|x), summed over its ten values in parallel
                qy = dist.OneHotCategorical(logits=self.classifier(x))
                y = pyro.sample(f"y_{plate}", qy, infer={"enumerate": "parallel"})
            loc, raw = self.encoder(x, y).chunk(2, -1)
            pyro.sample(f"z_{plate}", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    def guide(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> None:
        """q(y|x) q(z|x,y); y is observed (not sampled) for labelled images."""
        pyro.module("m2", self)
        if bool(labelled.any()):
            self._infer("labelled", x[labelled], F.one_hot(y[labelled], NUM_CLASSES).to(x.dtype))
        if not bool(labelled.all()):
            self._infer("unlabelled", x[~labelled], None)

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
    y = torch.where(labelled, labels, 0)  # the model never sees an unlabelled image's class
    n_labelled, n_unlabelled = int(labelled.sum()), int((~labelled).sum())
    if args.label_repeat > 1:  # oversample the few labelled images
        extra = labelled.nonzero().flatten().repeat(args.label_repeat - 1)
        x, y, labelled = (
            torch.cat([x, x[extra]]),
            torch.cat([y, y[extra]]),
            torch.cat([labelled, labelled[extra]]),
        )
    x_val, y_val = valid.images.flatten(1), valid.labels
    x_test, y_test = test.images.flatten(1), test.labels
    print(
        f"M2 on {args.dataset}: {n_labelled} labelled (each shown {args.label_repeat}× an epoch) "
        f"and {n_unlabelled} unlabelled training images, α={args.alpha:g}, hidden "
        f"{args.hidden}, z {args.z_dim}"
    )
    m2 = M2(x.shape[1], args.z_dim, tuple(args.hidden), args.alpha)
    curve: list[dict] = []

    def report(record: dict) -> None:
        record["valid_accuracy"] = accuracy(m2, x_val, y_val)
        curve.append(record)
        print(
            f"epoch {record['epoch']}: objective {record['train_elbo']:.2f} per image, "
            f"validation accuracy {record['valid_accuracy']:.4f} ({record['seconds']:.1f} s)"
        )

    # A batch may hold labelled images only, and then no site is enumerated: that is expected.
    loss = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    start = time.perf_counter()
    pyrovae.fit(
        m2.model, m2.guide, (x, y, labelled), epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, loss=loss, device="cpu", seed=args.seed, callback=report,
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
        first = labelled[: len(labels)]  # the labelled images, without the repeats
        alone = supervised_baseline(
            x[: len(labels)][first], labels[first], x.shape[1], tuple(args.hidden), lr=args.lr,
            seed=args.seed,
        )  # fmt: skip
        result["baseline_accuracy"] = accuracy(alone, x_test, y_test)
        print(
            f"the same classifier trained on the {result['labelled']} labelled images alone "
            f"(50 epochs, {time.perf_counter() - start:.0f} s): test accuracy "
            f"{result['baseline_accuracy']:.4f}"
        )

    # Kingma et al.'s analogies: infer the style z of a test image, then decode it as each class.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pick = torch.linspace(0, len(x_test) - 1, 8).round().long()
    with torch.no_grad():
        xs = x_test[pick]
        y_hat = F.one_hot(m2.predict(xs), NUM_CLASSES).float()
        z = m2.encoder(xs, y_hat).chunk(2, -1)[0]  # (8, z_dim) means of q(z|x, ŷ)
        eye = torch.eye(NUM_CLASSES)
        decoded = torch.sigmoid(m2.decoder(z[:, None], eye[None]))  # (8, 10, D)
    rows = torch.cat([xs[:, None], decoded], 1).reshape(8, NUM_CLASSES + 1, *test.x_shape)
    plots.plot_image_rows(rows, out / "analogies.png", "test image | its style decoded as 0…9")
    print(f"wrote figures to {out}")
    return result


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
