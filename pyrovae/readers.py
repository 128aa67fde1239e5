"""The built-in datasets' readers (:data:`pyrovae.data.DATASETS`): each returns images as a float
array ``(N, C, H, W)`` in [0, 1], labels ``(N,)`` or ``None``, and optionally the
:class:`~pyrovae.data.ImageDataset` attributes it knows (``classes``).

- :func:`digits`: scikit-learn's bundled 8×8 digits, a fixed 1257/180/360 split.
- :func:`binarized_mnist`: Larochelle's statically binarized MNIST (``.npz`` or ``.amat``).
- :func:`mnist_like`: MNIST and Fashion-MNIST, from IDX files (Debian's layout, gzip or not) or
  torchvision's root layout.
- :func:`photo_patches`: 32×32 colour patches of scikit-learn's two sample photographs.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "digits",
    "binarized_mnist",
    "mnist_like",
    "photo_patches",
    "read_npz",
    "read_idx",
    "FASHION_MNIST_CLASSES",
    "CLASS_NAMES",
    "DEBIAN_FASHION_MNIST",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def digits(split: str, root: Path, download: bool):
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


def read_npz(path: Path, key: str) -> np.ndarray:
    # the file is opened (and closed) here, so a corrupt archive leaves no open handle behind
    try:
        with open(path, "rb") as fh, np.load(fh) as archive:
            if key not in archive.files:
                held = ", ".join(archive.files) or "nothing"
                raise DataError(f"{path} has no array {key!r} (it holds: {held})")
            return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DataError):
            raise
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        message = f"cannot read {key!r} from {path} (a corrupt or partial file?): {what}"
        raise DataError(message) from e


def binarized_mnist(split: str, root: Path, download: bool):
    npz = root / "binarized_mnist.npz"
    amat = root / f"binarized_mnist_{split}.amat"
    if npz.is_file():
        flat = read_npz(npz, split)
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


def read_idx(path: Path) -> np.ndarray:
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


#: Fashion-MNIST's class names, label ``i`` being ``FASHION_MNIST_CLASSES[i]`` (Xiao et al., 2017)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")  # fmt: skip

#: class names of the labelled built-in datasets (the others' labels are their digits)
CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES}


def mnist_like(name: str, tv_class: str):
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
            images, labels = read_idx(img), read_idx(lab)
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
        part = {"train": slice(None, -10000), "valid": slice(-10000, None)}.get(split, slice(None))
        extras = {"classes": list(CLASS_NAMES[name])} if name in CLASS_NAMES else {}
        return images[part], labels[part], extras

    return read


def photo_patches(split: str, root: Path, download: bool):
    from sklearn.datasets import load_sample_images  # ships the two photographs; no download

    bunch = load_sample_images()
    bands = {"train": (0, 512), "valid": (512, 576), "test": (576, 640)}  # columns per split
    left, right = bands[split]
    size, stride = 32, 16
    patches, labels = [], []
    for label, photo in enumerate(bunch.images):  # (427, 640, 3) uint8 each
        for top in range(0, photo.shape[0] - size + 1, stride):
            for x in range(left, right - size + 1, stride):
                patches.append(photo[top : top + size, x : x + size])
                labels.append(label)
    images = np.stack(patches).transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (N, 3, 32, 32)
    classes = [Path(f).stem for f in bunch.filenames]
    return images, np.array(labels, dtype=np.int64), {"classes": classes}
