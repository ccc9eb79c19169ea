"""On-device augmentation against the host ops of transforms.py (and torchvision's sampler).

The distributions are compared by two-sample tests on 20,000 draws from each side, with
fixed seeds: a correct sampler passes at p > 1e-3, and each check is shown to reject a
deliberately wrong sampler at p < 1e-8.
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from scipy import stats

from medbench_jax import config_checks
from medbench_jax.data import device_transforms
from medbench_jax.data import transforms
from tests import helpers

DRAWS = 20_000
PASS_P, FAIL_P = 1e-3, 1e-8
# Stored image shape of the distribution tests (square: torchvision's fallback to the
# central crop has a probability of ~1e-8 there; the non-square test covers it).
SHAPE = (64, 64)
CROP_SPEC = "random_resized_crop(8)|flip_lr|rotate(7)"


class RecordingGenerator:
  """A numpy Generator that records the draws the host ops make of it."""

  def __init__(self, seed: int):
    self._rng = np.random.default_rng(seed)
    self.calls = []

  def _record(self, method, args):
    value = getattr(self._rng, method)(*args)
    self.calls.append((method, args, value))
    return value

  def uniform(self, *args):
    return self._record("uniform", args)

  def integers(self, *args):
    return self._record("integers", args)


class ScriptedGenerator:
  """Hands the host ops the draws that give chosen parameters, checking their ranges."""

  def __init__(self, values):
    self.values = list(values)

  def _next(self, low=0.0, high=1.0):
    value = self.values.pop(0)
    assert low <= value < high, (value, low, high)
    return value

  def uniform(self, *args):
    return self._next(*args)

  def integers(self, *args):
    return self._next(*args)


def _host_crop_boxes(spec, shape, seed=0):
  """(top, left, height, width) of the host op's crops, read off the draws it makes:
  top ~ integers(0, H - h + 1), then left ~ integers(0, W - w + 1)."""
  op = transforms.parse(spec)
  rng = RecordingGenerator(seed)
  image = np.zeros(shape + (1,), np.uint8)
  boxes = []
  for _ in range(DRAWS):
    rng.calls.clear()
    op({"image": image}, rng)
    positions = [(args, value) for method, args, value in rng.calls if method == "integers"]
    assert len(positions) == 2, f"no crop position drawn (central-crop fallback?): {rng.calls}"
    (_, top_high), top = positions[0]
    (_, left_high), left = positions[1]
    boxes.append((top, left, shape[0] + 1 - top_high, shape[1] + 1 - left_high))
  return np.array(boxes, np.float64)


def _device_params(spec, shape, seed=0):
  """Each op's parameters for DRAWS examples of one step, seeded as in training."""
  augment = device_transforms.BatchAugment(spec, seed)
  keys = augment.example_keys(0, DRAWS)
  params = jax.jit(jax.vmap(lambda key: augment.sample(key, {"image": shape})))(keys)
  return jax.tree.map(np.asarray, params)


def _box_array(params):
  return np.stack([params[k] for k in ("top", "left", "height", "width")], 1).astype(float)


def _crop_pvalues(boxes_a, boxes_b, shape):
  """KS p-values of area fraction, aspect ratio and crop centre of two sets of boxes."""
  def features(boxes):
    top, left, h, w = boxes.T
    return {"area": h * w / (shape[0] * shape[1]), "aspect": w / h,
            "centre_row": (top + h / 2) / shape[0], "centre_col": (left + w / 2) / shape[1]}
  a, b = features(boxes_a), features(boxes_b)
  return {k: stats.ks_2samp(a[k], b[k]).pvalue for k in a}


@pytest.fixture(scope="module")
def host_crop_boxes():
  return _host_crop_boxes("random_resized_crop(8)", SHAPE)


def test_crop_distribution_matches_the_host_op(host_crop_boxes):
  device = _box_array(_device_params(CROP_SPEC, SHAPE)[0])
  assert device[:, 2:].min() >= 1 and (device[:, :2] + device[:, 2:] <= SHAPE).all()
  pvalues = _crop_pvalues(host_crop_boxes, device, SHAPE)
  assert min(pvalues.values()) > PASS_P, pvalues


def test_crop_check_rejects_a_uniform_aspect_sampler(host_crop_boxes, monkeypatch):
  # The classic mistake: aspect ratio uniform instead of log-uniform on the same range.
  monkeypatch.setattr(device_transforms, "log_uniform", lambda key, shape, low, high: jnp.log(
      jax.random.uniform(key, shape, minval=low, maxval=high)))
  device = _box_array(_device_params(CROP_SPEC, SHAPE)[0])
  pvalues = _crop_pvalues(host_crop_boxes, device, SHAPE)
  assert pvalues["aspect"] < FAIL_P, pvalues


def test_crop_distribution_with_fallbacks_matches_torchvision():
  """A wide image: ~3% of draws exhaust the 10 tries and take the central crop."""
  import torch
  from torchvision import transforms as T
  shape = (32, 96)
  torch.manual_seed(0)
  image = torch.zeros(1, *shape)
  theirs = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                     for _ in range(DRAWS)], np.float64)
  ours = _box_array(_device_params("random_resized_crop(8)", shape)[0])
  fallback = (0, 26, 32, 43)  # torchvision's: full height, width clipped to ratio 4/3
  assert 0.01 < np.mean((theirs == fallback).all(1)) < 0.06
  pvalues = _crop_pvalues(theirs, ours, shape)
  assert min(pvalues.values()) > PASS_P, pvalues


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (60, 64)])
def test_central_crop_fallback_equals_torchvision(shape):
  import torch
  from torchvision import transforms as T
  # Twice the image's area: every try fails.
  theirs = T.RandomResizedCrop.get_params(torch.zeros(1, *shape), [2.0, 2.0], [3 / 4, 4 / 3])
  op = device_transforms.RandomResizedCrop(8, scale=(2.0, 2.0))
  params = op.sample(jax.random.key(0), shape)
  assert tuple(int(params[k]) for k in ("top", "left", "height", "width")) == tuple(theirs)


@pytest.fixture(scope="module")
def host_flips_and_angles(seed=0):
  """Flips seen in the host op's output; angles the host op draws."""
  image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  flip = transforms.parse("flip_lr")
  rotate = transforms.parse("rotate(7)")
  rng = RecordingGenerator(seed)
  flips, angles = [], []
  for _ in range(DRAWS):
    flips.append(np.array_equal(flip({"image": image}, rng)["image"], image[:, ::-1]))
    rng.calls.clear()
    rotate({"image": image}, rng)
    ((_, args, angle),) = rng.calls
    assert args == (-7, 7)
    angles.append(angle)
  return np.array(flips), np.array(angles)


def _flip_angle_pvalues(host_flips, host_angles, params):
  device_flips, device_angles = params[1]["flip"], params[2]["angle"]
  table = [[host_flips.sum(), (~host_flips).sum()], [device_flips.sum(), (~device_flips).sum()]]
  return {"flip_rate": stats.binomtest(int(device_flips.sum()), DRAWS, 0.5).pvalue,
          "flip_vs_host": stats.chi2_contingency(table).pvalue,
          "angle": stats.ks_2samp(host_angles, device_angles).pvalue}


def test_flip_and_angle_distributions_match_the_host_ops(host_flips_and_angles):
  params = _device_params(CROP_SPEC, SHAPE)
  assert np.abs(params[2]["angle"]).max() <= 7
  pvalues = _flip_angle_pvalues(*host_flips_and_angles, params)
  assert min(pvalues.values()) > PASS_P, pvalues


def test_flip_and_angle_checks_reject_wrong_samplers(host_flips_and_angles):
  params = _device_params("random_resized_crop(8)|flip_lr(p=0.46)|rotate(6)", SHAPE)
  pvalues = _flip_angle_pvalues(*host_flips_and_angles, params)
  assert max(pvalues.values()) < FAIL_P, pvalues


# ------------------------------------------------------------------ pixels

def _smooth_image(height=96, width=96):
  # Gradients up to ~7 grey levels per pixel: interpolation differences stay small.
  rows, cols = np.mgrid[0:height, 0:width]
  return (127.5 + 60 * np.sin(cols / 9) + 60 * np.cos(rows / 13)).astype(np.uint8)[..., None]


def _device_warp(spec, params, example):
  augment = device_transforms.BatchAugment(spec, seed=0)
  example = {k: jnp.asarray(v) for k, v in example.items()}
  return jax.tree.map(np.asarray, jax.jit(augment.warp)(params, example))


def _crop_params(top, left, height, width, flip, angle):
  return [{"top": jnp.int32(top), "left": jnp.int32(left), "height": jnp.int32(height),
           "width": jnp.int32(width)}, {"flip": jnp.bool_(flip)}, {"angle": jnp.float32(angle)}]


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("box,flip,angle", [
    ((10, 5, 50, 40), True, 5.3),     # enlarged: both resize bilinearly
    ((3, 8, 90, 80), False, -6.1),    # shrunk: the host uses OpenCV's area filter
    ((20, 30, 36, 44), False, 3.3),
    ((0, 0, 96, 96), True, 0.0)])
def test_crop_flip_rotate_pixels_match_the_host_ops(box, flip, angle, interpolation):
  """Tolerance: within 2 grey levels everywhere, 0.6 on average. The host rounds to
  uint8 (0.5) with OpenCV's fixed-point weights, resamples twice where rotation is
  bilinear, and area-averages when shrinking; on this smooth image these differ from
  one bilinear sample by about a level. The zero-filled corners are the same pixels."""
  image = _smooth_image()
  spec = f"random_resized_crop(64)|flip_lr|rotate(7, interpolation={interpolation!r})"
  top, left, height, width = box
  # The area fraction is drawn from [0.08, 1): just below 1 still rounds to the whole.
  draws = [min(height * width / image[..., 0].size, 1 - 1e-12), math.log(width / height),
           top, left, 0.0 if flip else 0.9, angle]
  host = transforms.parse(spec)({"image": image}, ScriptedGenerator(draws))["image"]
  ours = _device_warp(spec, _crop_params(*box, flip, angle), {"image": image})["image"]
  assert ours.shape == host.shape == (64, 64, 1) and ours.dtype == np.float32
  diff = np.abs(ours - host)
  assert diff.max() < 2.0 and diff.mean() < 0.6, (diff.max(), diff.mean())
  np.testing.assert_array_equal(ours < 0.5, host == 0)


def test_deterministic_ops_match_the_host_ops():
  image = _smooth_image(96, 120)
  spec = "resize(80)|center_crop(64)|flip_lr(p=1.0)"
  host = transforms.parse(spec)({"image": image}, np.random.default_rng(0))["image"]
  ours = _device_warp(spec, [{}, {}, {"flip": jnp.bool_(True)}], {"image": image})["image"]
  assert ours.shape == host.shape == (64, 64, 1)
  diff = np.abs(ours - host)
  assert diff.max() < 2.0 and diff.mean() < 0.6, (diff.max(), diff.mean())


def test_resize_to_height_and_width_matches_the_host_op():
  image = _smooth_image(96, 120)
  spec = "resize((80, 72))"
  host = transforms.parse(spec)({"image": image}, None)["image"]
  ours = _device_warp(spec, [{}], {"image": image})["image"]
  assert ours.shape == host.shape == (80, 72, 1)
  diff = np.abs(ours - host)
  assert diff.max() < 2.0 and diff.mean() < 0.6, (diff.max(), diff.mean())


def test_host_and_device_ops_share_one_table():
  """A device op is registered on its host op and takes that op's arguments, as parsed."""
  for name, op in transforms.OPS.items():
    if op.device is not None:
      fields = {field.name for field in dataclasses.fields(op.device)}
      assert fields == set(inspect.signature(op.host).parameters), name
  ops = device_transforms.device_ops(
      "random_resized_crop(64, scale=[0.25, 1.0])|flip_lr|resize(72, keys=['image'])")
  assert [type(op) for op in ops] == [device_transforms.RandomResizedCrop,
                                      device_transforms.FlipLR, device_transforms.Resize]
  assert ops[0].scale == (0.25, 1.0) and ops[1].p == 0.5 and ops[2].keys == ("image",)


def test_masks_move_with_the_image_by_nearest_neighbour():
  image = _smooth_image()
  mask = (image > 127).astype(np.uint8)
  fov = np.ones_like(mask)
  out = _device_warp("random_resized_crop(64)|flip_lr|rotate(7)",
                     _crop_params(10, 5, 60, 70, True, 6.5),
                     {"image": image, "mask": mask, "fov": fov})
  assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) == {0, 1}
  # The same map: the mask is the thresholded image, but where bilinear and nearest
  # neighbour straddle the threshold (a pixel-wide band along its edges).
  assert np.mean(out["mask"] == (out["image"] > 127)) > 0.97
  # The rotation's zero fill: outside the rotated image the field of view is 0.
  np.testing.assert_array_equal(out["fov"][..., 0] == 0, out["image"][..., 0] < 0.5)
  assert 0 < np.mean(out["fov"] == 0) < 0.1


def test_keys_restrict_an_op_like_the_host_op():
  image = _smooth_image()
  mask = (image > 127).astype(np.uint8)
  out = _device_warp("flip_lr(p=1.0, keys=('image',))", [{"flip": jnp.bool_(True)}],
                     {"image": image, "mask": mask})
  np.testing.assert_array_equal(out["image"], image[:, ::-1])
  np.testing.assert_array_equal(out["mask"], mask)


# ------------------------------------------------------------------ batches and devices

def _batch(size=16, side=72, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, side, side, 1), dtype=np.uint8),
          "mask": (rng.random((size, side, side, 1)) > 0.5).astype(np.uint8),
          "labels": rng.random((size, 4)).astype(np.float32)}


def _jit_on(devices, augment):
  """`augment` jitted over a mesh of `devices`, the batch sharded over it as in training."""
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(augment, in_shardings=(sharding, None), out_shardings=sharding)
  return lambda batch, step: jax.device_get(fn(jax.device_put(batch, sharding), step)), (
      lambda batch, step: fn.lower(jax.device_put(batch, sharding), step).compile().as_text())


def test_batches_are_deterministic_and_independent_of_the_device_count():
  assert jax.device_count() == 8
  augment = device_transforms.BatchAugment(
      "random_resized_crop(64, scale=(0.25, 1.0))|flip_lr|rotate(7)", seed=3)
  batch = _batch()
  on_one, _ = _jit_on(jax.devices()[:1], augment)
  on_eight, compiled_on_eight = _jit_on(jax.devices(), augment)
  one, eight = on_one(batch, 5), on_eight(batch, 5)
  assert one["image"].shape == (16, 64, 64, 1) and one["mask"].shape == (16, 64, 64, 1)
  for key in one:
    np.testing.assert_array_equal(one[key], eight[key], err_msg=key)
  np.testing.assert_array_equal(one["labels"], batch["labels"])
  # Augmented per example on its own device: no collective moves images between them.
  hlo = compiled_on_eight(batch, 5)
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo
  # Seeded by (seed, step): the same pair repeats, another step or seed differs.
  np.testing.assert_array_equal(on_eight(batch, 5)["image"], eight["image"])
  other_seed, _ = _jit_on(jax.devices(), device_transforms.BatchAugment(augment.spec, seed=4))
  for other in (on_eight(batch, 6), other_seed(batch, 5)):
    assert all(not np.array_equal(a, b) for a, b in zip(other["image"], eight["image"]))


def test_an_empty_spec_ships_the_stored_images_unchanged():
  batch = _batch(side=32)
  out = jax.jit(device_transforms.BatchAugment("", seed=0))(batch, 0)
  np.testing.assert_array_equal(out["image"], batch["image"])
  np.testing.assert_array_equal(out["mask"], batch["mask"])


@pytest.mark.parametrize("spec,message", [
    ("random_resized_crop(64)|ten_crop(64)", "'ten_crop(64)' cannot run with "
                                              "input.augment_on_device=True"),
    ("seg_augment(224)|flip_lr", "'seg_augment(224)' cannot run"),
    ("rotate(7, interpolation='bicubic')", "interpolation='bicubic'"),
    ("resize()", "Bad arguments for preprocessing op 'resize()'"),
    ("random_resized_crop(64, interpolation='pil_bilinear')",
     "interpolation='pil_bilinear' has no device version"),
    ("random_crop(3)", "Unknown preprocessing op 'random_crop(3)'"),
])
def test_ops_without_a_device_version_are_refused(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    device_transforms.device_ops(spec)


def test_config_refuses_a_train_spec_without_device_version():
  config = helpers.load_tiny()
  config.input.augment_on_device = True
  config.input.pp_train = "random_resized_crop(64)|ten_crop(64)"
  with pytest.raises(ValueError, match=r"config\.input\.pp_train: 'ten_crop\(64\)' cannot"):
    config_checks.validate(config)
  config.input.pp_train = "random_resized_crop(64, scale=(0.25, 1.0))|flip_lr|rotate(7)"
  config_checks.validate(config)


def test_training_augments_on_device_from_stored_images(tmp_path, phantom_dir, monkeypatch):
  """The host ships the stored 72 px images; the 64 px model only runs if the step crops."""

  from medbench_jax.data import pipeline
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.tasks import base
  from medbench_jax.trainer import run
  config = helpers.load_tiny()
  config.dataset.manual_dir = str(phantom_dir)
  config.input.augment_on_device = True
  config.train.max_steps = 4
  config_checks.validate(config)
  prepare.prepare_dataset(config.dataset)

  specs, shipped = [], []
  train_dataset, input_images = pipeline.train_dataset, base.Task.input_images
  monkeypatch.setattr(pipeline, "train_dataset",
                      lambda source, **kw: specs.append(kw["pp_spec"]) or train_dataset(
                          source, **kw))
  monkeypatch.setattr(base.Task, "input_images",
                      lambda self, batch: shipped.append(batch) or input_images(self, batch))
  results = run.train_and_evaluate(config, str(tmp_path))

  assert specs == [""]
  (first,) = shipped  # the first host batch of the trial
  assert first["image"].shape == (16, 72, 72, 1) and first["image"].dtype == np.uint8
  train = sources.open_splits(config.dataset).train
  stored = {train[i]["image"].tobytes() for i in range(len(train))}
  assert all(image.tobytes() in stored for image in first["image"])
  (trial,) = results["trials"]
  assert trial["best_step"] == 4 and np.isfinite(trial["best_val_loss"])
  assert 0.0 <= trial["test"]["mean_auc"] <= 1.0
