"""tasks/segmentation.py: Dice/IoU and the losses against the reference study's own
functions (re-implemented here from their definitions), numpy, scikit-learn and PyTorch;
the post-hoc surface distances against medpy."""

import json
import types

import jax
import jax.numpy as jnp
from medpy.metric import binary
import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.metrics import jaccard_score
import torch

from medbench_jax import config_lib
from medbench_jax.tasks import segmentation
from medbench_jax.tasks import surface as surface_lib


# The study's utils.py, as published (BenchmarkTransferLearning): pooled Dice of two
# arrays thresholded at 0.5, 1.0 when both are empty; and its mean over images.
def study_dice(im1, im2, empty_score=1.0):
  im1 = np.asarray(im1 > 0.5).astype(bool)
  im2 = np.asarray(im2 > 0.5).astype(bool)
  im_sum = im1.sum() + im2.sum()
  if im_sum == 0:
    return empty_score
  return 2.0 * np.logical_and(im1, im2).sum() / im_sum


def study_mean_dice_coef(y_true, y_pred):
  return sum(study_dice(y_true[i], y_pred[i]) for i in range(y_true.shape[0])) / len(y_true)


def study_dice_loss(y_true, y_pred, smooth=1.0):
  y_true_f, y_pred_f = torch.flatten(y_true), torch.flatten(y_pred)
  intersection = torch.sum(y_true_f * y_pred_f)
  return 1.0 - ((2.0 * intersection + smooth) / (torch.sum(y_true_f) + torch.sum(y_pred_f)
                                                 + smooth))


# The study's validation loss (BenchmarkTransferLearning Version2): evaluate_segmentation
# (trainer.py) runs a DataLoader over the validation set with the training batch size,
# shuffle=False, drop_last=False (engine.py), takes `loss = criterion(mask, outputs)` per
# batch, with torch_dice_coef_loss (utils.py) over the flattened batch, and returns
# MetricLogger.avg after `losses.update(loss.item(), bsz)`: sum(loss * bsz) / sum(bsz).
def study_validation_loss(masks, probs, batch_size):
  total, count = 0.0, 0
  for start in range(0, len(masks), batch_size):
    y, p = masks[start:start + batch_size], probs[start:start + batch_size]
    loss = 1.0 - (2.0 * np.sum(y * p) + 1.0) / (np.sum(y) + np.sum(p) + 1.0)
    total += loss * len(y)
    count += len(y)
  return total / count


def _task(classes=("lungs",), loss="auto", name="phantom", fov=False, val_loss="per_image",
          batch_size=64):
  config = config_lib.default_config()
  config.segmentation.loss = loss
  config.segmentation.val_loss = val_loss
  config.input.batch_size = batch_size
  info = types.SimpleNamespace(name=name, task="segmentation", class_names=classes,
                               eval_class_names=classes, has_fov=fov)
  return segmentation.Segmentation(config, info)


def _masks(seed=0, n=12, size=16, k=1):
  """Blobs of random size, with an empty mask and an empty prediction among them."""
  rng = np.random.default_rng(seed)
  truth = np.zeros((n, size, size, k), np.uint8)
  pred = np.zeros_like(truth)
  for i in range(n):
    for c in range(k):
      r0, c0 = rng.integers(0, size // 2, 2)
      truth[i, r0:r0 + rng.integers(2, size // 2), c0:c0 + rng.integers(2, size // 2), c] = 1
      pred[i, r0 + 1:r0 + rng.integers(2, size // 2), c0:c0 + rng.integers(2, size // 2), c] = 1
  truth[0] = 0  # empty mask, empty prediction: Dice 1.0
  pred[0] = 0
  truth[1] = 0  # empty mask, a false positive: Dice 0.0
  pred[2] = 0  # missed completely: Dice 0.0
  return truth, pred


def _counts(truth, pred):
  t, p = truth.astype(np.int64), pred.astype(np.int64)
  return {"intersection": (t * p).sum(axis=(1, 2)), "prediction_sum": p.sum(axis=(1, 2)),
          "target_sum": t.sum(axis=(1, 2))}


@pytest.mark.parametrize("k", [1, 3])
def test_dice_and_mean_dice_reproduce_the_studys_functions(k):
  truth, pred = _masks(k=k)
  got = segmentation.overlap_metrics(**_counts(truth, pred))
  assert got["dice"] == pytest.approx(study_dice(pred, truth), abs=1e-12)
  assert got["mean_dice"] == pytest.approx(study_mean_dice_coef(truth > 0.5, pred > 0.5),
                                           abs=1e-12)
  # Dice is the F1 score of the pixels; IoU their Jaccard index (scikit-learn).
  assert got["dice"] == pytest.approx(f1_score(truth.ravel(), pred.ravel()), abs=1e-12)
  assert got["iou"] == pytest.approx(jaccard_score(truth.ravel(), pred.ravel()), abs=1e-12)
  per_image = [jaccard_score(t.ravel(), p.ravel(), zero_division=1.0)
               for t, p in zip(truth, pred)]
  assert got["mean_iou"] == pytest.approx(np.mean(per_image), abs=1e-12)
  assert 0.1 < got["dice"] < 0.95  # a partial overlap, not a degenerate case


def test_metrics_per_class():
  truth, pred = _masks(seed=1, k=2)
  task = _task(classes=("left", "right"))
  counts = _counts(truth, pred)
  parts = task._loss_parts(jnp.asarray(pred, jnp.float32), jnp.asarray(truth, jnp.float32))
  result = task.metrics({**counts, **parts})
  for c, name in enumerate(("left", "right")):
    assert result[f"dice/{name}"] == pytest.approx(study_dice(pred[..., c], truth[..., c]))
    assert result[f"mean_dice/{name}"] == pytest.approx(
        study_mean_dice_coef(truth[..., c:c + 1], pred[..., c:c + 1]))
  assert result["dice"] == pytest.approx(study_dice(pred, truth))


def _hand_made_batch():
  """Five 4 x 4 images: logits and masks, three of the masks empty."""
  low, high = -4.0, 3.0
  logits = np.full((5, 4, 4, 1), low, np.float32)
  masks = np.zeros((5, 4, 4, 1), np.float32)
  masks[0, :2, :2] = 1  # found, with one pixel too many
  logits[0, :2, :2] = high
  logits[0, 2, 0] = high
  logits[1, 3, 3] = 0.5  # empty mask, one weak false positive
  # 2: empty mask, nothing predicted
  masks[3, 1:, 1:] = 1  # half found
  logits[3, 1:3, 1:] = 1.0
  logits[4, :, :2] = high  # empty mask, a large false positive
  return logits, masks


def _validation_loss(task, logits, masks):
  """The task's validation loss through its evaluation step, batched as the trainer may."""
  step = jax.jit(task.make_eval_step(lambda variables, images, train: jnp.asarray(images),
                                     lambda x: x))
  outputs = [step({}, {"image": logits[i:i + 3], "mask": masks[i:i + 3]})
             for i in range(0, len(logits), 3)]
  predictions = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  return task.metrics(predictions)["loss"]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 32])
def test_pooled_validation_loss_is_the_studys(batch_size):
  logits, masks = _hand_made_batch()
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = study_validation_loss(masks, probs, batch_size)
  task = _task(loss="dice", val_loss="pooled", batch_size=batch_size)
  assert _validation_loss(task, logits, masks) == pytest.approx(expected, abs=1e-6)


def test_per_image_validation_loss_differs_from_the_pooled_one_on_empty_masks():
  logits, masks = _hand_made_batch()
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per_image = _validation_loss(_task(loss="dice", val_loss="per_image"), logits, masks)
  pooled = _validation_loss(_task(loss="dice", val_loss="pooled", batch_size=32), logits, masks)
  # Per image is the study's formula over batches of one image.
  assert per_image == pytest.approx(study_validation_loss(masks, probs, 1), abs=1e-6)
  assert pooled == pytest.approx(study_validation_loss(masks, probs, 32), abs=1e-6)
  assert abs(per_image - pooled) > 0.05, (per_image, pooled)
  # Why: image 2 (empty mask, 16 pixels at p = sigmoid(-4)) costs 1 - 1 / (Σp + 1) on its
  # own, but barely moves the loss of a batch it joins.
  alone = study_validation_loss(masks[2:3], probs[2:3], 1)
  assert alone > 0.2
  with_image_0 = [_validation_loss(_task(loss="dice", val_loss="pooled", batch_size=2),
                                   logits[i], masks[i]) for i in ([0], [0, 2])]
  assert abs(with_image_0[1] - with_image_0[0]) < alone / 5


def test_pooled_bce_is_the_mean_over_pixels():
  logits, masks = _hand_made_batch()
  bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits),
                                                             torch.tensor(masks))
  for val_loss in ("pooled", "per_image"):
    task = _task(name="drive", val_loss=val_loss, batch_size=5)
    assert _validation_loss(task, logits, masks) == pytest.approx(float(bce), abs=1e-6)


def test_validation_loss_setting_is_checked():
  with pytest.raises(ValueError, match="segmentation.val_loss='batch'.*pooled"):
    _task(val_loss="batch")


def test_empty_test_set_and_all_empty_masks():
  empty = {k: np.zeros((0, 1), np.int64) for k in ("intersection", "prediction_sum",
                                                    "target_sum")}
  assert all(np.isnan(v) for v in segmentation.overlap_metrics(**empty).values())
  zeros = {k: np.zeros((3, 1), np.int64) for k in empty}
  assert segmentation.overlap_metrics(**zeros) == {"dice": 1.0, "mean_dice": 1.0, "iou": 1.0,
                                                   "mean_iou": 1.0}


def test_dice_loss_is_the_studys_over_the_flattened_batch():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  masks = (rng.random((4, 8, 8, 1)) < 0.3).astype(np.float32)
  expected = study_dice_loss(torch.tensor(masks), torch.sigmoid(torch.tensor(logits)))
  got = _task(loss="dice").loss(jnp.asarray(logits), {"mask": jnp.asarray(masks)})
  assert float(got) == pytest.approx(float(expected), abs=1e-6)
  # Per image: each image's own Dice loss.
  per_image = _task(loss="dice")._loss_terms(jnp.asarray(logits), jnp.asarray(masks),
                                             pooled=False)
  for i in range(4):
    assert float(per_image[i]) == pytest.approx(float(study_dice_loss(
        torch.tensor(masks[i]), torch.sigmoid(torch.tensor(logits[i])))), abs=1e-6)


def test_bce_and_bce_dice_and_auxiliary_head():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  aux = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  masks = (rng.random((2, 8, 8, 1)) < 0.3).astype(np.float32)
  bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(torch.tensor(logits)),
                                                 torch.tensor(masks))
  dice = study_dice_loss(torch.tensor(masks), torch.sigmoid(torch.tensor(logits)))
  batch = {"mask": jnp.asarray(masks)}
  assert float(_task(name="drive").loss(jnp.asarray(logits), batch)) == pytest.approx(
      float(bce), abs=1e-5)  # DRIVE's reference loss is BCE
  assert float(_task(loss="bce_dice").loss(jnp.asarray(logits), batch)) == pytest.approx(
      float(bce + dice), abs=1e-5)
  main_only = float(_task(loss="dice").loss(jnp.asarray(logits), batch))
  aux_only = float(_task(loss="dice").loss(jnp.asarray(aux), batch))
  both = float(_task(loss="dice").loss((jnp.asarray(logits), jnp.asarray(aux)), batch))
  assert both == pytest.approx(main_only + segmentation.AUX_WEIGHT * aux_only, abs=1e-6)
  with pytest.raises(ValueError, match="segmentation.loss='focal'"):
    _task(loss="focal")


def test_softmax_mode_has_a_background_class():
  task = _task(classes=("left", "right"), loss="softmax_ce_dice")
  assert task.num_outputs == 3
  masks = np.zeros((1, 2, 2, 2), np.float32)
  masks[0, 0, 0, 0] = masks[0, 1, 1, 1] = 1
  masks[0, 0, 1] = 1  # overlap: the first class wins
  onehot = np.asarray(segmentation._with_background(jnp.asarray(masks)))
  np.testing.assert_array_equal(onehot.argmax(-1), [[[1, 1], [0, 2]]])
  logits = np.log(np.clip(onehot, 1e-3, 1)).astype(np.float32)
  ce = torch.nn.functional.cross_entropy(torch.tensor(logits).permute(0, 3, 1, 2),
                                         torch.tensor(onehot.argmax(-1)))
  probs = torch.softmax(torch.tensor(logits), -1)[..., 1:]
  dice = np.mean([float(study_dice_loss(torch.tensor(onehot[..., c + 1]), probs[..., c]))
                  for c in range(2)])
  assert float(task.loss(jnp.asarray(logits), {"mask": jnp.asarray(masks)})) == pytest.approx(
      float(ce) + dice, abs=1e-5)


def test_eval_step_resizes_to_the_mask_and_counts_inside_the_field_of_view():
  task = _task(fov=True)
  assert task.keys == ("image", "mask", "fov")
  rng = np.random.default_rng(4)
  small = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)  # the model's output size
  masks = (rng.random((3, 16, 16, 1)) < 0.4).astype(np.uint8)
  fov = np.zeros((3, 16, 16, 1), np.uint8)
  fov[:, 2:14, 3:15] = 1
  apply_fn = lambda variables, images, train: jnp.asarray(small)
  step = jax.jit(task.make_eval_step(apply_fn, lambda x: x.astype(jnp.float32)))
  out = step({}, {"image": np.zeros((3, 8, 8, 1), np.uint8), "mask": masks, "fov": fov})

  upsampled = np.asarray(jax.image.resize(small, (3, 16, 16, 1), "bilinear"))
  predicted = (1 / (1 + np.exp(-upsampled)) > 0.5) * fov
  truth = masks * fov
  np.testing.assert_array_equal(out["intersection"], (predicted * truth).sum(axis=(1, 2)))
  np.testing.assert_array_equal(out["prediction_sum"], predicted.sum(axis=(1, 2)))
  np.testing.assert_array_equal(out["target_sum"], truth.sum(axis=(1, 2)))
  assert out["pixel_loss"].shape == (3,) and out["soft_intersection"].shape == (3, 1)
  np.testing.assert_allclose(out["soft_target_sum"][:, 0], masks.sum(axis=(1, 2, 3)))
  assert out["prediction_sum"].sum() < (1 / (1 + np.exp(-upsampled)) > 0.5).sum()


def test_overlays_show_truth_green_and_prediction_red():
  images = np.full((1, 4, 4, 1), 100, np.uint8)
  truth = np.zeros((1, 4, 4, 1), np.uint8)
  pred = np.zeros_like(truth)
  truth[0, 0, 0] = pred[0, 3, 3] = 1
  out = segmentation.overlay(images, truth, pred)
  assert out.shape == (1, 4, 4, 3)
  assert out[0, 0, 0, 1] > out[0, 0, 0, 0] and out[0, 3, 3, 0] > out[0, 3, 3, 1]
  np.testing.assert_array_equal(out[0, 1, 1], [100, 100, 100])


# ------------------------------------------------------------------ post_hoc: surfaces
def test_test_step_returns_the_masks_and_the_eval_steps_counts():
  task = _task(fov=True)
  rng = np.random.default_rng(5)
  small = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  masks = (rng.random((3, 16, 16, 1)) < 0.4).astype(np.uint8)
  fov = np.zeros((3, 16, 16, 1), np.uint8)
  fov[:, 2:14, 3:15] = 1
  batch = {"image": np.zeros((3, 8, 8, 1), np.uint8), "mask": masks, "fov": fov}
  apply_fn = lambda variables, images, train: jnp.asarray(small)
  normalize = lambda x: x.astype(jnp.float32)
  eval_out = jax.jit(task.make_eval_step(apply_fn, normalize))({}, batch)
  test_out = jax.jit(task.make_test_step(apply_fn, normalize))({}, batch)
  assert "predicted_mask" not in eval_out  # validation stays cheap
  assert set(test_out) == set(eval_out) | {"predicted_mask", "true_mask"}
  for key, value in eval_out.items():
    np.testing.assert_array_equal(test_out[key], value)
  upsampled = np.asarray(jax.image.resize(small, (3, 16, 16, 1), "bilinear"))
  predicted = ((1 / (1 + np.exp(-upsampled)) > 0.5) * fov).astype(np.uint8)
  assert test_out["predicted_mask"].dtype == np.uint8
  np.testing.assert_array_equal(test_out["predicted_mask"], predicted)
  np.testing.assert_array_equal(test_out["true_mask"], masks * fov)
  assert task.metrics(test_out) == task.metrics(eval_out)


def _blob_masks(n, shape, k, seed):
  """Random ellipses, prediction shifted and resized from the truth; none empty."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  truth = np.zeros((n, *shape, k), np.uint8)
  pred = np.zeros_like(truth)
  for i in range(n):
    for c in range(k):
      cy, cx = rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10)
      ry, rx = rng.uniform(3, 8, size=2)
      truth[i, ..., c] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
      cy, cx = cy + rng.normal(0, 2), cx + rng.normal(0, 2)
      ry, rx = ry * rng.uniform(0.7, 1.3), rx * rng.uniform(0.7, 1.3)
      pred[i, ..., c] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  return truth, pred


def test_post_hoc_surface_distances_equal_medpy():
  task = _task(classes=("left", "right"))
  truth, pred = _blob_masks(6, (40, 36), 2, seed=0)
  out = task.post_hoc({}, {"predicted_mask": pred, "true_mask": truth})
  surface = json.loads(json.dumps(out, allow_nan=False))["surface"]
  for c, name in enumerate(("left", "right")):
    hd95 = [binary.hd95(pred[i, ..., c], truth[i, ..., c]) for i in range(6)]
    assd = [binary.assd(pred[i, ..., c], truth[i, ..., c]) for i in range(6)]
    assert surface[f"mean_hd95/{name}"] == pytest.approx(np.mean(hd95), abs=1e-9)
    assert surface[f"mean_assd/{name}"] == pytest.approx(np.mean(assd), abs=1e-9)
  # Pooled over images: medpy on the images side by side, each with its own surface
  # (a column of background between them keeps the surfaces apart).
  gap = np.zeros((6, 40, 100, 2), np.uint8)
  side = lambda m: np.concatenate(list(np.concatenate([m, gap], axis=2)), axis=1)
  assert surface["hd95/left"] == pytest.approx(
      binary.hd95(side(pred)[..., 0], side(truth)[..., 0]), abs=1e-9)
  assert surface["assd/left"] == pytest.approx(
      binary.assd(side(pred)[..., 0], side(truth)[..., 0]), abs=1e-9)
  assert surface["surface_one_empty"] == 0
  assert surface["convention"].startswith("both empty: 0; one empty: the image diagonal")
  assert surface["hd95"] > surface["assd"] > 0


def test_post_hoc_empty_mask_convention_and_missing_masks():
  task = _task()
  truth, pred = _blob_masks(3, (20, 30), 1, seed=1)
  truth[0], pred[0] = 0, 0  # both empty: distance 0
  pred[1] = 0  # missed: every truth surface pixel at the diagonal
  surface = task.post_hoc({}, {"predicted_mask": pred, "true_mask": truth})["surface"]
  diagonal = np.hypot(19, 29)
  third = surface_lib.surface_distances(pred[2, ..., 0], truth[2, ..., 0])
  assert surface["mean_hd95"] == pytest.approx(
      (0 + diagonal + surface_lib.hd95(third)) / 3, abs=1e-9)
  assert surface["surface_one_empty"] == 1
  # Without the test step's masks nothing is scored (and the log says so).
  assert task.post_hoc({}, {"intersection": np.zeros((3, 1))}) == {}
