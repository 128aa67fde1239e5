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
    "quantile_grid",
    "embed",
    "plot_image_rows",
    "plot_traversals",
    "plot_interpolations",
    "plot_manifold",
    "plot_embedding",
    "plot_log_likelihood",
    "plot_log_likelihood_reliability",
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
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    path: str | os.PathLike,
    data: str = "data",
    where: str = "",
) -> None:
    """Save originals (odd rows) above their reconstructions (even rows) as a PNG.

    :param str data: what the odd rows are (e.g. "data, binarized: one seeded draw").
    :param str where: which weights, e.g. "best checkpoint, epoch 12", said in the title.
    """
    n = len(originals)
    nrow = min(n, 10)
    pairs = []
    for start in range(0, n, nrow):
        pairs += [originals[start : start + nrow], reconstructions[start : start + nrow]]
    title = (f"{data} (odd rows)\nreconstructions (even rows): the mean of p(x|z) at the mean "
             "of q(z|x)" + (f"\n{where}" if where else ""))  # fmt: skip
    plot_images(torch.cat(pairs), path, title, nrow)


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
        f"; {int(units)} active units at epoch {records[-1]['epoch']} (the last)"
        if units is not None
        else ""
    )
    ax.set_title(f"the ELBO's parts on validation images{active}", fontsize=10)


def plot_latent(
    means: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | os.PathLike,
    title: str = "",
    classes: Sequence[str] | None = None,
) -> None:
    """Save a map of latent means ``(N, z_dim)``: codes with more than two dimensions are
    projected on their first two principal components (scikit-learn's PCA; the axes say how much
    of the variance each keeps). Labelled codes are coloured by class with a legend (named by
    ``classes``, label ``i`` being ``classes[i]``); unlabelled ones are shaded by density.

    :param means: posterior means ``(N, z_dim)``, e.g. ``vae.encode(x)[0]``.
    :param labels: integer labels ``(N,)``, or ``None``.
    :param path: the PNG to write.
    :param str title: figure title (name the latent layer, e.g. "q(z2|x) means" for an HVAE).
    :param classes: optional class names.
    """
    z, axes = _plane(means)
    fig = _figure(6.8 if labels is not None else 6.2, 5)
    ax = fig.add_subplot()
    if labels is not None:
        _scatter_classes(fig, ax, z, labels.detach().cpu().numpy(), classes)
    else:
        _shade_density(fig, ax, z)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title or "posterior means of q(z|x)")
    fig.savefig(path)


def _plane(means: torch.Tensor) -> tuple[np.ndarray, tuple[str, str]]:
    # codes (N, z_dim) as points (N, 2) and the axes' names
    z = means.detach().float().cpu().numpy()
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"need codes of shape (N, z_dim) with N >= 1, got {z.shape}")
    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], axis=1), ("z1", "(one-dimensional code)")
    if z.shape[1] == 2 or len(z) < 3:  # PCA needs more points than components
        return z[:, :2], ("z1", "z2")
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2).fit(z)
    share = [f"{r:.0%}" if np.isfinite(r) else "?" for r in pca.explained_variance_ratio_]
    return pca.transform(z), (f"PC 1 ({share[0]} of the variance)", f"PC 2 ({share[1]})")


def _scatter_classes(fig, ax, z: np.ndarray, labels: np.ndarray, classes) -> None:
    # one colour per class, named in a legend beside the axes
    present = np.unique(labels)
    if len(present) > 20:  # too many for a legend: a colour bar of the label values
        pts = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="viridis", s=6, alpha=0.8)
        fig.colorbar(pts, ax=ax, label="label")
        return
    from matplotlib import colormaps

    cmap = colormaps["tab10" if present.max(initial=0) < 10 else "tab20"]
    for k in present:
        at = labels == k
        name = classes[k] if classes is not None and 0 <= k < len(classes) else str(k)
        ax.scatter(z[at, 0], z[at, 1], s=6, alpha=0.8, color=cmap(int(k) % cmap.N), label=name)
    ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1), markerscale=2.5,
              frameon=False, fontsize=8)  # fmt: skip


def _shade_density(fig, ax, z: np.ndarray) -> None:
    # unlabelled codes: hexagonal bins shaded by how many codes fall in each (log scale)
    if len(z) < 50:
        ax.scatter(z[:, 0], z[:, 1], s=12, alpha=0.8)
        return
    cells = ax.hexbin(z[:, 0], z[:, 1], gridsize=40, bins="log", mincnt=1, cmap="viridis")
    fig.colorbar(cells, ax=ax, label="codes per cell")


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
    loc: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent traversals: copies of the code ``z`` ``(z_dim,)`` with one coordinate ``d`` at a
    time set to ``steps`` values evenly spaced in ``loc[d] ± span · scale[d]``, the others held
    fixed. By default ``loc = 0`` and ``scale = 1``: the range ``[-span, span]`` in units of the
    standard normal prior; pass the mean and standard deviation of encoded means to scale the
    range to where the posterior puts its codes.

    :param z: the base code, ``(z_dim,)`` (e.g. a posterior mean, or zeros).
    :param dims: the coordinates to traverse (default: all).
    :param float span: half-width of the range, in units of ``scale``.
    :param int steps: values per coordinate.
    :param loc: centres of the ranges ``(z_dim,)`` (default zeros).
    :param scale: their units ``(z_dim,)`` (default ones).
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
    loc = torch.zeros_like(z) if loc is None else loc.to(z)
    scale = torch.ones_like(z) if scale is None else scale.to(z)
    if loc.shape != z.shape or scale.shape != z.shape:
        raise ValueError(f"loc and scale must have the code's shape {tuple(z.shape)}")
    t = torch.linspace(-float(span), float(span), int(steps), dtype=z.dtype, device=z.device)
    codes = z.expand(len(dims), int(steps), len(z)).clone()  # (R, S, z_dim)
    for row, d in enumerate(dims):
        codes[row, :, d] = loc[d] + scale[d] * t
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


def quantile_grid(samples: torch.Tensor, n: int = 15, quantile: float = 0.05) -> torch.Tensor:
    """A square grid of 2-D codes at evenly spaced quantiles of ``samples`` ``(M, 2)``, per axis
    (e.g. draws from a model's prior, a mixture or a flow, whose quantiles are not a standard
    normal's), laid out as :func:`manifold_grid`'s: ``grid[r * n + c]``, ``z1`` growing to the
    right and ``z2`` upwards.

    :param samples: codes ``(M, 2)``, M ≥ 2.
    :param int n: points per side.
    :param float quantile: the grid spans the quantiles ``quantile .. 1 − quantile`` per axis.
    :returns: codes ``(n * n, 2)``.
    """
    if samples.dim() != 2 or samples.shape[1] != 2 or len(samples) < 2:
        raise ValueError(f"samples must be (M >= 2, 2) codes, got {tuple(samples.shape)}")
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
    z = samples.detach().double().cpu()
    q = torch.linspace(float(quantile), 1 - float(quantile), int(n), dtype=torch.float64)
    z1, z2 = torch.quantile(z[:, 0], q), torch.quantile(z[:, 1], q).flip(0)  # (n,) each
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
    col_labels: Sequence[str] | None = None,
    muted: Sequence[bool] | None = None,
) -> None:
    """Save images ``(R, S, C, H, W)`` as a grid of R rows of S images, with optional labels at
    the left of the rows and under the columns.

    :param muted: rows to grey out (e.g. latent units the model does not use).
    """
    if images.dim() != 5:
        raise ValueError(f"expected images (rows, steps, C, H, W), got {tuple(images.shape)}")
    r, s = images.shape[:2]
    h, w = images.shape[-2:]
    grid = image_grid(images.reshape(r * s, *images.shape[2:]), nrow=s)
    label_width = 0.07 * max((len(t) for t in row_labels or []), default=0)  # inches
    fig = _figure(min(14, 0.6 * s + 0.8 + label_width),
                  min(12, 0.6 * r + 0.6 + 0.3 * (col_labels is not None)))  # fmt: skip
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    centre = [1 + i * (w + 1) + w / 2 - 0.5 for i in range(s)]
    ax.set_xticks(centre if col_labels is not None else [], col_labels or [], fontsize=7)
    rows = [1 + i * (h + 1) + h / 2 - 0.5 for i in range(r)]
    ax.set_yticks(rows if row_labels is not None else [], row_labels or [], fontsize=8)
    ax.tick_params(length=0)
    for i, grey in enumerate(muted or []):
        if grey:  # a translucent veil over the row and a grey label
            ax.axhspan(i * (h + 1) + 0.5, (i + 1) * (h + 1) + 0.5, color="0.85", alpha=0.75)
            if row_labels is not None:
                ax.get_yticklabels()[i].set_color("0.55")
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path)


def plot_traversals(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    path: str | os.PathLike,
    dims: Sequence[int] | None = None,
    span: float = 3.0,
    steps: int = 9,
    title: str = "",
    means: torch.Tensor | None = None,
    threshold: float = 0.01,
    where: str = "",
) -> torch.Tensor:
    """Save latent traversals (see :func:`traverse`): row ``i`` decodes ``z`` with coordinate
    ``dims[i]`` swept over ``[-span, span]``, or, given the encoded ``means`` of some data, over
    ``μ ± span · σ`` of that coordinate's means, with the units the model does not use
    (Var(means) ≤ ``threshold``, Burda et al.'s criterion) greyed out.

    :param decode: maps codes ``(N, z_dim)`` to images ``(N, C, H, W)``, e.g. ``vae.decode``.
    :param z: the base code ``(z_dim,)``.
    :param path: the PNG to write.
    :param dims: coordinates to traverse (default: all, or the 16 with the most spread means).
    :param float span: half-width of the sweep (in prior units, or in σ of the means).
    :param int steps: images per row.
    :param str title: figure title.
    :param means: posterior means ``(N, z_dim)``, N ≥ 2, that scale the sweeps.
    :param float threshold: the variance of a unit's means below which it counts as inactive.
    :param str where: which weights, e.g. "best checkpoint, epoch 12", added to the title.
    :returns: the decoded images ``(len(dims), steps, C, H, W)``.
    """
    loc = scale = None
    if means is not None:
        if means.dim() != 2 or means.shape[0] < 2 or means.shape[1] != len(z):
            raise ValueError(f"means must be (N >= 2, {len(z)}) codes, got {tuple(means.shape)}")
        means = means.detach().to(z)
        loc, scale = means.mean(0), means.std(0)
    chosen = dims is None and len(z) > 16
    if dims is None:  # all, or the 16 with the most spread means (the first 16 without means)
        order = list(range(len(z))) if scale is None else scale.argsort(descending=True).tolist()
        dims = sorted(order[:16])
    codes = traverse(z, dims, span, steps, loc, scale)  # (R, S, z_dim)
    x = _decode(decode, codes.reshape(-1, codes.shape[-1]))
    images = x.reshape(*codes.shape[:2], *x.shape[1:])
    labels, cols, muted, note = _traversal_labels(codes, dims, span, scale, threshold)
    if len(dims) < len(z):
        note += f"\n{len(dims)} of {len(z)} units" + (": those whose means spread most" * chosen)
        if scale is not None:
            left = sum(float(v) ** 2 <= threshold for i, v in enumerate(scale) if i not in dims)
            note += f" ({left} inactive not shown)" if left else ""
    title = title or (
        f"latent traversals, each coordinate over [-{span:g}, {span:g}]"
        if scale is None
        else f"latent traversals over μ ± {span:g}σ of each unit's encoded means{note}"
    ) + ("\nthe mean of p(x|z), not draws" + (f"; {where}" if where else ""))
    plot_image_rows(images, path, title, labels, cols, muted)
    return images


def _traversal_labels(codes, dims, span: float, scale, threshold: float):
    # row labels, column labels, greyed rows and a note for the title of a traversal figure
    t = torch.linspace(-float(span), float(span), codes.shape[1]).tolist()
    if scale is None:  # absolute values, the same in every row
        return [f"z{d + 1}" for d in dims], [f"{v:+.2g}" if v else "0" for v in t], None, ""
    rows = [f"z{d + 1}  {float(codes[i, 0, d]):+.2f}…{float(codes[i, -1, d]):+.2f}"
            for i, d in enumerate(dims)]  # fmt: skip
    muted = [float(scale[d]) ** 2 <= threshold for d in dims]
    note = f"\ngreyed: inactive units (variance of the means ≤ {threshold:g})" if any(muted) else ""
    return rows, [f"μ{v:+.3g}σ" if v else "μ" for v in t], muted, note


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
    title = title or "the mean of p(x|z) along straight lines between codes" + (
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
    samples: torch.Tensor | None = None,
    of: str = "the prior p(z)",
) -> torch.Tensor:
    """Save the decodings of a 2-D latent space on a grid of quantiles: the learned data
    manifold of a model with ``z_dim = 2``. Given ``samples`` (e.g. draws from the model's
    prior), the grid follows their quantiles per axis (:func:`quantile_grid`), so that a
    mixture or a flow prior is covered where it puts its mass; else those of the Gaussian
    N(loc, diag scale²) (:func:`manifold_grid`; the standard normal prior by default).

    :param decode: maps codes ``(N, 2)`` to images ``(N, C, H, W)`` (say in ``title`` whether
        they are means or draws; the default title says means of p(x|z)).
    :param path: the PNG to write.
    :param int n: images per side.
    :param float quantile: the grid spans the quantiles ``quantile .. 1 − quantile``.
    :param loc: centre of the Gaussian (default the prior's, 0).
    :param scale: its standard deviations (default the prior's, 1).
    :param str title: figure title.
    :param samples: codes ``(M, 2)`` whose quantiles the grid takes, or ``None``.
    :param str of: what ``samples`` are draws of, for the title.
    :returns: the decodings ``(n * n, C, H, W)``, row-major from the top-left corner.
    """
    if samples is not None:  # (n * n, 2), row-major from the top left
        codes = quantile_grid(samples, n, quantile)
        source = f"of {of} ({len(samples):,} draws, per axis)"
    else:
        codes = manifold_grid(n, quantile, loc, scale)
        standard = tuple(map(float, loc)) == (0.0, 0.0) and tuple(map(float, scale)) == (1, 1)
        source = "of N(0, I)" if standard else "of a Gaussian N(loc, diag scale²)"
    images = _decode(decode, codes)
    grid = image_grid(images, nrow=int(n))
    h, w = images.shape[-2:]
    fig = _figure(6.4, 6.4)
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    every = math.ceil(int(n) / 8)  # at most about 8 values per axis
    at = range(0, int(n), every)
    ax.set_xticks([1 + i * (w + 1) + w / 2 - 0.5 for i in at],
                  [f"{float(codes[i, 0]):.2g}" for i in at])  # fmt: skip
    ax.set_yticks([1 + i * (h + 1) + h / 2 - 0.5 for i in at],
                  [f"{float(codes[i * int(n), 1]):.2g}" for i in at])  # fmt: skip
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(
        title
        or f"the mean of p(x|z) on a {n}×{n} grid of quantiles {quantile:g}…{1 - quantile:g}\n"
        f"{source}",
        fontsize=10,
    )
    fig.savefig(path)
    return images


def plot_embedding(
    means: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | os.PathLike,
    method: str = "tsne",
    seed: int = 0,
    title: str = "",
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """Save a 2-D map of latent means: t-SNE or PCA (see :func:`embed`; PCA's axes say how much
    of the variance they keep), coloured by class with a legend, or shaded by density without
    labels, as in :func:`plot_latent`.

    :param means: posterior means ``(N, z_dim)``.
    :param labels: optional integer labels ``(N,)``.
    :param path: the PNG to write.
    :param str method: ``"tsne"`` or ``"pca"``.
    :param int seed: random state of t-SNE.
    :param str title: figure title.
    :param classes: optional class names, label ``i`` being ``classes[i]``.
    :returns: the 2-D points ``(N, 2)`` that were drawn.
    """
    points = embed(means, method, seed)
    name = {"tsne": "t-SNE", "pca": "PCA"}[method] if means.shape[1] > 2 else "z"
    axes = (f"{name} 1", f"{name} 2")
    if method == "pca" and means.shape[1] > 2:
        points, axes = _plane(means)
    fig = _figure(6.8 if labels is not None else 6.2, 5)
    ax = fig.add_subplot()
    if labels is not None:
        _scatter_classes(fig, ax, points, labels.detach().cpu().numpy(), classes)
    else:
        _shade_density(fig, ax, points)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title or f"{name} of the posterior means ({means.shape[1]}-D codes)")
    fig.savefig(path)
    return points


def plot_log_likelihood(
    log_px: torch.Tensor | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    bins: int | None = None,
    title: str = "",
) -> None:
    """Save a histogram of per-image log p(x) (e.g. from :func:`pyrovae.log_likelihood`), with
    the mean marked and the number of images said; pass a dict ``{name: (N,) tensor}`` to
    overlay several models or splits.

    :param log_px: per-datapoint log-likelihoods in nats, or a dict of them.
    :param path: the PNG to write.
    :param int bins: histogram bins (shared by all series); default about √n, 5 to 40.
    :param str title: figure title (the number of images is added to it).
    """
    series = dict(log_px) if isinstance(log_px, Mapping) else {"log p(x)": log_px}
    values = {k: v.detach().double().cpu().numpy().ravel() for k, v in series.items()}
    if not values or any(len(v) == 0 for v in values.values()):
        raise ValueError("nothing to plot: every series needs at least one value")
    if not all(np.isfinite(v).all() for v in values.values()):
        raise ValueError("log p(x) values must be finite")
    fig = _figure(6, 4)
    _histogram(fig.add_subplot(), values, bins, title or "importance-sampled log p(x)")
    fig.savefig(path)


def _histogram(ax, values: dict, bins: int | None, title: str) -> None:
    # log p(x) per image: about √n bins (30 images get 6, not 40 mostly empty ones), shared by
    # every series, each mean dashed, whole counts, and the number of images in the title
    from matplotlib.ticker import MaxNLocator

    sizes = [len(v) for v in values.values()]
    if bins is None:
        bins = min(40, max(5, math.ceil(math.sqrt(max(sizes)))))
    edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=int(bins))
    for i, (name, v) in enumerate(values.items()):
        color = f"C{i}"
        label = f"{name} (n={len(v):,}, mean {v.mean():.2f})"
        ax.hist(v, bins=edges, alpha=0.5, color=color, label=label)
        ax.axvline(v.mean(), color=color, linestyle="--")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    ax.set_xlabel("log p(x) per image (nats)")
    ax.set_ylabel("images")
    ax.legend()
    n = f"n = {sizes[0]:,} images" if len(sizes) == 1 else "n = " + ", ".join(map(str, sizes))
    ax.set_title(f"{title} ({n})", fontsize=10)


def plot_log_likelihood_reliability(report, path: str | os.PathLike, title: str = "") -> None:
    """Save per-image log p(x) beside how far to trust each estimate: the histogram of log p(x)
    (left) and each image's Pareto k̂ against its log p(x) (right), with the PSIS bands shaded
    (k̂ < 0.5 reliable; up to min(1 − 1/log10 K, 0.7) usable; above unreliable). Where k̂ is
    not estimated (fewer than 50 samples or chains) the right panel shows the standard error.

    :param report: a :class:`pyrovae.diagnostics.LogLikelihoodReport`.
    :param path: the PNG to write.
    :param str title: figure title.
    """
    from .diagnostics import GOOD_KHAT, khat_threshold

    log_px = report.log_px.detach().double().cpu().numpy()
    khat = report.khat.detach().double().cpu().numpy()
    if len(log_px) == 0 or not np.isfinite(log_px).all():
        raise ValueError("log p(x) values must be finite, and at least one")
    fig = _figure(11, 4)
    left, right = fig.subplots(1, 2)
    _histogram(left, {"log p(x)": log_px}, None, "log p(x) per image")
    if np.isnan(khat).all():
        right.scatter(log_px, report.stderr.double().cpu().numpy(), s=6, alpha=0.6)
        right.set_ylabel("standard error of log p(x) (nats)")
        right.set_title(r"($\hat k$ needs K ≥ 50 samples or chains)", fontsize=9)
    else:
        _khat_panel(right, log_px, khat, GOOD_KHAT, khat_threshold(report.num_samples))
    right.set_xlabel("log p(x) per image (nats)")
    fig.suptitle(title or f"log p(x) per image and its reliability (K={report.num_samples})")
    fig.savefig(path)


def _khat_panel(ax, log_px: np.ndarray, khat: np.ndarray, good: float, limit: float) -> None:
    shown = np.clip(khat, -0.5, None)  # −inf (all weights equal) drawn at the floor
    ax.axhspan(-0.5, good, color="C2", alpha=0.12, label=rf"reliable ($\hat k$ < {good})")
    if limit > good:
        ax.axhspan(good, limit, color="C1", alpha=0.15, label=rf"usable ($\hat k$ ≤ {limit:.2f})")
    top = max(1.2, float(np.nanmax(shown)) + 0.05)
    ax.axhspan(max(good, limit), top, color="C3", alpha=0.12, label="unreliable")
    bad = khat > max(good, limit)
    ax.scatter(log_px[~bad], shown[~bad], s=6, color="C0", alpha=0.6)
    ax.scatter(log_px[bad], shown[bad], s=8, color="C3", label=f"{bad.mean():.1%} of images")
    ax.set_ylim(-0.5, top)
    ax.set_ylabel(r"Pareto $\hat k$ of the importance weights")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
