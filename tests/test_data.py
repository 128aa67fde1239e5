import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae import DataError
from pyrovae.data import as_tensors, default_root, dynamic_binarize, load

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_digits_splits_are_disjoint_and_labelled():
    parts = {s: load("digits", s) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [1257, 180, 360]
    for ds in parts.values():
        assert ds.x_shape == (1, 8, 8) and ds.labels.shape == (len(ds),)
        assert 0 <= ds.images.min() and ds.images.max() <= 1
    # together the splits are exactly scikit-learn's 1797 images, each once
    from sklearn.datasets import load_digits

    every = torch.cat([parts[s].images for s in parts]).flatten(1)
    reference = torch.from_numpy(load_digits().data).float() / 16
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(every) == key(reference)


@pytest.mark.parametrize("mode", ["threshold", "static"])
def test_binarize_modes_give_binary_images(mode):
    x = load("digits", "test", binarize=mode).images
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    again = load("digits", "test", binarize=mode).images
    assert torch.equal(x, again)  # static draws are seeded


def test_dynamic_binarization_draws_per_batch_for_train_only():
    train = load("digits", "train", binarize="dynamic")
    assert train.batch_transform is dynamic_binarize and not set(
        train.images.unique().tolist()
    ) <= {0, 1}
    a, b = train.batch_transform(train.tensors)[0], train.batch_transform(train.tensors)[0]
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    test = load("digits", "test", binarize="dynamic")
    assert test.batch_transform is None and set(test.images.unique().tolist()) <= {0.0, 1.0}


def test_binarized_mnist_from_npz_and_amat(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {s: (rng.random((n, 784)) < 0.2).astype(np.uint8) for s, n in
              [("train", 6), ("valid", 3), ("test", 4)]}  # fmt: skip
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    ds = load("binarized-mnist", "valid", root=tmp_path)
    assert ds.images.shape == (3, 1, 28, 28) and ds.labels is None
    assert torch.equal(ds.images.flatten(1), torch.from_numpy(arrays["valid"]).float())
    amat_dir = tmp_path / "amat"
    amat_dir.mkdir()
    np.savetxt(amat_dir / "binarized_mnist_test.amat", arrays["test"], fmt="%d")
    ds = load("binarized-mnist", "test", root=amat_dir)
    assert torch.equal(ds.images.flatten(1), torch.from_numpy(arrays["test"]).float())


def _write_idx(path, array, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(folder, n_train=10010, n_test=7, compress=True):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)),
                   compress)  # fmt: skip
        _write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n), compress)


def test_fashion_mnist_from_flat_gzip_idx_files(tmp_path):
    # Debian's dataset-fashion-mnist layout: the four .gz files directly in the folder.
    _fake_mnist(tmp_path)
    train, valid, test = (
        load("fashion-mnist", s, root=tmp_path) for s in ("train", "valid", "test")
    )
    assert (len(train), len(valid), len(test)) == (10, 10000, 7)
    assert test.x_shape == (1, 28, 28) and test.images.max() <= 1 and test.labels.max() <= 9


def test_mnist_through_torchvision_root_layout(tmp_path):
    pytest.importorskip("torchvision")
    _fake_mnist(tmp_path / "MNIST" / "raw", compress=False)
    ds = load("mnist", "test", root=tmp_path, binarize="static")
    assert ds.images.shape == (7, 1, 28, 28) and set(ds.images.unique().tolist()) <= {0.0, 1.0}


def test_truncated_idx_file_is_reported(tmp_path):
    _fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        load("fashion-mnist", "test", root=tmp_path)


@pytest.mark.parametrize("name, match", [
    ("binarized-mnist", r"found neither .*binarized_mnist.npz nor .*binarized_mnist_train.amat"),
    ("mnist", r"no train-images-idx3-ubyte\[.gz\] found in .*MNIST/raw.*--download"),
])  # fmt: skip
def test_missing_data_says_where_it_looked(tmp_path, name, match):
    with pytest.raises(DataError, match=match):
        load(name, "train", root=tmp_path / "nowhere")


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "cifar"}, "unknown dataset 'cifar'; choose from digits, binarized-mnist"),
    ({"name": "digits", "split": "validation"}, "unknown split 'validation'; choose from"),
    ({"name": "digits", "binarize": "yes"}, "unknown binarization 'yes'"),
])  # fmt: skip
def test_unknown_names_list_the_choices(kwargs, match):
    with pytest.raises(DataError, match=match):
        load(**kwargs)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("PYROVAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_root() == tmp_path / "cache" / "pyrovae"


def test_as_tensors_errors():
    with pytest.raises(DataError, match="different lengths"):
        as_tensors((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(DataError, match="must be a tensor or a torch Dataset"):
        as_tensors([[1, 2]])
    with pytest.raises(DataError, match="scalar"):
        as_tensors(torch.tensor(1.0))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i

    x, y = as_tensors(Items())
    assert x.shape == (3, 2) and y.tolist() == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "binarized_mnist.npz").is_file(), reason="no shared data")
def test_real_binarized_mnist():
    sizes = {s: len(load("binarized-mnist", s, root=SHARED)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 50000, "valid": 10000, "test": 10000}
    test = load("binarized-mnist", "test", root=SHARED).images
    assert abs(test.mean().item() - 0.1325) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="no shared data")
def test_real_fashion_mnist():
    ds = load("fashion-mnist", "test", root=SHARED / "fashion-mnist")
    assert len(ds) == 10000 and ds.labels.bincount().tolist() == [1000] * 10


def test_spread_picks_evenly_over_the_split():
    from pyrovae.data import spread

    assert spread(10, 3).tolist() == [0, 4, 9]  # first, middle, last
    assert spread(5, None).tolist() == [0, 1, 2, 3, 4] and spread(5, 99).tolist() == [0, 1, 2, 3, 4]
    assert len(spread(10000, 1000).unique()) == 1000
