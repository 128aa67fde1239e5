"""Your own images: a folder tree of PNG, JPEG, ... files as a dataset
(:class:`FolderDataset`, the ``folder`` reader :func:`read_folder`), and images written back as
one (:func:`write_folder`).

Labels come from subfolders; ``train/``, ``valid/`` (or ``val/``) and ``test/`` subfolders are
the splits when present, else a seeded split (:func:`folder_split`). Only regular files inside
the folder are read: a link out of it, or to nothing, is refused (or, with
``skip_bad_files``, left out and counted), and an image over :data:`MAX_IMAGE_PIXELS` is
refused before it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .choices import SPLITS
from .errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDERS",
    "MAX_IMAGE_PIXELS",
    "UnreadableImageError",
    "LeftOutFileError",
    "read_image",
    "folder_split",
    "FolderDataset",
    "read_folder",
    "write_folder",
]

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
        "(pyrovae.folders.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
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
        #: e.g. :func:`pyrovae.data.dynamic_binarize`
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


def read_folder(split: str, root: Path, download: bool, image_size=None, channels=None,
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


read_folder.needs_root = True  # no default data root: the folder is the user's


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
