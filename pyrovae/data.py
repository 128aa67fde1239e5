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
- ``photo-patches``: 32×32 colour patches (8-bit RGB) cut from the two photographs scikit-learn
  ships (``load_sample_images``: china.jpg, flower.jpg); works offline. Splits by vertical bands
  of each photograph (train x < 512, valid 512–575, test 576–639), so no patch overlaps another
  split: 1550/150/150 patches, labelled by photograph.
- ``folder``: your own images (:class:`FolderDataset`), any tree of PNG, JPEG, ... files in grey
  or colour under ``root``, labelled by subfolder; ``train/``, ``valid/`` (or ``val/``) and
  ``test/`` subfolders are the splits when present, else a seeded split.

The data root defaults to ``$PYROVAE_DATA``, else ``~/.cache/pyrovae``. Images are float tensors
in [0, 1]; 8-bit images stay on their grid k/255, so the discretized likelihoods of
:mod:`pyrovae.likelihoods` can score them as probability masses.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .choices import BINARIZE, SPLITS
from .errors import DataError
from .folders import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    SPLIT_FOLDERS,
    FolderDataset,
    LeftOutFileError,
    UnreadableImageError,
    folder_split,
    read_folder,
    read_image,
    write_folder,
)
from .readers import (
    CLASS_NAMES,
    FASHION_MNIST_CLASSES,
    binarized_mnist,
    digits,
    mnist_like,
    photo_patches,
)

__all__ = [
    "ImageDataset",
    "check_tuple",
    "FolderDataset",
    "IMAGE_EXTENSIONS",
    "read_image",
    "DATASETS",
    "BINARIZE",
    "SPLITS",
    "SPLIT_FOLDERS",
    "READER_OPTIONS",
    "UnreadableImageError",
    "LeftOutFileError",
    "MAX_IMAGE_PIXELS",
    "folder_split",
    "load",
    "default_root",
    "as_tensors",
    "dynamic_binarize",
    "threshold_binarize",
    "spread",
    "write_folder",
    "FASHION_MNIST_CLASSES",
    "CLASS_NAMES",
]

#: Binarization modes: none, threshold at 0.5, one seeded Bernoulli draw ("static"), or a fresh
#: draw every training batch ("dynamic"; validation and test get one seeded draw).


class ImageDataset(torch.utils.data.Dataset):
    """Images ``(N, C, H, W)`` in [0, 1] with optional labels; items are single images.

    :param torch.Tensor images: float images ``(N, C, H, W)``.
    :param labels: optional ``(N,)`` integer labels (used for plots, not for training).
    :param str name: dataset name.
    :param str split: split name.
    :param batch_transform: optional function applied by :func:`pyrovae.fit` to each training batch
        (a tuple of tensors), e.g. :func:`dynamic_binarize`.
    :param classes: optional class names; label ``i`` is ``classes[i]``.
    :param skipped: files left out because they could not be read (``skip_bad_files``).
    """

    def __init__(
        self,
        images,
        labels=None,
        name="",
        split="",
        batch_transform=None,
        classes: Sequence[str] | None = None,
        skipped: Sequence[str] = (),
    ):
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.batch_transform = batch_transform
        self.classes = list(classes) if classes is not None else None
        self.skipped = list(skipped)

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


def threshold_binarize(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Binary images from grey ones, x ≥ 0.5 (for a stream of batches; :func:`load`
    thresholds data in memory once)."""
    return ((batch[0] >= 0.5).to(batch[0].dtype), *batch[1:])


def default_root() -> Path:
    """``$PYROVAE_DATA``, else ``$XDG_CACHE_HOME/pyrovae`` (``~/.cache/pyrovae``)."""
    if os.environ.get("PYROVAE_DATA"):
        return Path(os.environ["PYROVAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyrovae"


#: Dataset readers by name: ``(split, root, download, **options) -> (images, labels or None)``
#: or ``(images, labels, extras)``, extras being :class:`ImageDataset` attributes (``classes``,
#: ``skipped``); ``options`` are those of :func:`load` the reader's signature names.
DATASETS: dict[str, Callable] = {
    "digits": digits,
    "binarized-mnist": binarized_mnist,
    "mnist": mnist_like("mnist", "MNIST"),
    "fashion-mnist": mnist_like("fashion-mnist", "FashionMNIST"),
    "photo-patches": photo_patches,
    "folder": read_folder,
}


#: Options of :func:`load` for the readers that take them (the ``folder`` dataset), with their
#: defaults.
READER_OPTIONS = {
    "image_size": None,
    "channels": None,
    "skip_bad_files": False,
    "valid_fraction": 0.1,
    "test_fraction": 0.1,
    "split_seed": 0,
}


def _reader_options(name: str, reader: Callable, options: dict) -> dict:
    # the options the reader's signature names; a set option it does not take is an error
    takes = set(inspect.signature(reader).parameters)
    unknown = set(options) - set(READER_OPTIONS)
    if unknown:
        raise DataError(f"unknown option {sorted(unknown)[0]!r} of load")
    for key, value in options.items():
        if key not in takes and value != READER_OPTIONS[key]:
            raise DataError(f"the {name} dataset takes no {key} option (--{key.replace('_', '-')})")
    return {k: v for k, v in options.items() if k in takes}


def load(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    binarize: str | None = None,
    download: bool = False,
    seed: int = 0,
    **options,
) -> ImageDataset:
    """Load a dataset split as an :class:`ImageDataset` of float images in [0, 1].

    :param str name: a name in :data:`DATASETS`.
    :param str split: ``"train"``, ``"valid"`` or ``"test"``.
    :param root: data folder; default :func:`default_root` (the image folder, for ``folder``).
    :param str binarize: one of :data:`BINARIZE` (default ``"none"``).
    :param bool download: let torchvision download MNIST / Fashion-MNIST if missing.
    :param int seed: seed of the ``"static"`` draw (and of the validation/test draw for
        ``"dynamic"``).
    :param options: for ``folder`` (see :class:`FolderDataset`): ``image_size``, ``channels``,
        ``valid_fraction``, ``test_fraction``, ``split_seed``, and ``skip_bad_files`` (leave out
        files that cannot be decoded, listed in the result's ``skipped``, instead of raising).
    :raises DataError: for an unknown name, split, mode or option, or missing or unreadable files.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    binarize = binarize or "none"
    if binarize not in BINARIZE:
        raise DataError(f"unknown binarization {binarize!r}; choose from {', '.join(BINARIZE)}")
    reader = DATASETS[name]
    options = _reader_options(name, reader, options)
    if root is None and getattr(reader, "needs_root", False):
        raise DataError(f"the {name} dataset needs root=PATH, the folder of images (--data-dir)")
    root = Path(root).expanduser() if root is not None else default_root()
    images, labels, *extras = reader(split, root, download, **options)
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
    extra = extras[0] if extras else {}
    return ImageDataset(x, y, name=name, split=split, batch_transform=transform, **extra)


def spread(n_total: int, n: int | None) -> torch.Tensor:
    """Indices of ``n`` datapoints spread evenly over a split of ``n_total`` (all of them for
    ``None``): a subset to score that is fair to splits ordered by class, as binarized MNIST's
    test split is."""
    n = n_total if n is None else max(1, min(int(n), n_total))
    return torch.linspace(0, n_total - 1, n).round().long()


def _finite_rows(flat: torch.Tensor) -> torch.Tensor:
    # whether each row of (N, D) is finite, checked in row blocks of about 2**22 values: torch's
    # isfinite makes temporaries of 1.5 times its input (a 5.6 GiB split once peaked at 16 GiB)
    rows = max(1, 2**22 // max(flat.shape[1], 1))
    return torch.cat([torch.isfinite(block).all(-1) for block in flat.split(rows)])  # (N,)


def check_tuple(data, what: str = "data") -> None:
    """Refuse a tuple (or list) of tensors that holds something else too, such as Pyro's DMM
    mini-batch ``(sequences, PackedSequence, mask, lengths)``: those are built per batch.

    :raises DataError: naming the item and what to pass instead.
    """
    if not isinstance(data, (tuple, list)) or not any(torch.is_tensor(d) for d in data):
        return
    other = [(i, type(d).__name__) for i, d in enumerate(data) if not torch.is_tensor(d)]
    if other:
        i, kind = other[0]
        raise DataError(
            f"{what} is a {type(data).__name__} whose item {i} is a {kind}, not a tensor: pass "
            "tensors of datapoints (e.g. padded sequences and their lengths), and build the "
            "rest of each batch (packing, masks) with batch_transform="
        )


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
            finite = _finite_rows(t.reshape(n, -1))  # (N,)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                raise DataError(
                    f"{what} has NaN or Inf values in {len(bad)} of {n} items (first: item "
                    f"{int(bad[0])}); remove or repair them before training"
                )
    return tensors
