import numpy as np
import pytest
import torch

import pyrovae
from pyrovae import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny inputs: on a busy two-core machine extra OpenMP/torch threads only spin (t-SNE's
    # gradient loop in scikit-learn is OpenMP).
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def _png_shape(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG
    return imread(path).shape


def test_traverse_sweeps_one_coordinate_per_row():
    z = torch.tensor([0.5, -1.0, 2.0])
    codes = plots.traverse(z, dims=[0, 2], span=2.0, steps=5)
    assert codes.shape == (2, 5, 3)
    torch.testing.assert_close(codes[0, :, 0], torch.linspace(-2, 2, 5))
    torch.testing.assert_close(codes[1, :, 2], torch.linspace(-2, 2, 5))
    assert (codes[0, :, 1:] == z[1:]).all() and (codes[1, :, :2] == z[:2]).all()
    assert plots.traverse(z).shape == (3, 9, 3)
    with pytest.raises(ValueError, match="coordinates in 0..2"):
        plots.traverse(z, dims=[3])
    with pytest.raises(ValueError, match="one code"):
        plots.traverse(z[None])


def test_interpolate_includes_both_ends_and_is_linear():
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    line = plots.interpolate(z1, z2, steps=6)
    assert line.shape == (4, 6, 3)
    torch.testing.assert_close(line[:, 0], z1)
    torch.testing.assert_close(line[:, -1], z2)
    steps = line.diff(dim=1)  # equal steps along each line
    torch.testing.assert_close(steps, steps[:, :1].expand_as(steps))
    assert plots.interpolate(z1[0], z2[0], 3).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        plots.interpolate(z1, z2[:2])


def test_manifold_grid_is_quantiles_with_z2_growing_upwards():
    grid = plots.manifold_grid(n=5, quantile=0.1)
    assert grid.shape == (25, 2)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.1, 0.9, 5))
    rows = grid.reshape(5, 5, 2)
    torch.testing.assert_close(rows[0, :, 0], q)  # z1 grows to the right
    torch.testing.assert_close(rows[:, 0, 1], q.flip(0))  # z2 is largest in the top row
    shifted = plots.manifold_grid(n=5, quantile=0.1, loc=(1.0, -2.0), scale=(2.0, 0.5))
    torch.testing.assert_close(shifted, grid * torch.tensor([2.0, 0.5]) + torch.tensor([1, -2.0]))
    with pytest.raises(ValueError, match="quantile"):
        plots.manifold_grid(quantile=0.5)


def test_embed_pca_tsne_and_low_dimensional_codes():
    g = torch.Generator().manual_seed(0)
    means = torch.cat([torch.randn(30, 6, generator=g) + 4, torch.randn(30, 6, generator=g) - 4])
    for method in ("pca", "tsne"):
        points = plots.embed(means, method)
        assert points.shape == (60, 2) and np.isfinite(points).all()
        # two well separated clusters stay separated along some axis
        gap = np.abs(points[:30].mean(0) - points[30:].mean(0)).max()
        assert gap > 3 * max(points[:30].std(0).max(), points[30:].std(0).max()), method
    two = torch.randn(10, 2)
    np.testing.assert_array_equal(plots.embed(two), two.numpy())
    assert plots.embed(torch.randn(10, 1)).shape == (10, 2)
    with pytest.raises(ValueError, match="unknown embedding"):
        plots.embed(means, "umap")


@pytest.fixture
def tiny_vae():
    data = pyrovae.data.load("digits", "test", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(16,), z_dim=2))
    return vae, data


def test_plot_traversals_interpolations_and_manifold(tiny_vae, tmp_path):
    vae, data = tiny_vae
    means = vae.encode(data.images[:6])[0].detach()
    images = plots.plot_traversals(vae.decode, means[0], tmp_path / "trav.png", steps=7)
    assert images.shape == (2, 7, 1, 8, 8)
    assert 0 <= images.min() and images.max() <= 1  # Bernoulli means
    # a row holds every coordinate but one fixed: it equals decoding the traversal codes
    expected = vae.decode(plots.traverse(means[0], steps=7).reshape(-1, 2)).reshape(2, 7, 1, 8, 8)
    torch.testing.assert_close(images, expected.detach())
    assert _png_shape(tmp_path / "trav.png")[:2] > (50, 50)

    lines = plots.plot_interpolations(
        vae.decode, means[:3], means[3:], tmp_path / "interp.png", steps=5,
        ends=(data.images[:3], data.images[3:6]),
    )  # fmt: skip
    assert lines.shape == (3, 5, 1, 8, 8)
    torch.testing.assert_close(lines[:, 0], vae.decode(means[:3]).detach())
    torch.testing.assert_close(lines[:, -1], vae.decode(means[3:6]).detach())
    assert _png_shape(tmp_path / "interp.png")[0] > 50

    grid = plots.plot_manifold(vae.decode, tmp_path / "manifold.png", n=6)
    assert grid.shape == (36, 1, 8, 8)
    torch.testing.assert_close(grid, vae.decode(plots.manifold_grid(6)).detach())
    height, width = _png_shape(tmp_path / "manifold.png")[:2]
    assert abs(height - width) < 0.3 * width  # a square grid of images


def test_plot_manifold_needs_two_dimensional_decoder(tmp_path):
    data = pyrovae.data.load("digits", "test", binarize="threshold")
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(16,), z_dim=3))
    with pytest.raises(RuntimeError):  # the decoder cannot take 2-D codes
        plots.plot_manifold(vae.decode, tmp_path / "m.png")

    def bad_decode(z):
        return z  # not images

    with pytest.raises(ValueError, match="decode must map codes"):
        plots.plot_manifold(bad_decode, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_plot_embedding_and_log_likelihood_histogram(tmp_path):
    means, labels = torch.randn(50, 5), torch.arange(50) % 3
    points = plots.plot_embedding(means, labels, tmp_path / "tsne.png", method="tsne")
    assert points.shape == (50, 2)
    pca = plots.plot_embedding(means, None, tmp_path / "pca.png", method="pca")
    from sklearn.decomposition import PCA

    np.testing.assert_allclose(
        np.abs(pca), np.abs(PCA(2).fit_transform(means.numpy())), rtol=1e-4, atol=1e-5
    )
    # labelled maps are wider: their class legend sits beside the axes
    assert _png_shape(tmp_path / "tsne.png")[:2] == (500, 680)
    assert _png_shape(tmp_path / "pca.png")[:2] == (500, 620)

    plots.plot_log_likelihood(torch.randn(100) - 50, tmp_path / "ll.png")
    plots.plot_log_likelihood(
        {"train": torch.randn(80) - 40, "test": torch.randn(60) - 45}, tmp_path / "ll2.png"
    )
    assert _png_shape(tmp_path / "ll2.png")[:2] == (400, 600)
    with pytest.raises(ValueError, match="finite"):
        plots.plot_log_likelihood(torch.tensor([0.0, float("-inf")]), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one value"):
        plots.plot_log_likelihood({"empty": torch.zeros(0)}, tmp_path / "bad.png")


def test_image_rows_and_existing_figures(tmp_path):
    images = torch.rand(3, 4, 1, 8, 8)
    plots.plot_image_rows(images, tmp_path / "rows.png", "rows", row_labels=["a", "b", "c"])
    assert _png_shape(tmp_path / "rows.png")[0] > 50
    with pytest.raises(ValueError, match="rows, steps"):
        plots.plot_image_rows(images[0], tmp_path / "x.png")
    grid = plots.image_grid(torch.ones(5, 1, 4, 4), nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[1:5, 1:5].min() == 1 and grid[0, 0] == 0.5  # images, then padding
    plots.plot_history(
        [{"epoch": 1, "train_elbo": -50.0, "val_elbo": -52.0}, {"epoch": 2, "train_elbo": -45.0,
          "val_elbo": None}], tmp_path / "h.png",
    )  # fmt: skip
    plots.plot_latent(torch.randn(20, 4), torch.arange(20) % 2, tmp_path / "latent.png")
    for name in ("h.png", "latent.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_history_draws_parts_beta_test_ll_and_best_epoch(tmp_path, monkeypatch):
    figures = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a: figures.append(real(*a)) or figures[-1])
    records = [{"epoch": e, "train_elbo": -40.0 + e, "val_elbo": -41.0 + e - (e == 3) * 5,
                "beta": min(1.0, e / 2), "test_ll": -38.0 + e if e % 2 else None,
                "val_reconstruction": -39.0 + e, "val_kl": 2.0, "active_units": 3}
               for e in (1, 2, 3, 4)]  # fmt: skip
    plots.plot_history(records, tmp_path / "elbo.png", title="run-7")
    fig = figures[-1]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    labels = [ax.get_ylabel() for ax in fig.axes]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert fig._suptitle.get_text() == "run-7"
    assert legend == ["train ELBO", "validation ELBO", "test log p(x) (IS)", "β (KL weight)"]
    assert any("best: epoch 4" in t for t in texts)
    assert "KL(q(z|x) ‖ p(z)), nats" in labels and "E_q[log p(x|z)], nats" in labels
    assert "3 active units at epoch 4" in fig.axes[1].get_title()
    assert all(t == int(t) for t in fig.axes[0].get_xticks())  # whole epochs only
    # without parts or warm-up: one panel, no β axis
    plots.plot_history([{k: r[k] for k in ("epoch", "train_elbo")} for r in records],
                       tmp_path / "plain.png")  # fmt: skip
    assert len(figures[-1].axes) == 1


def _figures(monkeypatch) -> list:
    # the figures the plots draw, kept for inspection
    figures = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a: figures.append(real(*a)) or figures[-1])
    return figures


def _linear_decoder(z_dim: int):
    weight = torch.randn(z_dim, 16, generator=torch.Generator().manual_seed(0))
    return lambda z: torch.sigmoid(z @ weight).reshape(-1, 1, 4, 4)


def test_latent_names_the_classes_and_the_variance_each_axis_keeps(tmp_path, monkeypatch):
    from sklearn.decomposition import PCA

    figures = _figures(monkeypatch)
    z = torch.randn(60, 5) * torch.tensor([3.0, 2.0, 0.1, 0.1, 0.1])
    plots.plot_latent(z, torch.arange(60) % 3, tmp_path / "l.png", classes=["cat", "dog", "owl"])
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog", "owl"]
    share = PCA(n_components=2).fit(z.numpy()).explained_variance_ratio_
    assert ax.get_xlabel() == f"PC 1 ({share[0]:.0%} of the variance)"
    assert ax.get_ylabel() == f"PC 2 ({share[1]:.0%})" and share[0] > 0.5


def test_unlabelled_codes_are_shaded_by_density(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    plots.plot_latent(torch.randn(500, 2), None, tmp_path / "l.png")
    ax, bar = figures[-1].axes
    cells = ax.collections[0].get_array()  # hexagons: codes per cell, empty cells left out
    assert cells.sum() == 500 and cells.min() >= 1 and bar.get_ylabel() == "codes per cell"


@pytest.mark.parametrize("n", [1, 2])
def test_latent_of_one_or_two_codes_is_drawn(tmp_path, n):
    # a tiny folder's validation split: too few points for a PCA of 8-D codes
    plots.plot_latent(torch.randn(n, 8), torch.arange(n), tmp_path / "l.png")
    assert _png_shape(tmp_path / "l.png")[0] > 100


def test_traversals_span_the_encoded_means_and_grey_inactive_units(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    decode = _linear_decoder(3)
    means = torch.randn(400, 3) * torch.tensor([1.0, 0.001, 2.0]) + torch.tensor([0.5, 0.0, -1.0])
    images = plots.plot_traversals(decode, means.mean(0), tmp_path / "t.png", steps=5, means=means)
    loc, scale = means.mean(0), means.std(0)
    codes = plots.traverse(loc, None, 3.0, 5, loc, scale)  # (3, 5, 3)
    assert torch.allclose(codes[2, :, 2], loc[2] + scale[2] * torch.linspace(-3, 3, 5))
    assert torch.equal(codes[2, :, :2], loc[:2].expand(5, 2))  # the other units held fixed
    assert torch.allclose(images, decode(codes.reshape(-1, 3)).reshape(3, 5, 1, 4, 4))
    ax = figures[-1].axes[0]
    rows = ax.get_yticklabels()
    assert rows[2].get_text() == f"z3  {float(codes[2, 0, 2]):+.2f}…{float(codes[2, -1, 2]):+.2f}"
    assert [r.get_color() for r in rows] == ["black", "0.55", "black"]  # z2 is inactive
    assert [t.get_text() for t in ax.get_xticklabels()] == ["μ-3σ", "μ-1.5σ", "μ", "μ+1.5σ",
                                                            "μ+3σ"]  # fmt: skip
    assert "inactive" in ax.get_title()
    with pytest.raises(ValueError, match="means must be"):
        plots.plot_traversals(decode, loc, tmp_path / "t.png", means=means[:1])


def test_manifold_axes_carry_the_code_values(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    plots.plot_manifold(_linear_decoder(2), tmp_path / "m.png", n=5)
    ax = figures[-1].axes[0]
    codes = plots.manifold_grid(5)
    values = [f"{float(v):.2g}" for v in codes[:5, 0]], [f"{float(v):.2g}" for v in codes[::5, 1]]
    assert [t.get_text() for t in ax.get_xticklabels()] == values[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == values[1]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z1", "z2")


def test_manifold_follows_the_quantiles_of_prior_draws(tmp_path, monkeypatch):
    # a prior that is not N(0, I) (a mixture spread to ±4): the grid takes its quantiles, and
    # the title says of what and that the images are means
    figures = _figures(monkeypatch)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 3.0], [4.0, -3.0]])
    pick = torch.randint(0, 2, (4000,), generator=g)
    draws = centres[pick] + 0.3 * torch.randn(4000, 2, generator=g)  # (4000, 2)
    codes = plots.quantile_grid(draws, n=5, quantile=0.05)
    q = torch.tensor([0.05, 0.275, 0.5, 0.725, 0.95], dtype=torch.float64)
    torch.testing.assert_close(codes[:5, 0], torch.quantile(draws[:, 0].double(), q).float())
    torch.testing.assert_close(
        codes[::5, 1], torch.quantile(draws[:, 1].double(), q).flip(0).float()
    )
    assert codes[:, 0].min() < -3.5 and codes[:, 0].max() > 3.5  # not ±1.64
    decode = _linear_decoder(2)
    grid = plots.plot_manifold(decode, tmp_path / "m.png", n=5, samples=draws,
                               of="the MixtureOfGaussians prior p(z)")  # fmt: skip
    torch.testing.assert_close(grid, decode(codes))
    title = figures[-1].axes[0].get_title()
    assert "the mean of p(x|z)" in title and "of the MixtureOfGaussians prior p(z)" in title
    assert "4,000 draws" in title
    plots.plot_manifold(decode, tmp_path / "n.png", n=5)
    assert "of N(0, I)" in figures[-1].axes[0].get_title()
    with pytest.raises(ValueError, match="samples must be"):
        plots.quantile_grid(torch.zeros(10, 3))


@pytest.mark.parametrize("n, bins", [(30, 6), (100, 10), (5000, 40), (3, 5)])
def test_log_likelihood_bins_grow_with_n_and_the_title_says_n(tmp_path, monkeypatch, n, bins):
    figures = _figures(monkeypatch)
    values = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 20 - 500
    plots.plot_log_likelihood(values, tmp_path / "ll.png", title="log p(x), test split")
    ax = figures[-1].axes[0]
    assert len(ax.patches) == bins
    assert ax.get_title() == f"log p(x), test split (n = {n:,} images)"
    ticks = [t for t in ax.get_yticks() if t >= 0]
    assert all(float(t).is_integer() for t in ticks)  # counts of images: whole numbers


def test_reconstructions_say_what_the_data_rows_are(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    x = torch.rand(4, 1, 4, 4)
    plots.plot_reconstructions(x, x, tmp_path / "r.png", "data: binarized at 0.5",
                               "best checkpoint, epoch 3")  # fmt: skip
    title = figures[-1].axes[0].get_title()
    assert title.startswith("data: binarized at 0.5 (odd rows)\n")
    assert "the mean of p(x|z)" in title and "best checkpoint, epoch 3" in title
