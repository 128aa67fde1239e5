"""PNG figures for a run: ELBO curves, image grids, and the latent space.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "plot_history",
    "plot_images",
    "plot_reconstructions",
    "plot_latent",
    "image_grid",
    "traverse",
    "interpolate",
    "manifold_grid",
    "embed",
    "plot_image_rows",
    "plot_traversals",
    "plot_interpolations",
    "plot_manifold",
    "plot_embedding",
    "plot_log_likelihood",
]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` (values in [0, 1]) into one ``(H', W')`` or ``(H', W', 3)``
    array, ``nrow`` images per row (default: a square)."""
    x = images.detach().float().cpu().clamp(0, 1).numpy()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5, dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid[0] if c == 1 else grid[:3].transpose(1, 2, 0)


def plot_images(images: torch.Tensor, path: str | os.PathLike, title: str = "", nrow=None) -> None:
    """Save a grid of images ``(N, C, H, W)`` as a PNG."""
    grid = image_grid(images, nrow)
    fig = _figure(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.savefig(path)


def plot_reconstructions(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike
) -> None:
    """Save originals (odd rows) above their reconstructions (even rows) as a PNG."""
    n = len(originals)
    nrow = min(n, 10)
    pairs = []
    for start in range(0, n, nrow):
        pairs += [originals[start : start + nrow], reconstructions[start : start + nrow]]
    plot_images(torch.cat(pairs), path, "data (odd rows) and reconstructions (even rows)", nrow)


def plot_history(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Save the per-epoch train and validation ELBO (nats per datapoint) as a PNG, with the test
    log-likelihood when the records have it (``test_ll``) and the best validation epoch marked;
    when the records have the ELBO's parts (``val_reconstruction``, ``val_kl``,
    ``active_units``: :func:`pyrovae.metrics.epoch_metrics`) a second panel draws them."""
    from matplotlib.ticker import MaxNLocator

    parts = [r for r in records if r.get("val_kl") is not None]
    fig = _figure(11 if parts else 6, 4)
    axes = fig.subplots(1, 2) if parts else [fig.add_subplot()]
    marker = "o" if len(records) <= 30 else None  # single points of short runs stay visible
    _plot_elbo(axes[0], records, marker)
    if parts:
        _plot_parts(axes[1], parts, marker)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path)


def _series(records: Sequence[dict], key: str) -> tuple[list, list]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return ([e for e, _ in points], [v for _, v in points])


def _plot_elbo(ax, records: Sequence[dict], marker) -> None:
    ax.plot(*_series(records, "train_elbo"), marker=marker, ms=3, label="train ELBO")
    epochs, val = _series(records, "val_elbo")
    if val:
        ax.plot(epochs, val, marker=marker, ms=3, label="validation ELBO")
        best = max(range(len(val)), key=lambda i: val[i])
        ax.axvline(epochs[best], color="grey", ls=":", lw=1)
        ax.annotate(f"best: epoch {epochs[best]}\n{val[best]:.2f}", (epochs[best], val[best]),
                    textcoords="offset points", xytext=(-6, -24), ha="right",
                    fontsize=8)  # fmt: skip
    epochs, test = _series(records, "test_ll")
    if test:
        ax.plot(epochs, test, marker="s", ms=4, ls="--", label="test log p(x) (IS)")
    ax.set_ylabel("nats per datapoint")
    lines, labels = ax.get_legend_handles_labels()
    epochs, beta = _series(records, "beta")
    if beta and min(beta) < max(beta):  # KL warm-up: β on an axis of its own
        beta_ax = ax.twinx()
        lines += beta_ax.plot(epochs, beta, color="grey", ls=":", label="β (KL weight)")
        labels.append("β (KL weight)")
        beta_ax.set_ylim(0, 1.05 * max(beta))
        beta_ax.set_ylabel("β")
    ax.legend(lines, labels, loc="lower right")


def _plot_parts(ax, records: Sequence[dict], marker) -> None:
    # E_q[log p(x|z)] on the left axis, KL(q(z|x) || p(z)) on the right: their scales differ
    epochs, rec = _series(records, "val_reconstruction")
    ax.plot(epochs, rec, marker=marker, ms=3, color="C0", label="E_q[log p(x|z)]")
    ax.set_ylabel("E_q[log p(x|z)], nats", color="C0")
    kl_ax = ax.twinx()
    kl_ax.plot(*_series(records, "val_kl"), marker=marker, ms=3, color="C3",
               label="KL(q(z|x) ‖ p(z))")  # fmt: skip
    kl_ax.set_ylabel("KL(q(z|x) ‖ p(z)), nats", color="C3")
    units = records[-1].get("active_units")
    active = (
        f"; {int(units)} active units at epoch {records[-1]['epoch']}" if units is not None else ""
    )
    ax.set_title(f"the ELBO's parts on validation images{active}", fontsize=10)


def plot_latent(
    means: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | os.PathLike,
    title: str = "",
    classes: Sequence[str] | None = None,
) -> None:
    """Save a scatter of latent means ``(N, z_dim)`` coloured by label; codes with more than two
    dimensions are projected on their first two principal components (scikit-learn's PCA).
    With ``classes`` (label ``i`` is ``classes[i]``) the colour bar names them."""
    z = means.detach().float().cpu().numpy()
    axes = ("z1", "z2")
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        z = PCA(n_components=2).fit_transform(z)
        axes = ("PC 1", "PC 2")
    elif z.shape[1] == 1:
        z = np.concatenate([z, np.zeros_like(z)], axis=1)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    if labels is not None:
        pts = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6, alpha=0.8)
        bar = fig.colorbar(pts, ax=ax, label="class" if classes else "label")
        if classes and len(classes) <= 20:
            bar.set_ticks(range(len(classes)), labels=list(classes))
    else:
        ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.6)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title or "posterior means of q(z|x)")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Exploring a trained model: where to decode (pure tensor functions), then figures of the
# decodings. ``decode`` is any callable mapping codes ``(N, z_dim)`` to images ``(N, C, H, W)``,
# e.g. ``vae.decode`` or ``lambda z: my_decoder(z, y)`` for a conditional model.


def _device_of(decode: Callable) -> torch.device:
    # The device of the module ``decode`` is (or is a bound method of); the CPU otherwise.
    owner = decode if isinstance(decode, torch.nn.Module) else getattr(decode, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        for p in owner.parameters():
            return p.device
    return torch.device("cpu")


def _decode(decode: Callable, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = decode(z.to(_device_of(decode)))
    if x.dim() != 4 or x.shape[0] != z.shape[0]:
        raise ValueError(
            f"decode must map codes ({z.shape[0]}, z_dim) to images ({z.shape[0]}, C, H, W), "
            f"got {tuple(x.shape)}"
        )
    return x.detach().float().cpu()


def traverse(
    z: torch.Tensor,
    dims: Sequence[int] | None = None,
    span: float = 3.0,
    steps: int = 9,
) -> torch.Tensor:
    """Latent traversals: copies of the code ``z`` ``(z_dim,)`` with one coordinate at a time set
    to ``steps`` values evenly spaced in ``[-span, span]`` (in units of the standard normal
    prior), the others held fixed.

    :param z: the base code, ``(z_dim,)`` (e.g. a posterior mean, or zeros).
    :param dims: the coordinates to traverse (default: all).
    :param float span: half-width of the range of values.
    :param int steps: values per coordinate.
    :returns: codes ``(len(dims), steps, z_dim)``.
    :raises ValueError: for a ``z`` that is not a vector, a bad coordinate, or ``steps < 2``.
    """
    if z.dim() != 1:
        raise ValueError(f"traverse needs one code of shape (z_dim,), got {tuple(z.shape)}")
    dims = list(range(len(z))) if dims is None else [int(d) for d in dims]
    if not dims or any(not 0 <= d < len(z) for d in dims):
        raise ValueError(f"dims must be coordinates in 0..{len(z) - 1}, got {dims}")
    if int(steps) < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    values = torch.linspace(-float(span), float(span), int(steps), dtype=z.dtype, device=z.device)
    codes = z.expand(len(dims), int(steps), len(z)).clone()  # (R, S, z_dim)
    for row, d in enumerate(dims):
        codes[row, :, d] = values
    return codes


def interpolate(z1: torch.Tensor, z2: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Points on the straight lines from ``z1`` to ``z2`` (both ends included).

    :param z1: start codes ``(B, z_dim)`` (or one code ``(z_dim,)``).
    :param z2: end codes, the same shape.
    :param int steps: points per line (>= 2).
    :returns: codes ``(B, steps, z_dim)``.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)}, {z2.shape}")
    if int(steps) < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    z1, z2 = torch.atleast_2d(z1), torch.atleast_2d(z2)
    t = torch.linspace(0, 1, int(steps), dtype=z1.dtype, device=z1.device)[None, :, None]
    return z1[:, None] + t * (z2 - z1)[:, None]  # (B, steps, z_dim)


def manifold_grid(
    n: int = 15,
    quantile: float = 0.05,
    loc: Sequence[float] = (0.0, 0.0),
    scale: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """A square grid of 2-D codes at evenly spaced quantiles of a Gaussian N(loc, diag scale²)
    (the standard normal prior by default), as in Kingma & Welling's manifold figures.

    Row ``r`` column ``c`` of the grid is ``grid[r * n + c]``: ``z1`` grows to the right and
    ``z2`` grows upwards (row 0 is the top), so an image of the decodings lines up with a scatter
    plot of the codes.

    :param int n: points per side.
    :param float quantile: the grid spans the quantiles ``quantile .. 1 − quantile`` per axis.
    :param loc: the Gaussian's centre (e.g. the mean of an autoencoder's codes).
    :param scale: its standard deviations per axis.
    :returns: codes ``(n * n, 2)``.
    """
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
    q = torch.linspace(float(quantile), 1 - float(quantile), int(n), dtype=torch.float64)
    u = torch.distributions.Normal(0.0, 1.0).icdf(q)  # (n,) standard normal quantiles
    z1 = float(loc[0]) + float(scale[0]) * u
    z2 = float(loc[1]) + float(scale[1]) * u.flip(0)  # top row: largest z2
    rows, cols = torch.meshgrid(z2, z1, indexing="ij")
    return torch.stack([cols, rows], dim=-1).reshape(-1, 2).float()


def embed(means: torch.Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Project latent means ``(N, z_dim)`` to 2-D with scikit-learn: ``"tsne"`` (t-SNE, PCA
    initialization) or ``"pca"``. Codes that already have two dimensions are returned as they
    are; one-dimensional codes get a zero second coordinate.

    :param means: the codes, ``(N, z_dim)``.
    :param str method: ``"tsne"`` or ``"pca"``.
    :param int seed: random state of t-SNE.
    :returns: an array ``(N, 2)``.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"unknown embedding method {method!r}; choose from tsne, pca")
    z = means.detach().float().cpu().numpy()
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"need at least two codes of shape (N, z_dim), got {z.shape}")
    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], axis=1)
    if z.shape[1] == 2:
        return z
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2).fit_transform(z)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(z) - 1) / 3)  # t-SNE needs perplexity < N
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)


def plot_image_rows(
    images: torch.Tensor,
    path: str | os.PathLike,
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> None:
    """Save images ``(R, S, C, H, W)`` as a grid of R rows of S images, with optional labels at
    the left of the rows."""
    if images.dim() != 5:
        raise ValueError(f"expected images (rows, steps, C, H, W), got {tuple(images.shape)}")
    r, s = images.shape[:2]
    grid = image_grid(images.reshape(r * s, *images.shape[2:]), nrow=s)
    fig = _figure(min(12, 0.6 * s + 1.2), min(12, 0.6 * r + 0.6))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        h = images.shape[-2]
        ax.set_yticks([1 + i * (h + 1) + h / 2 for i in range(r)], list(row_labels))
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title)
    fig.savefig(path)


def plot_traversals(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    path: str | os.PathLike,
    dims: Sequence[int] | None = None,
    span: float = 3.0,
    steps: int = 9,
    title: str = "",
) -> torch.Tensor:
    """Save latent traversals (see :func:`traverse`): row ``i`` decodes ``z`` with coordinate
    ``dims[i]`` swept over ``[-span, span]``.

    :param decode: maps codes ``(N, z_dim)`` to images ``(N, C, H, W)``, e.g. ``vae.decode``.
    :param z: the base code ``(z_dim,)``.
    :param path: the PNG to write.
    :param dims: coordinates to traverse (default: all, at most 16).
    :param float span: half-width of the sweep.
    :param int steps: images per row.
    :param str title: figure title.
    :returns: the decoded images ``(len(dims), steps, C, H, W)``.
    """
    if dims is None:
        dims = range(min(len(z), 16))
    codes = traverse(z, dims, span, steps)  # (R, S, z_dim)
    x = _decode(decode, codes.reshape(-1, codes.shape[-1]))
    images = x.reshape(*codes.shape[:2], *x.shape[1:])
    labels = [f"z{d + 1}" for d in dims]
    title = title or f"latent traversals, each coordinate over [-{span:g}, {span:g}]"
    plot_image_rows(images, path, title, labels)
    return images


def plot_interpolations(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z1: torch.Tensor,
    z2: torch.Tensor,
    path: str | os.PathLike,
    steps: int = 10,
    ends: tuple[torch.Tensor, torch.Tensor] | None = None,
    title: str = "",
) -> torch.Tensor:
    """Save decodings along straight lines between codes (see :func:`interpolate`), one line per
    row.

    :param decode: maps codes ``(N, z_dim)`` to images ``(N, C, H, W)``.
    :param z1: start codes ``(B, z_dim)``, e.g. the posterior means of B images.
    :param z2: end codes ``(B, z_dim)``.
    :param path: the PNG to write.
    :param int steps: images per line.
    :param ends: optional images ``((B, C, H, W), (B, C, H, W))`` shown at the two ends of each
        row (the data the codes came from).
    :param str title: figure title.
    :returns: the decodings ``(B, steps, C, H, W)`` (without the ``ends``).
    """
    codes = interpolate(z1, z2, steps)  # (B, S, z_dim)
    x = _decode(decode, codes.reshape(-1, codes.shape[-1]))
    images = x.reshape(*codes.shape[:2], *x.shape[1:])
    shown = images
    if ends is not None:
        first, last = (e.detach().float().cpu()[:, None] for e in ends)
        shown = torch.cat([first, images, last], dim=1)
    title = title or "decodings along straight lines between codes" + (
        " (data at both ends)" if ends is not None else ""
    )
    plot_image_rows(shown, path, title)
    return images


def plot_manifold(
    decode: Callable[[torch.Tensor], torch.Tensor],
    path: str | os.PathLike,
    n: int = 15,
    quantile: float = 0.05,
    loc: Sequence[float] = (0.0, 0.0),
    scale: Sequence[float] = (1.0, 1.0),
    title: str = "",
) -> torch.Tensor:
    """Save the decodings of a 2-D latent space on a grid of Gaussian quantiles (see
    :func:`manifold_grid`): the learned data manifold of a model with ``z_dim = 2``.

    :param decode: maps codes ``(N, 2)`` to images ``(N, C, H, W)``.
    :param path: the PNG to write.
    :param int n: images per side.
    :param float quantile: the grid spans the quantiles ``quantile .. 1 − quantile``.
    :param loc: centre of the Gaussian (default the prior's, 0).
    :param scale: its standard deviations (default the prior's, 1).
    :param str title: figure title.
    :returns: the decodings ``(n * n, C, H, W)``, row-major from the top-left corner.
    """
    codes = manifold_grid(n, quantile, loc, scale)
    images = _decode(decode, codes)
    title = title or f"decodings of a {n}×{n} grid of prior quantiles"
    plot_images(images, path, title, nrow=int(n))
    return images


def plot_embedding(
    means: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | os.PathLike,
    method: str = "tsne",
    seed: int = 0,
    title: str = "",
) -> np.ndarray:
    """Save a 2-D map of latent means coloured by label: t-SNE or PCA (see :func:`embed`).

    :param means: posterior means ``(N, z_dim)``.
    :param labels: optional integer labels ``(N,)``.
    :param path: the PNG to write.
    :param str method: ``"tsne"`` or ``"pca"``.
    :param int seed: random state of t-SNE.
    :param str title: figure title.
    :returns: the 2-D points ``(N, 2)`` that were drawn.
    """
    points = embed(means, method, seed)
    fig = _figure(6, 5)
    ax = fig.add_subplot()
    if labels is not None:
        c = labels.detach().cpu().numpy()
        pts = ax.scatter(points[:, 0], points[:, 1], c=c, cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(pts, ax=ax, label="label")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6)
    name = {"tsne": "t-SNE", "pca": "PCA"}[method] if means.shape[1] > 2 else "z"
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_title(title or f"{name} of the posterior means ({means.shape[1]}-D codes)")
    fig.savefig(path)
    return points


def plot_log_likelihood(
    log_px: torch.Tensor | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    bins: int = 40,
    title: str = "",
) -> None:
    """Save a histogram of per-image log p(x) (e.g. from :func:`pyrovae.log_likelihood`), with
    the mean marked; pass a dict ``{name: (N,) tensor}`` to overlay several models or splits.

    :param log_px: per-datapoint log-likelihoods in nats, or a dict of them.
    :param path: the PNG to write.
    :param int bins: histogram bins (shared by all series).
    :param str title: figure title.
    """
    series = dict(log_px) if isinstance(log_px, Mapping) else {"log p(x)": log_px}
    values = {k: v.detach().double().cpu().numpy().ravel() for k, v in series.items()}
    if not values or any(len(v) == 0 for v in values.values()):
        raise ValueError("nothing to plot: every series needs at least one value")
    if not all(np.isfinite(v).all() for v in values.values()):
        raise ValueError("log p(x) values must be finite")
    edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=int(bins))
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for i, (name, v) in enumerate(values.items()):
        color = f"C{i}"
        ax.hist(v, bins=edges, alpha=0.5, color=color, label=f"{name} (mean {v.mean():.2f})")
        ax.axvline(v.mean(), color=color, linestyle="--")
    ax.set_xlabel("log p(x) per image (nats)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title(title or "importance-sampled log p(x)")
    fig.savefig(path)
