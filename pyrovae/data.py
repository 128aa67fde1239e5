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

import gzip
import inspect
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "ImageDataset",
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


def _read_npz(path: Path, key: str) -> np.ndarray:
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


def _binarized_mnist(split: str, root: Path, download: bool):
    npz = root / "binarized_mnist.npz"
    amat = root / f"binarized_mnist_{split}.amat"
    if npz.is_file():
        flat = _read_npz(npz, split)
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


#: Fashion-MNIST's class names, label ``i`` being ``FASHION_MNIST_CLASSES[i]`` (Xiao et al., 2017)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")  # fmt: skip

#: class names of the labelled built-in datasets (the others' labels are their digits)
CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES}


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
        part = {"train": slice(None, -10000), "valid": slice(-10000, None)}.get(split, slice(None))
        extras = {"classes": list(CLASS_NAMES[name])} if name in CLASS_NAMES else {}
        return images[part], labels[part], extras

    return read


def _photo_patches(split: str, root: Path, download: bool):
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


# ---------------------------------------------------------------------------------------------
# Image folders.

#: File name endings read as images (case-insensitive), decoded by Pillow.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pnm")  # fmt: skip
#: Subfolder names taken as a split, by split.
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}


#: The most pixels an image file may have (width × height): Pillow's own decompression-bomb
#: limit (1024 × 1024 × 1024 // 4 // 3, about 89.5 million: 256 MiB as RGB), applied by pyrovae
#: once, as an unreadable file (skipped with ``skip_bad_files``) with one message.
MAX_IMAGE_PIXELS = 89_478_485

#: Pillow modes read as grey or with alpha; every other mode (palette, CMYK, ...) becomes RGB.
_PIL_MODES = {"1": "L", "L": "L", "I;16": "I;16", "LA": "LA", "RGBA": "RGBA", "PA": "RGBA"}


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (skipped with ``skip_bad_files``)."""


def _decode(path: Path) -> torch.Tensor:
    # any image file -> uint8 (C, H, W), alpha dropped; decoded by Pillow, as torchvision's
    # ImageFolder does (torchvision.io's decoders are deprecated from torchvision 0.29)
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: ours below is the one
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise _too_large(path, None) from None
    except Exception as e:  # Pillow raises many kinds for a corrupt or unknown file
        raise UnreadableImageError(f"cannot read image {path}: {e}") from None
    if im.width * im.height > MAX_IMAGE_PIXELS:
        im.close()
        raise _too_large(path, im.size)
    try:
        with im:
            im.load()
            mode = _PIL_MODES.get(im.mode, "RGB")
            array = np.asarray(im.convert(mode) if mode != im.mode else im)
    except Exception as e:  # Pillow raises many kinds for a corrupt or unknown file
        raise UnreadableImageError(f"cannot read image {path}: {e}") from None
    img = torch.from_numpy(np.array(np.atleast_3d(array).transpose(2, 0, 1), order="C"))
    if img.dtype != torch.uint8:  # 16-bit grey: keep the top 8 bits' scale
        img = (img.float() * (255 / 65535)).round().to(torch.uint8)
    return img[:-1] if img.shape[0] in (2, 4) else img  # drop the alpha channel


def _too_large(path: Path, size: tuple[int, int] | None) -> UnreadableImageError:
    pixels = f"{size[0]}×{size[1]} pixels" if size else "too many pixels"
    return UnreadableImageError(
        f"cannot read image {path}: {pixels}, more than the {MAX_IMAGE_PIXELS} pyrovae decodes "
        "(pyrovae.data.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
    )


def _channels(img: torch.Tensor, channels: int | None) -> torch.Tensor:
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    if channels is None or img.shape[0] == channels:
        return img
    return rgb_to_grayscale(img) if channels == 1 else img.expand(3, *img.shape[1:])


def _fit(img: torch.Tensor, size: int | None, path: Path) -> torch.Tensor:
    # resize the shorter side to `size` (antialiased) and cut the centre size × size
    from torchvision.transforms.v2.functional import center_crop, resize

    if size is None:
        return img
    h, w = img.shape[-2:]
    if min(h, w) < size:
        raise DataError(f"{path} is {w}×{h} pixels, smaller than the image size {size} "
                        "(--image-size); pass a smaller size or remove the image")  # fmt: skip
    if min(h, w) > size:
        img = resize(img, size, antialias=True)
    return center_crop(img, [size, size])


def read_image(path, image_size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Decode one image file to uint8 ``(C, H, W)``: alpha dropped, converted to ``channels``
    (1: grey by ITU-R 601 luma, 3: RGB) if given, resized so the shorter side is ``image_size``
    and centre-cropped to a square if given.

    :raises UnreadableImageError: for a file that cannot be decoded.
    :raises DataError: for an image smaller than ``image_size``.
    """
    path = Path(path)
    return _fit(_channels(_decode(path), channels), image_size, path)


class LeftOutFileError(UnreadableImageError):
    """An image name under an image folder that is not read: a link that leads out of the
    folder, or that leads nowhere (counted, and skipped with ``skip_bad_files``)."""


def _link_problem(path: Path, folder: Path, real_folder: Path) -> str | None:
    # why a file (a link, or under a linked folder) is not read: None for a file of the folder
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, or a loop
        return f"{path} is a link that leads nowhere (a dangling link)"
    if not real.is_relative_to(real_folder):
        return f"{path} is a link to {real}, outside the image folder {folder}"
    return None


def _images_under(folder: Path, left_out: list[str] | None = None) -> list[Path]:
    # every image file below `folder`, sorted; hidden files and folders are left out, and so
    # are links out of the folder or to nothing (their reasons appended to left_out)
    files, real_folder = [], folder.resolve()
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        problem = _link_problem(p, folder, real_folder)
        if problem is not None:
            if left_out is not None:
                left_out.append(problem)
        elif p.is_file():
            files.append(p)
    return files


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _seeded_split(files: list[Path], fractions: dict[str, float], seed: int):
    # {split: files} for the splits in `fractions`, the rest in "train"; file order kept
    order = np.random.default_rng(seed).permutation(len(files))
    parts, start = {}, 0
    for split in ("test", "valid"):
        if split in fractions:
            n = int(round(fractions[split] * len(files)))
            parts[split] = sorted(order[start : start + n])
            start += n
    parts["train"] = sorted(order[start:])
    return {k: [files[i] for i in v] for k, v in parts.items()}


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for key, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{key} must be in [0, 1), got {f}")
    if valid_fraction + test_fraction >= 1:
        raise DataError(f"valid_fraction + test_fraction must be < 1, got "
                        f"{valid_fraction} + {test_fraction}")  # fmt: skip


def folder_split(root, split: str, valid_fraction=0.1, test_fraction=0.1, seed=0, left_out=None):
    """The image files of one split of an image folder, and the folder their labels are relative
    to: ``root/train``, ``root/valid`` (or ``val``, ``validation``), ``root/test`` when
    ``root/train`` exists (a missing valid or test folder is carved from train with its
    fraction); else a seeded split of all images under ``root``. Links that lead out of the
    folder or nowhere are left out, and said why in the list ``left_out`` if one is given.

    :returns: ``(files, base)``.
    :raises DataError: for a missing folder, no images, or an empty split.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (--data-dir)")
    _check_fractions(valid_fraction, test_fraction)
    base = _split_folder(root, "train")
    if base is not None and _split_folder(root, split) is not None:
        base = _split_folder(root, split)
        files = _images_under(base, left_out)
    else:
        base = base or root
        missing = {"valid": valid_fraction, "test": test_fraction}
        if base != root:
            missing = {s: f for s, f in missing.items() if _split_folder(root, s) is None}
        everything = _images_under(base, left_out)
        if not everything:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {base}")
        files = _seeded_split(everything, missing, seed)[split]
    if not files:
        raise DataError(f"the {split} split of {root} has no images: add images (at {base}) or "
                        f"raise --{split}-fraction")  # fmt: skip
    return files, base


def _classes(root: Path) -> list[str]:
    # class names: the first-level subfolders holding images, over every split folder
    bases = [_split_folder(root, s) for s in SPLITS]
    bases = [b for b in bases if b is not None] or [root]
    names = set()
    for base in bases:
        for f in _images_under(base):
            parts = f.relative_to(base).parts
            names.add(parts[0] if len(parts) > 1 else ".")
    return sorted(names) if names - {"."} else []


class FolderDataset(torch.utils.data.Dataset):
    """The images of one split of an image folder, decoded lazily, one file per item: a map-style
    Dataset to stream through a :class:`~torch.utils.data.DataLoader` (its workers decode), for
    data larger than memory. Items are float images ``(C, H, W)`` in [0, 1] on the 8-bit grid
    k/255. :func:`load` (``"folder"``) decodes all of a split into memory instead.

    Labels come from the first-level subfolders (under the split folder, if any): ``labels[i]``
    indexes ``classes``; images directly in the folder are the class ``"."``. Without
    subfolders, ``labels`` and ``classes`` are ``None``.

    :param root: the image folder.
    :param str split: ``"train"``, ``"valid"`` or ``"test"`` (see :func:`folder_split`).
    :param int image_size: resize (shorter side) and centre-crop every image to this square size;
        default: images must all have one size.
    :param int channels: 1 (grey) or 3 (RGB) to convert every image to; default: images must all
        have one channel count.
    :param float valid_fraction: share of the images in the validation split (without folders).
    :param float test_fraction: share of the images in the test split (without folders).
    :param int seed: seed of the split.
    :param bool skip_bad_files: leave out links that lead out of the folder or nowhere (listed
        in ``skipped``); without it they are refused.
    :raises DataError: for a missing folder, no images, bad options, a link out of the folder or
        to nothing (without ``skip_bad_files``); when an item is read, for an
        unreadable file (:class:`UnreadableImageError`) or one whose size or channels differ
        from the first image's (naming both files and the option to set).
    """

    def __init__(
        self,
        root,
        split: str = "train",
        image_size: int | None = None,
        channels: int | None = None,
        valid_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        skip_bad_files: bool = False,
    ):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if channels not in (None, 1, 3):
            raise DataError(f"channels (--channels) must be 1 or 3, got {channels}")
        if image_size is not None and (int(image_size) != image_size or image_size < 1):
            raise DataError(f"image_size (--image-size) must be an integer >= 1, got {image_size}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = None if image_size is None else int(image_size)
        self.channels = channels
        #: the names left out: links out of the folder or to nothing (with skip_bad_files)
        self.skipped: list[str] = []
        self.files, base = folder_split(
            self.root, split, valid_fraction, test_fraction, seed, self.skipped
        )
        if self.skipped and not skip_bad_files:
            raise LeftOutFileError(
                f"{self.skipped[0]}"
                + (f" (and {len(self.skipped) - 1} more links)" if len(self.skipped) > 1 else "")
                + "; pyrovae reads only files inside the folder: remove the link, or pass "
                "skip_bad_files=True (--skip-bad-files) to leave such files out"
            )
        self.classes = _classes(self.root) or None
        self.labels = None
        if self.classes is not None:
            index = {name: i for i, name in enumerate(self.classes)}
            names = [f.relative_to(base).parts for f in self.files]
            self.labels = torch.tensor([index[p[0] if len(p) > 1 else "."] for p in names])
        self._shape: tuple[int, ...] | None = None
        #: applied by pyrovae.fit (and pyrovae.lightning.fit) to each streamed training batch,
        #: e.g. :func:`dynamic_binarize`
        self.batch_transform: Callable | None = None

    def read(self, i: int) -> torch.Tensor:
        """File ``i`` decoded as uint8 ``(C, H, W)`` (converted, resized and cropped)."""
        return read_image(self.files[i], self.image_size, self.channels)

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The shape of every item, that of the first image (read once)."""
        if self._shape is None:
            self._shape = tuple(self.read(0).shape)
        return self._shape

    def check(self, img: torch.Tensor, path: Path, first: Path | None = None) -> None:
        """Raise :class:`DataError` unless ``img`` (uint8 ``(C, H, W)`` of ``path``) has the
        shape of the dataset's first image (the file ``first``, default the first listed),
        naming the option that would reconcile them."""
        if tuple(img.shape) == self.x_shape:
            return
        first = first or self.files[0]
        if img.shape[0] != self.x_shape[0]:
            raise DataError(f"mixed channel counts: {path} has {img.shape[0]}, {first} has "
                            f"{self.x_shape[0]}; pass channels=1 or 3 (--channels)")  # fmt: skip
        raise DataError(f"images of different sizes: {path} is {img.shape[2]}×{img.shape[1]}, "
                        f"{first} is {self.x_shape[2]}×{self.x_shape[1]}; pass image_size "
                        "(--image-size)")  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.read(i)  # (C, H, W) uint8
        self.check(img, self.files[i])
        return img.float() / 255.0  # (C, H, W) in [0, 1], on the 8-bit grid

    def __repr__(self) -> str:
        return f"FolderDataset({str(self.root)!r}, split={self.split!r}, n={len(self)})"


def _folder(split: str, root: Path, download: bool, image_size=None, channels=None,
            skip_bad_files=False, valid_fraction=0.1, test_fraction=0.1, split_seed=0):  # fmt: skip
    ds = FolderDataset(root, split, image_size, channels, valid_fraction, test_fraction, split_seed,
                       skip_bad_files)  # fmt: skip
    images, kept, skipped = None, [], list(ds.skipped)  # images: (N, C, H, W) uint8, as decoded
    for i, path in enumerate(ds.files):
        try:
            img = ds.read(i)  # (C, H, W) uint8
        except UnreadableImageError as e:
            if not skip_bad_files:
                raise DataError(f"{e}; remove it or pass skip_bad_files=True "
                                "(--skip-bad-files)") from None  # fmt: skip
            skipped.append(str(path))
            continue
        if images is None:
            ds._shape = tuple(img.shape)
            images = torch.empty((len(ds.files), *img.shape), dtype=torch.uint8)
        ds.check(img, path, ds.files[kept[0]] if kept else path)
        images[len(kept)] = img
        kept.append(i)
    if images is None:
        raise DataError(
            f"none of the {len(ds)} images of the {split} split of {root} could be read"
        )
    ds.files = [ds.files[i] for i in kept]
    # one float copy (the float32 split is 4× the bytes of the 8-bit one; no other temporary)
    x = torch.empty(images[: len(kept)].shape, dtype=torch.float32)  # (N, C, H, W)
    x.copy_(images[: len(kept)]).div_(255.0)
    del images
    labels = None if ds.labels is None else ds.labels[kept].numpy()
    return x.numpy(), labels, {"classes": ds.classes, "skipped": skipped}


_folder.needs_root = True  # no default data root: the folder is the user's


#: Dataset readers by name: ``(split, root, download, **options) -> (images, labels or None)``
#: or ``(images, labels, extras)``, extras being :class:`ImageDataset` attributes (``classes``,
#: ``skipped``); ``options`` are those of :func:`load` the reader's signature names.
DATASETS: dict[str, Callable] = {
    "digits": _digits,
    "binarized-mnist": _binarized_mnist,
    "mnist": _mnist_like("mnist", "MNIST"),
    "fashion-mnist": _mnist_like("fashion-mnist", "FashionMNIST"),
    "photo-patches": _photo_patches,
    "folder": _folder,
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


def write_folder(images: torch.Tensor, labels, classes, root) -> None:
    """Save images ``(N, C, H, W)`` in [0, 1] as 8-bit PNGs ``root/CLASS/000123.png`` (directly
    in ``root`` when ``labels`` is ``None``): how to turn any collection of images (a tensor, a
    NumPy array, a torchvision dataset) into a folder that :func:`load` and
    :class:`FolderDataset` read.

    :param images: ``(N, C, H, W)`` floats in [0, 1], C = 1 or 3.
    :param labels: ``(N,)`` class indices into ``classes``, or ``None``.
    :param classes: the class (subfolder) names; ``None``: the label numbers.
    :param root: the folder to write into (created).
    :raises ValueError: for a class name that cannot be one folder's name (empty, ``.``,
        ``..``, or holding a path separator or NUL: Fashion-MNIST's "T-shirt/top" would become
        two nested folders, read back as class "T-shirt"), or two classes of one name, before
        anything is written.
    """
    from PIL import Image

    if classes:
        _check_class_names(classes)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    for i, array in enumerate(pixels):
        label = None if labels is None else int(labels[i])
        folder = Path(root) / ("" if label is None else classes[label] if classes else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(
            folder / f"{i:06}.png"
        )


def _check_class_names(classes) -> None:
    # each class name must be the name of one folder, and names distinct
    bad = {"/", "\\", "\0", os.sep, os.altsep or "/"}
    for i, name in enumerate(classes):
        name = str(name)
        if name in ("", ".", "..") or any(c in name for c in bad):
            safe = "".join("_" if c in bad else c for c in name).strip(".") or f"class{i}"
            raise ValueError(
                f"write_folder: class {i} {name!r} cannot be a folder name (a class is one "
                f"folder, named as it is read back); pass classes with it renamed, e.g. {safe!r}"
            )
    seen = [str(c) for c in classes]
    twice = next((c for c in seen if seen.count(c) > 1), None)
    if twice is not None:
        raise ValueError(f"write_folder: two classes are named {twice!r}; each needs a folder")


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
