"""PNG figures for a run: ELBO curves, image grids, and the latent space.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["plot_history", "plot_images", "plot_reconstructions", "plot_latent", "image_grid"]


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


def plot_history(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Save the per-epoch train and validation ELBO (nats per datapoint) as a PNG."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in records]
    ax.plot(epochs, [r["train_elbo"] for r in records], label="train ELBO")
    val = [(r["epoch"], r["val_elbo"]) for r in records if r.get("val_elbo") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per datapoint (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


def plot_latent(
    means: torch.Tensor, labels: torch.Tensor | None, path: str | os.PathLike, title: str = ""
) -> None:
    """Save a scatter of latent means ``(N, z_dim)`` coloured by label; codes with more than two
    dimensions are projected on their first two principal components (scikit-learn's PCA)."""
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
        fig.colorbar(pts, ax=ax, label="label")
    else:
        ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.6)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title or "posterior means of q(z|x)")
    fig.savefig(path)
