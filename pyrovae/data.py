"""Datasets: loading images by name, and turning user data into tensors for training.

Known datasets (:data:`DATASETS`):

- ``digits``: scikit-learn's bundled 8×8 digits (1797 images); works offline with no files.
- ``binarized-mnist``: statically binarized MNIST with Larochelle's 50k/10k/10k split, read from
  ``binarized_mnist.npz`` (keys ``train``/``valid``/``test``) or
  ``binarized_mnist_{train,valid,test}.amat``.
- ``mnist`` and ``fashion-mnist``: torchvision's datasets in their root layout
  (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), downloaded only with ``download=True``, or the
  gzip IDX files directly in ``ROOT`` (where Debian's ``dataset-fashion-mnist`` puts them,
  ``/usr/share/datasets/fashion-mnist``). The validation split is the last 10,000 images of the
  official training set.

The data root defaults to ``$PYROVAE_DATA``, else ``~/.cache/pyrovae``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "ImageDataset",
    "DATASETS",
    "BINARIZE",
    "SPLITS",
    "load",
    "default_root",
    "as_tensors",
    "dynamic_binarize",
    "spread",
]

SPLITS = ("train", "valid", "test")
#: Binarization modes: none, threshold at 0.5, one seeded Bernoulli draw ("static"), or a fresh
#: draw every training batch ("dynamic"; validation and test get one seeded draw).
BINARIZE = ("none", "threshold", "static", "dynamic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class ImageDataset(torch.utils.data.Dataset):
    """Images ``(N, C, H, W)`` in [0, 1] with optional labels; items are single images.

    :param torch.Tensor images: float images ``(N, C, H, W)``.
    :param labels: optional ``(N,)`` integer labels (used for plots, not for training).
    :param str name: dataset name.
    :param str split: split name.
    :param batch_transform: optional function applied by :func:`pyrovae.fit` to each training batch
        (a tuple of tensors), e.g. :func:`dynamic_binarize`.
    """

    def __init__(self, images, labels=None, name="", split="", batch_transform=None):
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.batch_transform = batch_transform

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the model sees: a one-tuple with all images."""
        return (self.images,)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"x_shape={self.x_shape})"
        )


def dynamic_binarize(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Draw binary images from grey ones: x ~ Bernoulli(x), fresh for every batch."""
    return (torch.bernoulli(batch[0]), *batch[1:])


def default_root() -> Path:
    """``$PYROVAE_DATA``, else ``$XDG_CACHE_HOME/pyrovae`` (``~/.cache/pyrovae``)."""
    if os.environ.get("PYROVAE_DATA"):
        return Path(os.environ["PYROVAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyrovae"


# ---------------------------------------------------------------------------------------------
# Readers: each returns (images as float array (N, C, H, W) in [0, 1], labels (N,) or None).


def _digits(split: str, root: Path, download: bool):
    from sklearn.datasets import load_digits  # ships its data; no download

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))  # a fixed split
    n_test, n_valid = 360, 180
    parts = {
        "test": order[:n_test],
        "valid": order[n_test : n_test + n_valid],
        "train": order[n_test + n_valid :],
    }
    idx = parts[split]
    return images[idx, None], labels[idx]


def _binarized_mnist(split: str, root: Path, download: bool):
    npz = root / "binarized_mnist.npz"
    amat = root / f"binarized_mnist_{split}.amat"
    if npz.is_file():
        try:
            with np.load(npz) as f:
                flat = f[split]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read split {split!r} from {npz}: {e}") from e
    elif amat.is_file():
        try:
            flat = np.loadtxt(amat, dtype=np.float32, ndmin=2)
        except ValueError as e:
            raise DataError(f"cannot read {amat}: {e}") from e
    else:
        raise DataError(
            f"binarized-mnist: found neither {npz} nor {amat}. Put Larochelle's "
            "binarized_mnist_{train,valid,test}.amat files (or a binarized_mnist.npz with "
            "train/valid/test arrays) in that folder, or point --data-dir / $PYROVAE_DATA at "
            "the folder that has them."
        )
    if flat.ndim != 2 or flat.shape[1] != 784:
        raise DataError(f"binarized-mnist {split}: expected rows of 784 pixels, got {flat.shape}")
    return flat.astype(np.float32).reshape(-1, 1, 28, 28), None


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _mnist_like(name: str, tv_class: str):
    def read(split: str, root: Path, download: bool):
        official = "test" if split == "test" else "train"
        tv_raw = root / tv_class / "raw"
        flat_folders = [root / name, root]
        if name == "fashion-mnist":
            flat_folders.append(DEBIAN_FASHION_MNIST)
        img_stem, lab_stem = _IDX_FILES[official]
        if _find_idx([tv_raw], img_stem) is None:
            img, lab = _find_idx(flat_folders, img_stem), _find_idx(flat_folders, lab_stem)
        else:
            img = lab = None
        if img is not None and lab is not None:  # flat IDX files (Debian's layout)
            images, labels = _read_idx(img), _read_idx(lab)
        elif download or _find_idx([tv_raw], img_stem) is not None:  # torchvision's layout
            import torchvision.datasets  # optional heavy import, only on this path

            ds = getattr(torchvision.datasets, tv_class)(
                str(root), train=official == "train", download=download
            )
            images, labels = ds.data.numpy(), ds.targets.numpy()
        else:
            tried = [str(tv_raw)] + [str(f) for f in flat_folders]
            raise DataError(
                f"{name}: no {img_stem}[.gz] found in {', '.join(tried)}. Pass download=True "
                f"(--download) to fetch it with torchvision into {root}, or point --data-dir / "
                "$PYROVAE_DATA at a folder holding the IDX files"
                + (
                    " (Debian: apt install dataset-fashion-mnist)"
                    if name == "fashion-mnist"
                    else ""
                )
            )
        images = images.astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28) in [0, 1]
        labels = labels.astype(np.int64)
        if split == "train":
            return images[:-10000], labels[:-10000]
        if split == "valid":
            return images[-10000:], labels[-10000:]
        return images, labels

    return read


#: Dataset readers by name: ``(split, root, download) -> (images, labels or None)``.
DATASETS: dict[str, Callable] = {
    "digits": _digits,
    "binarized-mnist": _binarized_mnist,
    "mnist": _mnist_like("mnist", "MNIST"),
    "fashion-mnist": _mnist_like("fashion-mnist", "FashionMNIST"),
}


def load(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    binarize: str | None = None,
    download: bool = False,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset split as an :class:`ImageDataset` of float images in [0, 1].

    :param str name: a name in :data:`DATASETS`.
    :param str split: ``"train"``, ``"valid"`` or ``"test"``.
    :param root: data folder; default :func:`default_root`.
    :param str binarize: one of :data:`BINARIZE` (default ``"none"``).
    :param bool download: let torchvision download MNIST / Fashion-MNIST if missing.
    :param int seed: seed of the ``"static"`` draw (and of the validation/test draw for
        ``"dynamic"``).
    :raises DataError: for an unknown name, split or mode, or missing or unreadable files.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    binarize = binarize or "none"
    if binarize not in BINARIZE:
        raise DataError(f"unknown binarization {binarize!r}; choose from {', '.join(BINARIZE)}")
    root = Path(root).expanduser() if root is not None else default_root()
    images, labels = DATASETS[name](split, root, download)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    transform = None
    if binarize == "threshold":
        x = (x >= 0.5).float()
    elif binarize == "static" or (binarize == "dynamic" and split != "train"):
        g = torch.Generator().manual_seed(seed + SPLITS.index(split))
        x = torch.bernoulli(x, generator=g)
    elif binarize == "dynamic":
        transform = dynamic_binarize
    y = torch.from_numpy(labels) if labels is not None else None
    return ImageDataset(x, y, name=name, split=split, batch_transform=transform)


def spread(n_total: int, n: int | None) -> torch.Tensor:
    """Indices of ``n`` datapoints spread evenly over a split of ``n_total`` (all of them for
    ``None``): a subset to score that is fair to splits ordered by class, as binarized MNIST's
    test split is."""
    n = n_total if n is None else max(1, min(int(n), n_total))
    return torch.linspace(0, n_total - 1, n).round().long()


def as_tensors(data, what: str = "data") -> tuple[torch.Tensor, ...]:
    """The tensors behind ``data``: a tensor ``(N, ...)``, a tuple of such tensors, a
    ``TensorDataset``/:class:`ImageDataset` (their ``tensors``), or any map-style Dataset (its
    items collated). Checks they are non-empty, equally long and finite.

    :raises DataError: naming the problem.
    """
    if isinstance(data, torch.Tensor):
        tensors = (data,)
    elif (
        isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data)
    ):
        tensors = tuple(data)
    elif hasattr(data, "tensors"):
        tensors = tuple(data.tensors)
    elif isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise DataError(f"{what}: an iterable Dataset has no length; pass a tensor") from None
        if n == 0:
            raise DataError(f"{what} is empty: there is nothing to train on or score")
        batch = torch.utils.data.default_collate([data[i] for i in range(n)])
        tensors = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    else:
        raise DataError(f"{what} must be a tensor or a torch Dataset, got {type(data).__name__}")
    if any(t.dim() == 0 for t in tensors):
        raise DataError(f"{what} must have a leading batch dimension, got a scalar")
    n = len(tensors[0])
    if n == 0:
        raise DataError(f"{what} is empty: there is nothing to train on or score")
    if any(len(t) != n for t in tensors):
        raise DataError(f"{what}: tensors of different lengths {[len(t) for t in tensors]}")
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t.reshape(n, -1)).all(-1)  # (N,)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                raise DataError(
                    f"{what} has NaN or Inf values in {len(bad)} of {n} items (first: item "
                    f"{int(bad[0])}); remove or repair them before training"
                )
    return tensors
