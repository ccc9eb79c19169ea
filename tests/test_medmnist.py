"""MedMNIST builders: the .npz files as medmnist downloads them, one-hot classes, RGB."""

import pathlib

import numpy as np
import pytest

from medbench_jax.data.prepare import medmnist
from tests import layouts


def _medmnist(path: pathlib.Path, labels_of, rgb=False, side=28, sizes=(6, 3, 4)):
  arrays, expected = {}, {}
  for key, n in zip(("train", "val", "test"), sizes):
    levels = (np.arange(n) * 20 + {"train": 5, "val": 10, "test": 15}[key]) % 250
    shape = (n, side, side, 3) if rgb else (n, side, side)
    images = np.broadcast_to(levels.reshape((n,) + (1,) * (len(shape) - 1)),
                             shape).astype(np.uint8).copy()
    if rgb:
      images[..., 0] = 0  # red off: catches channel-order mistakes
    labels = np.array([labels_of(i) for i in range(n)], np.uint8)  # as medmnist ships them
    arrays[f"{key}_images"], arrays[f"{key}_labels"] = images, labels
    expected[key] = (images, labels)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  return expected


@pytest.mark.parametrize("flag,labels_of,onehot", [
    ("chestmnist", lambda i: [(i + j) % 3 == 0 for j in range(14)], False),
    ("pneumoniamnist", lambda i: [i % 2], False),
    ("organamnist", lambda i: [i % 11], True),
])
def test_medmnist_npz(tmp_path, flag, labels_of, onehot):
  expected = _medmnist(tmp_path / "mm" / f"{flag}.npz", labels_of)
  builder = layouts.prepare_layout(f"medmnist_{flag}", tmp_path / "mm", tmp_path, size=28)
  for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
    images, labels = expected[key]
    source = builder.as_data_source(split)
    assert len(source) == len(images)
    for i in range(len(source)):
      np.testing.assert_array_equal(source[i]["image"][..., 0], images[i])
      want = np.eye(11)[labels[i][0]] if onehot else labels[i]
      np.testing.assert_array_equal(source[i]["labels"], want)
  assert builder.info.metadata["task"] == medmnist.MEDMNIST[flag].task


def test_medmnist_plus_rgb_picks_the_size_file(tmp_path):
  _medmnist(tmp_path / "mm" / "pathmnist.npz", lambda i: [i % 9], rgb=True)
  expected = _medmnist(tmp_path / "mm" / "pathmnist_64.npz", lambda i: [i % 9], rgb=True,
                       side=64)
  builder = layouts.prepare_layout("medmnist_pathmnist", tmp_path / "mm", tmp_path, size=64)
  image = builder.as_data_source("test")[1]["image"]
  assert image.shape == (64, 64, 3)
  np.testing.assert_array_equal(image, expected["test"][0][1])  # RGB order kept
