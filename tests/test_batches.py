"""Streamed training data: DataLoaders, iterables of batches, Datasets too large to collate."""

import math

import pytest
import torch

import pyrovae
from pyrovae.batches import should_stream
from pyrovae.errors import DataError


def _vae():
    return pyrovae.build_vae(pyrovae.Config(x_shape=(1, 8, 8), hidden=(64,), z_dim=4))


def _split(split):
    return pyrovae.data.load("digits", split, binarize="threshold").images


class ImagesWithTransform(torch.utils.data.Dataset):
    """A map-style Dataset like torchvision's: per-item ``transform``, images decoded lazily."""

    def __init__(self, images):
        self.images = images
        self.transform = lambda x: x  # a per-item transform, not a batch transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i].clone())


class Batches:
    """An iterable of batches without a length (e.g. a generator over shards)."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __iter__(self):
        for i in range(0, len(self.images), self.size):
            yield self.images[i : i + self.size]


def test_a_dataloader_trains_like_tensors():
    # Same data, seed and model: the DataLoader-fed fit and the device-resident fit reach the
    # same validation ELBO within 1 nat per image after 15 epochs (their batch orders differ).
    train, valid = _split("train"), _split("valid")
    results = []
    for data in (train, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)):
        torch.manual_seed(0)
        vae = _vae()
        h = pyrovae.fit(vae.model, vae.guide, data, epochs=15, batch_size=64, val_data=valid,
                        seed=0, progress=False)  # fmt: skip
        results.append(h)
    assert abs(results[0].val_elbo[-1] - results[1].val_elbo[-1]) < 1.0
    assert results[1].val_elbo[-1] > results[1].val_elbo[0] + 5
    assert results[0].data_seconds[0] is None and results[1].data_seconds[0] >= 0
    assert "data_seconds" in results[1].records()[0]
    assert "data_seconds" not in results[0].records()[0]


def test_a_dataset_is_streamed_through_workers_and_its_transform_left_alone():
    data = ImagesWithTransform(_split("train")[:256])
    assert not should_stream(data, None)  # small: collated onto the device by default
    vae = _vae()
    h = pyrovae.fit(vae.model, vae.guide, data, epochs=2, batch_size=64, stream=True,
                    num_workers=1, progress=False, val_data=ImagesWithTransform(_split("valid")),
                    seed=0)  # fmt: skip
    assert len(h) == 2 and all(math.isfinite(v) for v in h.train_elbo + h.val_elbo)
    assert h.data_seconds[-1] > 0


def test_an_iterable_without_length_is_one_pass_per_epoch():
    vae = _vae()
    seen = []
    h = pyrovae.fit(vae.model, vae.guide, Batches(_split("train")[:100], 30), epochs=2,
                    progress=False, callback=seen.append)  # fmt: skip
    assert len(h) == 2 and all(math.isfinite(v) for v in h.train_elbo)


def test_streams_are_checked_and_bad_batches_refused():
    vae = _vae()
    with pytest.raises(DataError, match="can only be streamed"):
        pyrovae.fit(vae.model, vae.guide, Batches(_split("train"), 10), stream=False,
                    progress=False)  # fmt: skip
    dicts = [{"x": _split("train")[:10]}]
    with pytest.raises(DataError, match="must be a tensor or a tuple of tensors"):
        pyrovae.fit(vae.model, vae.guide, dicts, progress=False)
    grey = torch.full((20, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="allow_non_binary|binary|0 and 1|Bernoulli"):
        pyrovae.fit(vae.model, vae.guide, torch.utils.data.DataLoader(grey, batch_size=10),
                    progress=False)  # fmt: skip
