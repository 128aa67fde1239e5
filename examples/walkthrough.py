"""From autoencoder to VAE in four steps, with a 2-D latent space you can look at.

Four model/guide pairs share one encoder/decoder architecture and the likelihood
p(x|z) = N(f(z), c·I); they differ in the guide and the prior term:

(a) **autoencoder**: the guide is a point, z = μ(x) (a ``Delta``), and the prior is flat and
    improper (log p(z) = 0): the objective is the reconstruction term alone.
(b) **+ KL, no noise**: the KL of N(μ, σ²) from N(0, I) is ½(μ² + σ² − 1 − log σ²) per
    coordinate. Without noise σ never reaches the decoder, so that term is smallest at σ = 1
    whatever else happens, and what is left is ½μ², i.e. −log p(μ) up to a constant: a point
    guide with the N(0, I) prior. It shrinks codes towards 0 but leaves gaps between them.
(c) **+ fixed noise**: q(z|x) = N(μ(x), s² I) with a fixed s (``--noise``): the decoder must
    decode a whole neighbourhood of each code to the same image, so neighbouring codes overlap.
(d) **VAE**: q(z|x) = N(μ(x), diag σ(x)²) with σ learned, the full ELBO.

For each, the example draws the codes μ(x) of test images coloured by class and the decodings of
a grid of prior quantiles (for (a), which has no prior, of the Gaussian fitted to its codes), and
measures the latent space's regularity:

- **continuity**: how much the decoding changes per step along straight lines between the codes
  of two test images, as RMS pixel change per unit of latent distance (the latent measured in
  units of the codes' own spread, so that spaces of different scales compare); the mean and the
  95th percentile over steps. Lower is smoother.
- **completeness**: how much decodings of prior samples look like data: the mean confidence
  (max softmax probability) of a classifier trained on the real images, on decodings of 1000
  prior samples, next to its confidence on the model's reconstructions of test images. A space
  with holes decodes many prior samples to images the classifier cannot place.

It then retrains the VAE (d) for several values of the fixed variance c in N(f(z), c·I): a
small c weighs the reconstruction term up against the KL term (sharper reconstructions, codes
spread out like an autoencoder's), a large c weighs it down (blurrier, more regular, and in the
end a posterior that ignores x).

Writes ``walkthrough.png`` and ``variance.png``, prints the two tables (also written as
``walkthrough.csv`` and ``variance.csv``).

    python examples/walkthrough.py --dataset fashion-mnist --data-dir /path/to/data
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch import nn

import pyrovae
from pyrovae import plots
from pyrovae.likelihoods import Gaussian
from pyrovae.nets import MLP, MLPDecoder, MLPEncoder

__all__ = [
    "build_parser",
    "main",
    "Variant",
    "VARIANTS",
    "continuity",
    "completeness",
    "train_classifier",
]

#: name -> (title, guide noise: None for a point guide, a float for fixed s, "learned"; prior?)
VARIANTS = {
    "a": ("(a) autoencoder", None, False),
    "b": ("(b) + KL, no noise", None, True),
    "c": ("(c) + fixed noise", "fixed", True),
    "d": ("(d) VAE, learned σ", "learned", True),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=list(pyrovae.data.DATASETS),
                   help="the images to train on")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="data root (None: $PYROVAE_DATA, else ~/.cache/pyrovae)")  # fmt: skip
    p.add_argument("--hidden", type=int, nargs="+", default=[256],
                   help="hidden sizes of the encoder and decoder")  # fmt: skip
    p.add_argument("--variance", type=float, default=0.05, help="c of N(f(z), c·I) in (a)–(d)")
    p.add_argument(
        "--variances", type=float, nargs="*", default=[0.005, 0.05, 0.5],
        help="values of c for the VAE's variance study (none: skip it)",
    )  # fmt: skip
    p.add_argument("--noise", type=float, default=0.3, help="the fixed guide scale s of (c)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--limit", type=int, default=10000, help="train on the first N images")
    p.add_argument("--eval-n", type=int, default=2000, help="test images measured and drawn")
    p.add_argument("--lines", type=int, default=200, help="straight lines for continuity")
    p.add_argument("--grid", type=int, default=12, help="decoded grid size per side")
    p.add_argument("--judge-steps", type=int, default=1500, help="training steps of the judge")
    p.add_argument("--out", default="walkthrough-out", help="folder for figures and tables")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the initial weights, the data order and every draw")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class Variant(nn.Module):
    """One of the four pairs (see the module docstring), with a 2-D latent.

    :param x_shape: image shape.
    :param hidden: hidden sizes of the encoder (the decoder's are reversed).
    :param noise: ``None`` (point guide), ``"fixed"`` (scale ``noise_scale``) or ``"learned"``.
    :param bool prior: use the N(0, I) prior (else a flat improper one, log p(z) = 0).
    :param float variance: c of the likelihood N(f(z), c·I).
    :param float noise_scale: s of the fixed-noise guide.
    """

    def __init__(self, x_shape, hidden, noise, prior: bool, variance: float, noise_scale=0.3):
        super().__init__()
        self.x_shape, self.noise, self.prior, self.noise_scale = x_shape, noise, prior, noise_scale
        self.encoder = MLPEncoder(x_shape, 2, hidden)
        self.decoder = MLPDecoder(x_shape, 2, hidden[::-1])
        self.likelihood = Gaussian(variance)

    def p_z(self, like: torch.Tensor) -> dist.TorchDistribution:
        zeros = like.new_zeros(2)
        if self.prior:
            return dist.Normal(zeros, 1.0).to_event(1)
        return dist.ImproperUniform(dist.constraints.real_vector, (), (2,))  # log p(z) = 0

    def model(self, x: torch.Tensor) -> None:
        pyro.module("variant", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.p_z(x))
            pyro.sample("x", self.likelihood(self.decoder(z), len(self.x_shape)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("variant", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            if self.noise is None:
                q = dist.Delta(loc, event_dim=1)  # z = μ(x): no noise
            elif self.noise == "fixed":
                q = dist.Normal(loc, self.noise_scale).to_event(1)
            else:
                q = dist.Normal(loc, scale).to_event(1)
            pyro.sample("z", q)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z), len(self.x_shape))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes μ(x) and the guide's scale (0 for a point guide)."""
        loc, scale = self.encoder(x)
        if self.noise is None:
            return loc, torch.zeros_like(loc)
        return loc, scale if self.noise == "learned" else torch.full_like(loc, self.noise_scale)

    def sampling_gaussian(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the Gaussian to draw codes from: the prior N(0, I), or for a model
        without one, the Gaussian fitted to its codes (per axis)."""
        if self.prior:
            return torch.zeros(2), torch.ones(2)
        return codes.mean(0), codes.std(0)


def continuity(decode, codes: torch.Tensor, lines: int, steps: int = 16, seed: int = 0):
    """Decoding change per step along straight lines between random pairs of ``codes``.

    Each step's change is the RMS pixel difference of consecutive decodings divided by the step's
    length, the length measured in units of the codes' spread (the RMS distance of the codes from
    their mean), so that latent spaces of different scales compare.

    :returns: ``(mean, 95th percentile)`` over all steps of all lines.
    """
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(codes), (2, lines), generator=g)
    spread = (codes - codes.mean(0)).pow(2).sum(-1).mean().sqrt()
    path = plots.interpolate(codes[i], codes[j], steps + 1)  # (L, steps+1, 2)
    x = decode(path.reshape(-1, 2)).reshape(lines, steps + 1, -1)
    dx = x.diff(dim=1).pow(2).mean(-1).sqrt()  # (L, steps) RMS pixel change
    dz = path.diff(dim=1).norm(dim=-1) / spread  # (L, steps)
    keep = dz > 1e-8 * spread  # a line from a code to itself has no steps
    rate = dx[keep] / dz[keep]
    return float(rate.mean()), float(rate.quantile(0.95))


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 1500, seed: int = 0):
    """A small MLP classifier of real images (plain PyTorch), the judge of completeness:
    ``steps`` Adam steps on batches of 128."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), MLP(x[0].numel(), (256,)), nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(int(steps)):
        idx = torch.randint(len(x), (min(128, len(x)),), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def completeness(classifier: nn.Module, images: torch.Tensor) -> float:
    """Mean max-softmax confidence of ``classifier`` on ``images`` (clamped to [0, 1])."""
    return float(classifier(images.clamp(0, 1)).softmax(-1).max(-1).values.mean())


def _train(model, train, args, seed) -> float:
    pyro.clear_param_store()
    start = time.perf_counter()
    pyrovae.fit(
        model.model, model.guide, train, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, loss=TraceMeanField_ELBO(), device="cpu", seed=seed,
        progress=not args.no_progress,
    )  # fmt: skip
    return time.perf_counter() - start


def _measure(model: Variant, x_test, classifier, args) -> dict:
    codes, scale = model.encode(x_test)
    recon = model.decode(codes)
    loc, std = model.sampling_gaussian(codes)
    g = torch.Generator().manual_seed(args.seed)
    prior_codes = loc + std * torch.randn(1000, 2, generator=g)
    mean_rate, p95_rate = continuity(model.decode, codes, args.lines, seed=args.seed)
    kl = None
    if model.prior and model.noise is not None:  # KL(q(z|x) ‖ N(0, I)) in closed form
        kl = float(
            torch.distributions.kl_divergence(
                torch.distributions.Normal(codes, scale), torch.distributions.Normal(0.0, 1.0)
            )
            .sum(-1)
            .mean()
        )
    return {
        "recon_mse": float((recon - x_test).pow(2).mean()),
        "continuity_mean": mean_rate,
        "continuity_p95": p95_rate,
        "completeness": completeness(classifier, model.decode(prior_codes)),
        "recon_confidence": completeness(classifier, recon),
        "kl": kl,
        "code_spread": float((codes - codes.mean(0)).pow(2).sum(-1).mean().sqrt()),
        "mean_sigma": float(scale.mean()),
        "codes": codes,
        "grid": plots.manifold_grid(args.grid, 0.05, loc.tolist(), std.tolist()),
    }


def _table(rows: list[dict], columns: list[tuple[str, str, str]], path: Path) -> None:
    # print a fixed-width table and write it as CSV; columns: (key, header, format)
    widths = [max(len(h), 9) for _, h, _ in columns]
    print("  ".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = [
            format(row[k], f) if row[k] is not None else "—" for k, _, f in columns
        ]  # fmt: skip
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([k for k, _, _ in columns])
        writer.writerows([[row[k] for k, _, _ in columns] for row in rows])


#: the figure's caption: what its numbers measure
CAPTION = (
    "continuity: RMS pixel change per step along straight lines between the codes of two test "
    "images, per unit of latent distance (in units of the codes' spread); mean and 95th "
    "percentile, lower is smoother.\ncompleteness: the mean confidence of a classifier of real "
    "images on decodings of 1000 prior samples (recon: on reconstructions of test images); "
    "higher: fewer holes. Dashed box: the region decoded below."
)


def _figure(results: list[dict], labels, x_shape, path: Path, suptitle: str, classes) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n = len(results)
    figure = Figure(figsize=(3.6 * n, 9.4), dpi=100, layout="constrained")
    fig, foot = figure.subfigures(2, 1, height_ratios=[8.4, 1.0])  # the panels; legend, caption
    y = labels.numpy()
    for col, r in enumerate(results):
        ax = fig.add_subplot(2, n, col + 1)
        z = r["codes"].numpy()
        for k in np.unique(y):  # one colour per class, named in the legend below
            name = classes[k] if classes else str(k)
            ax.scatter(z[y == k, 0], z[y == k, 1], color=colormaps["tab10"](int(k) % 10), s=3,
                       alpha=0.7, label=name)  # fmt: skip
        grid = r["grid"].numpy()  # the decoded region
        ax.plot(
            [grid[:, 0].min(), grid[:, 0].max(), grid[:, 0].max(), grid[:, 0].min(),
             grid[:, 0].min()],
            [grid[:, 1].min(), grid[:, 1].min(), grid[:, 1].max(), grid[:, 1].max(),
             grid[:, 1].min()],
            color="k", linewidth=0.8, linestyle="--",
        )  # fmt: skip
        ax.set_title(
            f"{r['title']}\nrecon MSE {r['recon_mse']:.4f}\ncontinuity {r['continuity_mean']:.3f}"
            f" (p95 {r['continuity_p95']:.3f})",
            fontsize=9,
        )
        ax.tick_params(labelsize=7)
        ax = fig.add_subplot(2, n, n + col + 1)
        tiles = plots.image_grid(r["decoded"].reshape(-1, *x_shape), nrow=int(len(grid) ** 0.5))
        ax.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(
            f"decoded {r['sampling']} quantiles\ncompleteness {r['completeness']:.3f} "
            f"(recon {r['recon_confidence']:.3f})",
            fontsize=9,
        )
    handles, names = fig.axes[0].get_legend_handles_labels()
    foot.legend(handles, names, loc="upper center", ncols=min(len(names), 10), markerscale=3,
                fontsize=8, frameon=False)  # fmt: skip
    foot.text(0.5, 0.08, CAPTION, ha="center", va="bottom", fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    figure.savefig(path)


def main(args: argparse.Namespace) -> dict:
    """Train the four variants and the variance study; print and write both tables."""
    for key in ("epochs", "batch_size", "eval_n", "lines", "grid", "judge_steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not args.noise > 0 or not args.variance > 0 or any(c <= 0 for c in args.variances):
        raise ValueError("--noise, --variance and --variances must be > 0")
    train = pyrovae.data.load(args.dataset, "train", args.data_dir)
    test = pyrovae.data.load(args.dataset, "test", args.data_dir)
    if train.labels is None:
        raise pyrovae.DataError(
            f"the walkthrough colours codes by class and judges decodings with a classifier, and "
            f"{args.dataset} has no labels; use digits, mnist or fashion-mnist"
        )
    if args.limit is not None:
        train = pyrovae.data.ImageDataset(
            train.images[: args.limit], train.labels[: args.limit], train.name, train.split
        )
    idx = torch.linspace(0, len(test) - 1, min(args.eval_n, len(test))).round().long()
    x_test, y_test = test.images[idx], test.labels[idx]
    x_shape, hidden = train.x_shape, tuple(args.hidden)
    print(f"{args.dataset}: {len(train)} training, {len(x_test)} test images, 2-D latent")
    start = time.perf_counter()
    classifier = train_classifier(train.images, train.labels, args.judge_steps, args.seed)
    acc = float((classifier(x_test).argmax(-1) == y_test).float().mean())
    print(
        f"judge: an MLP classifier of real images, test accuracy {acc:.3f}, confidence on real "
        f"test images {completeness(classifier, x_test):.3f} ({time.perf_counter() - start:.0f} s)"
    )

    def run(key: str, variance: float) -> dict:
        title, noise, prior = VARIANTS[key]
        model = Variant(x_shape, hidden, noise, prior, variance, args.noise)
        seconds = _train(model, train, args, args.seed)
        r = _measure(model, x_test, classifier, args)
        r["decoded"] = model.decode(r["grid"])
        r.update(
            title=title, variant=key, variance=variance, seconds=seconds,
            sampling="prior" if prior else "fitted-Gaussian",
        )  # fmt: skip
        return r

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(key, args.variance) for key in VARIANTS]
    print(f"\nautoencoder to VAE, c = {args.variance:g}, s = {args.noise:g} for (c):")
    cols = [
        ("title", "variant", "<20"),
        ("recon_mse", "recon MSE", ".4f"),
        ("continuity_mean", "cont. mean", ".3f"),
        ("continuity_p95", "cont. p95", ".3f"),
        ("completeness", "complete", ".3f"),
        ("recon_confidence", "recon conf", ".3f"),
        ("code_spread", "code spread", ".2f"),
        ("kl", "KL", ".2f"),
        ("seconds", "train s", ".0f"),
    ]
    _table(results, cols, out / "walkthrough.csv")
    _figure(
        results, y_test, x_shape, out / "walkthrough.png",
        f"{args.dataset}, 2-D latent, N(f(z), {args.variance:g}·I): codes of test images (top) "
        "and decodings of a grid of quantiles of the prior (bottom)", test.classes,
    )  # fmt: skip

    study = []
    if args.variances:
        study = [run("d", c) for c in args.variances]
        for r in study:
            r["title"] = f"(d) VAE, c = {r['variance']:g}"
        print("\nthe VAE (d) for several fixed variances c in N(f(z), c·I):")
        cols = [("variance", "c", "g")] + [c for c in cols if c[0] != "title"] + [
            ("mean_sigma", "mean σ(x)", ".3f")
        ]  # fmt: skip
        _table(study, cols, out / "variance.csv")
        _figure(
            study, y_test, x_shape, out / "variance.png",
            f"{args.dataset}: the VAE with p(x|z) = N(f(z), c·I) for several c", test.classes,
        )  # fmt: skip
    print(f"\nwrote {out / 'walkthrough.png'} and the tables to {out}")
    strip = ("codes", "grid", "decoded")
    return {
        "variants": [{k: v for k, v in r.items() if k not in strip} for r in results],
        "variance_study": [{k: v for k, v in r.items() if k not in strip} for r in study],
        "classifier_accuracy": acc,
    }


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
