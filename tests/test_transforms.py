"""Preprocessing ops against torchvision's transforms (the reference code's pipeline)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from medbench_jax.data import transforms


def _image(h=144, w=144, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 1), dtype=np.uint8)


def _pil(image):
  return Image.fromarray(image[..., 0])


@pytest.mark.parametrize("h,w,size", [(144, 144, 128), (150, 141, 128), (256, 256, 224)])
def test_center_crop_equals_torchvision(h, w, size):
  image = _image(h, w)
  ours = transforms.parse(f"center_crop({size})")(image, None)
  theirs = np.asarray(T.CenterCrop(size)(_pil(image)))
  np.testing.assert_array_equal(ours[..., 0], theirs)


def test_ten_crop_equals_torchvision_order_and_pixels():
  image = _image(144, 144)
  ours = transforms.parse("ten_crop(128)")(image, None)
  theirs = [np.asarray(c) for c in T.TenCrop(128)(_pil(image))]
  assert ours.shape == (10, 128, 128, 1)
  for i, crop in enumerate(theirs):
    np.testing.assert_array_equal(ours[i, ..., 0], crop, err_msg=f"crop {i}")


def test_resize_matches_torchvision_shape_and_values():
  # Smooth image: resampling filters differ in detail, not in what they preserve.
  y, x = np.mgrid[0:300, 0:400]
  image = ((np.sin(x / 40) + np.cos(y / 30) + 2) * 60).astype(np.uint8)[..., None]
  ours = transforms.parse("resize(256)")(image, None)
  theirs = np.asarray(T.Resize(256)(_pil(image)))
  assert ours.shape[:2] == theirs.shape == (256, 341)
  assert np.abs(ours[..., 0].astype(int) - theirs).mean() < 1.5


def test_random_resized_crop_samples_like_torchvision():
  """Same sampling rule: compare the distribution of crop areas and aspect ratios."""
  image = np.zeros((200, 200, 1), np.uint8)
  image[50:150, 50:150] = 255
  op = transforms.parse("random_resized_crop(64)")
  rng = np.random.default_rng(0)
  ours = np.array([op(image, rng).mean() for _ in range(400)])
  torch.manual_seed(0)
  tv = T.RandomResizedCrop(64)
  theirs = np.array([np.asarray(tv(_pil(image))).mean() for _ in range(400)])
  assert op(image, rng).shape == (64, 64, 1)
  # The fraction of the bright square in the crop follows the same distribution.
  assert abs(ours.mean() - theirs.mean()) < 12
  assert abs(np.median(ours) - np.median(theirs)) < 20


def test_random_ops_are_deterministic_given_the_generator():
  op = transforms.parse("random_resized_crop(96, scale=(0.25, 1.0))|flip_lr|rotate(7)")
  image = _image()
  a = op(image, np.random.default_rng(123))
  b = op(image, np.random.default_rng(123))
  c = op(image, np.random.default_rng(124))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_flip_lr_always_and_never():
  image = _image()
  np.testing.assert_array_equal(transforms.parse("flip_lr(p=1.0)")(image, np.random.default_rng(0)),
                                image[:, ::-1])
  np.testing.assert_array_equal(transforms.parse("flip_lr(p=0.0)")(image, np.random.default_rng(0)),
                                image)


def test_rotate_keeps_shape_and_fills_corners_with_zero():
  image = np.full((100, 100, 1), 200, np.uint8)
  seed = next(s for s in range(100) if abs(np.random.default_rng(s).uniform(-7, 7)) > 4)
  out = transforms.parse("rotate(7)")(image, np.random.default_rng(seed))
  assert out.shape == image.shape
  # A rotation by more than 4 degrees moves every corner out of the source image.
  assert out[0, 0, 0] == out[0, -1, 0] == out[-1, 0, 0] == out[-1, -1, 0] == 0
  assert out[50, 50, 0] == 200
  zero = transforms.parse("rotate(0)")(image, np.random.default_rng(1))
  np.testing.assert_array_equal(zero, image)


@pytest.mark.parametrize("spec,message", [
    ("random_crop(3)", "Unknown preprocessing op 'random_crop(3)'"),
    ("resize(", "Cannot parse"),
    ("resize(1, 2, 3)", "Bad arguments for preprocessing op"),
])
def test_bad_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    transforms.parse(spec)
