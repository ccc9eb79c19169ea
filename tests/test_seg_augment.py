"""Joint segmentation augmentation: one geometry for image, mask and FOV; masks stay 0/1."""

import pickle

import cv2
import grain
import numpy as np

from medbench_jax.data import pipeline
from medbench_jax.data import seg_augment
from medbench_jax.data import transforms

SIZE = 64


def _example(rng):
  """Image channels drawn from the mask and the FOV, so they must move together."""
  mask = np.kron(rng.random((8, 8, 2)) < 0.5, np.ones((8, 8, 1))).astype(np.uint8)
  fov = np.kron(rng.random((8, 8, 1)) < 0.7, np.ones((8, 8, 1))).astype(np.uint8)
  image = np.concatenate([mask * 255, fov * 255], axis=-1).astype(np.uint8)
  return {"image": image, "mask": mask, "fov": fov, "name": b"case"}


def _misaligned(out):
  """Share of pixels where a thresholded image channel and its target differ, away
  from the target's edges.

  Linear resampling of the image and nearest-neighbour resampling of the masks place
  an edge up to a pixel or two apart where a warp stretches the image; a mask that
  moved differently from its image differs far from the edges too.
  """
  kernel = np.ones((5, 5), np.uint8)
  targets = np.concatenate([out["mask"], out["fov"]], axis=-1)
  worst = 0.0
  for k in range(targets.shape[-1]):
    target = np.ascontiguousarray(targets[..., k])
    band = cv2.dilate(target, kernel) != cv2.erode(target, kernel)
    differ = (out["image"][..., k] > 127) != target.astype(bool)
    worst = max(worst, float(np.mean(differ & ~band)))
  return worst


def test_image_mask_and_fov_stay_aligned():
  augment = transforms.parse(f"seg_augment({SIZE})")
  rng = np.random.default_rng(0)
  moved = 0
  for seed in range(60):
    example = _example(rng)
    out = augment(example, np.random.default_rng(seed))
    assert set(out) == {"image", "mask", "fov", "name"} and out["name"] == b"case"
    assert out["image"].shape == (SIZE, SIZE, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (SIZE, SIZE, 2) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1} and set(np.unique(out["fov"])) <= {0, 1}
    assert _misaligned(out) == 0.0, seed
    moved += not np.array_equal(out["mask"], example["mask"])
  assert moved >= 10  # the alignment check saw real geometric changes


def test_transforms_are_drawn_independently():
  # A distortion (p = 0.3) or a crop (p = 0.25): 1 - 0.7 * 0.75 = 0.475 of the
  # examples change geometry when the two draws are independent, 0.3 when they share
  # albumentations' one seed. (A crop of the full height changes nothing: ~0.46.)
  augment = seg_augment.SegAugment(SIZE)
  example = _example(np.random.default_rng(3))
  moved = np.mean([not np.array_equal(augment(example, np.random.default_rng(s))["mask"],
                                      example["mask"]) for s in range(400)])
  assert 0.4 < moved < 0.55


def test_a_different_draw_for_the_mask_would_be_caught():
  augment = seg_augment.SegAugment(SIZE)
  example = _example(np.random.default_rng(1))
  for seed in range(200):
    a = augment(example, np.random.default_rng(seed))
    b = augment(example, np.random.default_rng(seed + 1000))
    if not np.array_equal(a["mask"], b["mask"]):
      assert _misaligned({**a, "mask": b["mask"], "fov": b["fov"]}) > 0.05
      return
  raise AssertionError("no geometric change in 200 draws")


def test_grain_random_map_is_deterministic_and_picklable():
  rng = np.random.default_rng(2)
  examples = [{k: v for k, v in _example(rng).items() if k != "fov"} for _ in range(8)]
  augment = pickle.loads(pickle.dumps(pipeline.TrainPreprocess(f"seg_augment({SIZE})",
                                                               ("image", "mask"))))

  def run():
    ds = grain.MapDataset.source(examples).random_map(augment, seed=7)
    return [ds[i] for i in range(len(examples))]

  first, second = run(), run()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert set(a) == {"image", "mask"}
  assert any(not np.array_equal(a["mask"], e["mask"]) for a, e in zip(first, examples))
