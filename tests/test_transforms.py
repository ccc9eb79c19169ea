"""Preprocessing ops against torchvision's transforms (the reference code's pipeline);
image, mask and FOV moved together."""

import cv2
import numpy as np
from PIL import Image
import pytest
import torch
import torchvision.transforms as T

from medbench_jax.data import transforms


def _image(h=144, w=144, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 1), dtype=np.uint8)


def _pil(image):
  return Image.fromarray(image[..., 0])


def _run(spec, image, rng=None):
  """The op of `spec` on an example holding only `image`; returns the image."""
  return transforms.parse(spec)({"image": image}, rng)["image"]


@pytest.mark.parametrize("h,w,size", [(144, 144, 128), (150, 141, 128), (256, 256, 224)])
def test_center_crop_equals_torchvision(h, w, size):
  image = _image(h, w)
  ours = _run(f"center_crop({size})", image)
  theirs = np.asarray(T.CenterCrop(size)(_pil(image)))
  np.testing.assert_array_equal(ours[..., 0], theirs)


def test_ten_crop_equals_torchvision_order_and_pixels():
  image = _image(144, 144)
  ours = _run("ten_crop(128)", image)
  theirs = [np.asarray(c) for c in T.TenCrop(128)(_pil(image))]
  assert ours.shape == (10, 128, 128, 1)
  for i, crop in enumerate(theirs):
    np.testing.assert_array_equal(ours[i, ..., 0], crop, err_msg=f"crop {i}")


def test_resize_matches_torchvision_shape_and_values():
  # Smooth image: resampling filters differ in detail, not in what they preserve.
  y, x = np.mgrid[0:300, 0:400]
  image = ((np.sin(x / 40) + np.cos(y / 30) + 2) * 60).astype(np.uint8)[..., None]
  ours = _run("resize(256)", image)
  theirs = np.asarray(T.Resize(256)(_pil(image)))
  assert ours.shape[:2] == theirs.shape == (256, 341)
  assert np.abs(ours[..., 0].astype(int) - theirs).mean() < 1.5


@pytest.mark.parametrize("h,w", [(1024, 1024), (390, 320), (300, 400)])
def test_exact_size_resize_equals_the_references_resize_256_256(h, w):
  """The reference's eval: Resize((256, 256)) on the PIL image (both sides), not the
  shorter side; with PIL's filter the pixels are torchvision's."""
  image = _image(h, w, seed=h)
  theirs = np.asarray(T.Resize((256, 256))(_pil(image)))
  ours = _run("resize((256, 256), interpolation='pil_bilinear')", image)
  np.testing.assert_array_equal(ours[..., 0], theirs)
  area = _run("resize((256, 256))", image)
  assert area.shape == (256, 256, 1)
  # The area filter differs in detail on noise, not in what it keeps.
  assert abs(float(area.mean()) - float(theirs.mean())) < 1.0
  test = _run("resize((256, 256), interpolation='pil_bilinear')|ten_crop(224)", image)
  reference = [np.asarray(c) for c in T.TenCrop(224)(T.Resize((256, 256))(_pil(image)))]
  np.testing.assert_array_equal(test[..., 0], np.stack(reference))


def test_unknown_interpolation_is_named():
  with pytest.raises(ValueError, match="interpolation='cubic'.*pil_bilinear"):
    transforms.parse("resize(8, interpolation='cubic')")


def test_random_resized_crop_samples_like_torchvision():
  """Same sampling rule: compare the distribution of crop areas and aspect ratios."""
  image = np.zeros((200, 200, 1), np.uint8)
  image[50:150, 50:150] = 255
  op = transforms.parse("random_resized_crop(64)")
  rng = np.random.default_rng(0)
  ours = np.array([op({"image": image}, rng)["image"].mean() for _ in range(400)])
  torch.manual_seed(0)
  tv = T.RandomResizedCrop(64)
  theirs = np.array([np.asarray(tv(_pil(image))).mean() for _ in range(400)])
  assert op({"image": image}, rng)["image"].shape == (64, 64, 1)
  # The fraction of the bright square in the crop follows the same distribution.
  assert abs(ours.mean() - theirs.mean()) < 12
  assert abs(np.median(ours) - np.median(theirs)) < 20


def test_random_ops_are_deterministic_given_the_generator():
  op = transforms.parse("random_resized_crop(96, scale=(0.25, 1.0))|flip_lr|rotate(7)")
  image = _image()
  a = op({"image": image}, np.random.default_rng(123))["image"]
  b = op({"image": image}, np.random.default_rng(123))["image"]
  c = op({"image": image}, np.random.default_rng(124))["image"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_flip_lr_always_and_never():
  image = _image()
  np.testing.assert_array_equal(_run("flip_lr(p=1.0)", image, np.random.default_rng(0)),
                                image[:, ::-1])
  np.testing.assert_array_equal(_run("flip_lr(p=0.0)", image, np.random.default_rng(0)),
                                image)


def test_rotate_keeps_shape_and_fills_corners_with_zero():
  image = np.full((100, 100, 1), 200, np.uint8)
  seed = next(s for s in range(100) if abs(np.random.default_rng(s).uniform(-7, 7)) > 4)
  out = _run("rotate(7)", image, np.random.default_rng(seed))
  assert out.shape == image.shape
  # A rotation by more than 4 degrees moves every corner out of the source image.
  assert out[0, 0, 0] == out[0, -1, 0] == out[-1, 0, 0] == out[-1, -1, 0] == 0
  assert out[50, 50, 0] == 200
  zero = _run("rotate(0)", image, np.random.default_rng(1))
  np.testing.assert_array_equal(zero, image)


@pytest.mark.parametrize("spec,message", [
    ("random_crop(3)", "Unknown preprocessing op 'random_crop(3)'"),
    ("resize(", "Cannot parse"),
    ("resize(1, 2, 3)", "Bad arguments for preprocessing op"),
    ("rotate(7, interpolation='bicubic')", "interpolation='bicubic'"),
])
def test_bad_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    transforms.parse(spec)


# ---------------------------------------------------------------- masks and FOV


def _segmentation_example(size=96, seed=0):
  """Image channels drawn from the mask and the FOV (255 x), on 8 px blocks."""
  rng = np.random.default_rng(seed)
  mask = np.kron(rng.random((size // 8, size // 8, 5)) < 0.5,
                 np.ones((8, 8, 1))).astype(np.uint8)
  fov = np.kron(rng.random((size // 8, size // 8, 1)) < 0.7,
                np.ones((8, 8, 1))).astype(np.uint8)
  image = (np.concatenate([mask[..., :2], fov], axis=-1) * 255).astype(np.uint8)
  return {"image": image, "mask": mask, "fov": fov, "name": b"case"}


@pytest.mark.parametrize("spec", [
    "random_resized_crop(64, scale=(0.25, 1.0))", "flip_lr(p=1.0)", "rotate(30)",
    "resize(48)", "center_crop(80)",
    "random_resized_crop(64, scale=(0.25, 1.0))|flip_lr|rotate(7)"])
def test_geometric_ops_move_image_mask_and_fov_together(spec):
  op = transforms.parse(spec)
  moved = 0
  for seed in range(10):
    example = _segmentation_example(seed=seed)
    out = op(example, np.random.default_rng(seed))
    assert out["name"] == b"case"
    assert out["mask"].shape[:2] == out["fov"].shape[:2] == out["image"].shape[:2]
    assert out["mask"].shape[2] == 5 and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1} and set(np.unique(out["fov"])) <= {0, 1}
    targets = np.concatenate([out["mask"][..., :2], out["fov"]], axis=-1)
    # The image is resampled by area or linear filters, the masks by nearest neighbour:
    # they may differ on a band of a pixel or two along edges (also where an edge falls
    # on the border), never away from them.
    kernel = np.ones((5, 5), np.uint8)
    border = np.ones(targets.shape[:2], bool)
    border[2:-2, 2:-2] = False
    for k in range(3):
      target = np.ascontiguousarray(targets[..., k])
      band = (cv2.dilate(target, kernel) != cv2.erode(target, kernel)) | border
      differ = (out["image"][..., k] > 127) != target.astype(bool)
      assert not (differ & ~band).any(), (spec, seed, k)
    moved += not np.array_equal(out["mask"], example["mask"])
  assert moved  # the check saw real geometric changes


def test_masks_are_resampled_by_nearest_neighbour_the_image_by_its_filter():
  example = _segmentation_example()
  out = transforms.parse("resize(40)")(example, None)
  theirs = np.asarray(T.Resize(40, interpolation=T.InterpolationMode.NEAREST)(
      Image.fromarray(example["mask"][..., 0])))
  assert out["mask"].shape == (40, 40, 5)
  # Both pick a source pixel per output pixel; their sampling grids differ by at most one.
  assert np.mean(out["mask"][..., 0] != theirs) < 0.1
  assert len(np.unique(out["image"])) > 3  # the image was filtered, not sampled


def test_keys_restrict_an_op():
  example = _segmentation_example()
  out = transforms.parse("resize(48, keys=('image',))")(example, None)
  assert out["image"].shape == (48, 48, 3)
  assert out["mask"] is example["mask"] or np.array_equal(out["mask"], example["mask"])
  flipped = transforms.parse("flip_lr(p=1.0, keys=('mask',))")(example,
                                                               np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["mask"], example["mask"][:, ::-1])
  np.testing.assert_array_equal(flipped["image"], example["image"])


def test_ten_crop_stacks_the_image_only():
  example = _segmentation_example()
  out = transforms.parse("ten_crop(64)")(example, None)
  assert out["image"].shape == (10, 64, 64, 3)
  np.testing.assert_array_equal(out["mask"], example["mask"])


def test_random_draws_do_not_depend_on_the_keys():
  """A classification example and a segmentation one see the same crop, flip, angle."""
  spec = "random_resized_crop(64, scale=(0.25, 1.0))|flip_lr|rotate(7)"
  example = _segmentation_example()
  both = transforms.parse(spec)(example, np.random.default_rng(5))
  alone = transforms.parse(spec)({"image": example["image"]}, np.random.default_rng(5))
  np.testing.assert_array_equal(both["image"], alone["image"])

