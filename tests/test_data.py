import gc
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae
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
    assert test.classes[0] == "T-shirt/top" and test.classes[9] == "Ankle boot"  # for the plots


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


# ---------------------------------------------------------------------------------------------
# Image folders and the embedded colour patches.


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tree(root, rgb=True, size=12, per_class=5):
    """A labelled tree: root/cats/*.png, root/dogs/big/*.jpg (nested), grey or RGB."""
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if rgb else (size, size)
    for i in range(per_class):
        _png(root / "cats" / f"c{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        _png(root / "dogs" / "big" / f"d{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


@pytest.mark.parametrize("rgb", [True, False])
def test_folder_seeded_split_shapes_labels_and_8bit_values(tmp_path, rgb):
    from pyrovae.likelihoods import on_grid

    root = _tree(tmp_path / "imgs", rgb=rgb, per_class=10)  # 20 images
    opts = {"valid_fraction": 0.2, "test_fraction": 0.1}
    parts = {s: load("folder", s, root=root, **opts) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [14, 4, 2]
    c = 3 if rgb else 1
    for ds in parts.values():
        assert ds.x_shape == (c, 12, 12) and ds.classes == ["cats", "dogs"]
        assert bool(on_grid(ds.images).all())
    every = torch.cat([parts[s].images for s in parts]).flatten(1)
    assert len({tuple(r.tolist()) for r in every}) == 20  # disjoint, all images once
    again = load("folder", "valid", root=root, **opts)
    assert torch.equal(again.images, parts["valid"].images)  # deterministic
    labels = torch.cat([parts[s].labels for s in parts])
    assert labels.bincount().tolist() == [10, 10]  # nested dogs/big/ is the class "dogs"
    # the pixels are the file's, exactly
    from PIL import Image

    lazy = pyrovae.data.FolderDataset(root, "test", **opts)
    first = np.array(Image.open(lazy.files[0]))
    assert torch.equal(lazy[0], parts["test"].images[0])
    assert torch.equal((lazy[0] * 255).round().byte(), torch.from_numpy(first).reshape(12, 12, c)
                       .permute(2, 0, 1))  # fmt: skip


def test_folder_split_subfolders_resize_and_channels(tmp_path):
    root = tmp_path / "imgs"
    _tree(root / "train", size=20, per_class=4)
    _tree(root / "test", size=16, per_class=1)
    _png(root / "val" / "cats" / "grey.png", np.full((30, 18), 7, dtype=np.uint8))
    train = load("folder", "train", root=root, image_size=8, valid_fraction=0.5)
    valid = load("folder", "valid", root=root, image_size=8, channels=3)
    test = load("folder", "test", root=root, image_size=8, channels=1)
    assert (len(train), len(valid), len(test)) == (8, 1, 2)  # val/ is the validation split
    assert train.x_shape == valid.x_shape == (3, 8, 8) and test.x_shape == (1, 8, 8)
    assert torch.all(valid.images == 7 / 255)  # grey to RGB, resized: one value
    assert test.labels.tolist() == [0, 1] and test.classes == ["cats", "dogs"]


def test_folder_without_subfolders_has_no_labels(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(10):
        _png(tmp_path / f"{i}.png", rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    ds = load("folder", "train", root=tmp_path, valid_fraction=0.1, test_fraction=0.1)
    assert len(ds) == 8 and ds.labels is None and ds.classes is None and ds.x_shape == (3, 4, 6)


def test_folder_corrupt_file_is_named_or_skipped(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=5)
    bad = root / "cats" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    opts = {"valid_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(DataError, match=r"cannot read image .*broken.jpg.*--skip-bad-files"):
        load("folder", "train", root=root, **opts)
    ds = load("folder", "train", root=root, skip_bad_files=True, **opts)
    assert len(ds) == 10 and ds.skipped == [str(bad)]
    lazy = pyrovae.data.FolderDataset(root, "train", **opts)
    with pytest.raises(DataError, match="broken.jpg"):
        lazy[lazy.files.index(bad)]


def test_folder_bad_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images \(.png, .jpg.*found under .*empty"):
        load("folder", "train", root=empty)
    with pytest.raises(DataError, match="needs root=PATH"):
        load("folder", "train")
    mixed = _tree(tmp_path / "mixed", per_class=2)
    _png(mixed / "cats" / "grey.png", np.zeros((12, 12), dtype=np.uint8))
    opts = {"valid_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(DataError, match=r"mixed channel counts: .*pass channels=1 or 3 "):
        load("folder", "train", root=mixed, **opts)
    assert load("folder", "train", root=mixed, channels=1, **opts).x_shape == (1, 12, 12)
    with pytest.raises(DataError, match=r"c0.png is 12×12 pixels, smaller than the image size 16"):
        load("folder", "train", root=mixed, image_size=16, channels=3, **opts)
    sizes = _tree(tmp_path / "sizes", per_class=1)
    _png(sizes / "cats" / "wide.png", np.zeros((12, 20, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"different sizes: .*wide.png is 20×12.*--image-size"):
        load("folder", "train", root=sizes, **opts)
    with pytest.raises(DataError, match="valid_fraction \\+ test_fraction must be < 1"):
        load("folder", "train", root=sizes, valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="the digits dataset takes no image_size option"):
        load("digits", "train", image_size=8)


def test_folder_dataset_streams_through_dataloader_workers(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=6)
    lazy = pyrovae.data.FolderDataset(root, "train", valid_fraction=0.0, test_fraction=0.0)
    memory = load("folder", "train", root=root, valid_fraction=0.0, test_fraction=0.0)
    loader = torch.utils.data.DataLoader(lazy, batch_size=5, num_workers=2)
    batches = list(loader)
    assert [b.shape for b in batches] == [(5, 3, 12, 12)] * 2 + [(2, 3, 12, 12)]
    assert torch.equal(torch.cat(batches), memory.images) and lazy.x_shape == (3, 12, 12)
    assert torch.equal(lazy.labels, memory.labels)


def test_photo_patches_offline_colour_splits():
    from pyrovae.likelihoods import on_grid

    parts = {s: load("photo-patches", s) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [1550, 150, 150]
    for ds in parts.values():
        assert ds.x_shape == (3, 32, 32) and ds.classes == ["china", "flower"]
        assert bool(on_grid(ds.images).all())
    assert torch.equal(load("photo-patches", "test").images, parts["test"].images)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "corrupt or partial file.*EOFError"),
        (b"PK\x03\x04" + b"x" * 100, "corrupt or partial file.*BadZipFile"),
        ("half", "corrupt or partial file"),
        ("no-valid", r"has no array 'valid' \(it holds: train\)"),
    ],
)
def test_a_corrupt_npz_is_a_data_error_naming_the_file(tmp_path, content, message):
    # zero-byte, garbage, truncated or incomplete archives: one DataError naming the file, and
    # no file handle left open (a ResourceWarning is an error in this suite)
    path = tmp_path / "binarized_mnist.npz"
    arrays = {"train": np.zeros((3, 784), np.float32)}
    if content == "no-valid":
        np.savez(path, **arrays)
    elif content == "half":
        np.savez(path, **arrays, valid=arrays["train"])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        pyrovae.data.load("binarized-mnist", "valid", root=tmp_path)
    assert str(path) in str(info.value) and re.search(message, str(info.value))
    gc.collect()


@pytest.mark.parametrize("channels", [1, 3])
def test_write_folder_round_trips_through_the_folder_reader(tmp_path, channels):
    # write_folder turns any image tensor into a folder: FolderDataset reads back the exact
    # 8-bit pixels, and the labels as class subfolders
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, channels, 5, 7), generator=g).float() / 255
    labels = torch.tensor([0, 1, 1, 0, 2, 1])
    pyrovae.data.write_folder(images, labels, ["cat", "dog", "eel"], tmp_path / "named")
    pyrovae.data.write_folder(images, labels, None, tmp_path / "numbered")
    assert sorted(p.name for p in (tmp_path / "numbered").iterdir()) == ["0", "1", "2"]
    ds = pyrovae.data.FolderDataset(tmp_path / "named", "train", valid_fraction=0, test_fraction=0)
    assert ds.classes == ["cat", "dog", "eel"] and len(ds) == 6
    names = [int(Path(f).stem) for f in ds.files]  # the files are numbered by input position
    read = torch.stack([ds[i] for i in range(len(ds))])
    assert torch.equal(read, images[names])
    assert torch.equal(torch.as_tensor(ds.labels), labels[names])


@pytest.mark.parametrize("name", ["T-shirt/top", "a\\b", "..", "", "nul\0"])
def test_write_folder_refuses_a_class_name_that_is_not_a_folder_name(tmp_path, name):
    # "T-shirt/top" would be written as T-shirt/top/ and read back as class "T-shirt": refused
    # in one line naming the class and a name that works, before anything is written
    images = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError) as info:
        pyrovae.data.write_folder(images, torch.tensor([0, 1]), ["ok", name], tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and f"class 1 {name!r} cannot be a folder name" in message
    assert not (tmp_path / "out").exists()


def test_write_folder_fashion_mnist_names_renamed_round_trip(tmp_path):
    # Fashion-MNIST's own names with the suggested renaming: each class reads back as written
    classes = [c.replace("/", "_") for c in pyrovae.data.FASHION_MNIST_CLASSES]
    with pytest.raises(ValueError, match="e.g. 'T-shirt_top'"):
        pyrovae.data.write_folder(torch.zeros(1, 1, 2, 2), torch.tensor([0]),
                                  pyrovae.data.FASHION_MNIST_CLASSES, tmp_path / "fm")  # fmt: skip
    images = torch.rand(10, 1, 4, 4)
    pyrovae.data.write_folder(images, torch.arange(10), classes, tmp_path / "fm")
    ds = pyrovae.data.FolderDataset(tmp_path / "fm", "train", valid_fraction=0, test_fraction=0)
    assert sorted(ds.classes) == sorted(classes)
    assert sorted(ds.classes[int(k)] for k in ds.labels) == sorted(classes)


def test_write_folder_refuses_two_classes_of_one_name(tmp_path):
    with pytest.raises(ValueError, match="two classes are named 'cat'; each needs a folder"):
        pyrovae.data.write_folder(torch.zeros(1, 1, 2, 2), torch.tensor([0]), ["cat", "cat"],
                                  tmp_path / "out")  # fmt: skip


def test_folder_links_out_or_to_nothing_are_refused_or_skipped_and_counted(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=3)
    secret = tmp_path / "secret.png"
    _png(secret, np.zeros((12, 12, 3), dtype=np.uint8))
    (root / "cats" / "a_link.png").symlink_to(secret)  # was followed and trained on
    (root / "cats" / "b_dangling.png").symlink_to(tmp_path / "nowhere.png")  # was not counted
    (root / "cats" / "c_inside.png").symlink_to(root / "cats" / "c0.png")  # inside: read
    opts = {"valid_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(DataError, match=r"a_link.png is a link to .*secret.png, outside the "
                       r"image folder .*\(and 1 more links\).*--skip-bad-files"):  # fmt: skip
        load("folder", "train", root=root, **opts)
    ds = load("folder", "train", root=root, skip_bad_files=True, **opts)
    assert len(ds) == 7 and len(ds.skipped) == 2
    assert "outside the image folder" in ds.skipped[0] and "dangling" in ds.skipped[1]
    with pytest.raises(DataError, match="a_link.png is a link to"):
        pyrovae.data.FolderDataset(root, "train", **opts)


def test_the_decompression_bomb_limit_is_applied_once_with_one_message(tmp_path, monkeypatch):
    root = _tree(tmp_path / "imgs", per_class=2)  # 12×12 = 144 pixels each
    _png(root / "cats" / "big.png", np.zeros((13, 13, 3), dtype=np.uint8))
    monkeypatch.setattr(pyrovae.folders, "MAX_IMAGE_PIXELS", 150)
    opts = {"valid_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(DataError, match=r"big.png: 13×13 pixels, more than the 150 pyrovae "
                       r"decodes \(pyrovae.folders.MAX_IMAGE_PIXELS"):  # fmt: skip
        load("folder", "train", root=root, **opts)
    ds = load("folder", "train", root=root, skip_bad_files=True, **opts)
    assert len(ds) == 4 and ds.skipped == [str(root / "cats" / "big.png")]


def test_skip_bad_files_skips_a_bad_file_that_sorts_first(tmp_path, capsys):
    from pyrovae import cli

    root = _tree(tmp_path / "imgs", per_class=6)
    (root / "cats" / "000.png").write_bytes(b"not a png")  # the first file listed
    argv = ["train", "--dataset", "folder", "--data-dir", str(root), "--skip-bad-files",
            "--epochs", "1", "--hidden", "8", "--z-dim", "2", "--no-progress",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["skipped_files"] == 1
