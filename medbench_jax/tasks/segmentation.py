"""Semantic segmentation: per-class binary masks (classes may overlap, e.g. a clavicle over
a lung), sigmoid outputs with Dice and/or BCE losses, or mutually exclusive classes with
softmax cross-entropy + Dice.

The reference study's protocol: Dice loss `1 - (2·Σ(y·p) + 1) / (Σy + Σp + 1)` over the
flattened batch with sigmoid outputs (BCE for DRIVE); test metrics on the predictions
thresholded at 0.5: `dice`, the Dice of the whole test set pooled over all pixels (its
`dice`), and `mean_dice`, the mean over images of each image's Dice, an image whose
prediction and mask are both empty scoring 1.0 (its `mean_dice_coef`); IoU the same two
ways. Predictions are made on the full image at the model's input size and resized back
to the stored mask resolution before scoring; where the data set has a field of view
(DRIVE), only pixels inside it count.

Validation loss (early stopping), `config.segmentation.val_loss`:
  pooled     the reference's: the loss pooled over each batch of `input.batch_size` images
             of the split in order (its validation loader: the training batch size, no
             shuffling, the last batch partial), averaged over batches weighted by their
             sizes (its MetricLogger). The paper setting.
  per_image  the mean over images of each image's own loss: it does not depend on how the
             split is batched. With Dice, an image with an empty mask then scores
             1 - 1/(Σp + 1) on its own, where pooled it only adds Σp to its batch's
             denominator; where most masks are empty (SIIM-ACR) the two rank checkpoints
             differently.
The evaluation step returns each image's parts of the loss (its mean pixel-wise term and
the soft sums Σy·p, Σp, Σy per class), from which either is computed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medbench_jax import config_lib
from medbench_jax.tasks import base
from medbench_jax.tasks import surface

LOSSES = ("dice", "bce", "bce_dice", "softmax_ce_dice")
VAL_LOSSES = ("pooled", "per_image")
# Data sets whose reference loss is BCE rather than Dice (thin vessels: Dice's gradient is
# dominated by the few positive pixels).
_BCE_DATASETS = ("drive",)
# The auxiliary head's loss weight when a model returns (main, auxiliary) logits
# (mmsegmentation's UperNet configs).
AUX_WEIGHT = 0.4
_SMOOTH = 1.0
_COUNTS = ("intersection", "prediction_sum", "target_sum")
# Per image: the mean pixel-wise loss, and per class the soft sums of the Dice loss.
_SOFT_SUMS = ("soft_intersection", "soft_prediction_sum", "soft_target_sum")
_LOSS_PARTS = ("pixel_loss", *_SOFT_SUMS)
# How HD95 and ASSD treat empty masks (surface.py), as result.json states it.
SURFACE_CONVENTION = ("both empty: 0; one empty: the image diagonal, the largest distance "
                      "the image allows")


def _with_background(masks: jnp.ndarray) -> jnp.ndarray:
  """(..., K) 0/1 masks -> (..., K + 1) one-hot with background first; where masks
  overlap the first listed class wins."""
  labels = jnp.where(masks.any(axis=-1), jnp.argmax(masks, axis=-1) + 1, 0)
  return jax.nn.one_hot(labels, masks.shape[-1] + 1, dtype=jnp.float32)


def resolve_loss(name: str, dataset: str) -> str:
  if name == "auto":
    return "bce" if dataset in _BCE_DATASETS else "dice"
  config_lib.check(name in LOSSES, "segmentation.loss", name, ("auto", *LOSSES))
  return name


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.segmentation before any work starts."""
  resolve_loss(config.segmentation.loss, config.dataset.name)
  config_lib.check(config.segmentation.val_loss in VAL_LOSSES, "segmentation.val_loss",
                   config.segmentation.val_loss, VAL_LOSSES)


class Segmentation(base.Task):
  """A segmentation head over the data set's mask classes; headline metric pooled Dice."""

  name = "segmentation"
  metric = "dice"
  num_eval_images = 8

  def __init__(self, config, info):
    super().__init__(config, info)
    validate(config)
    self.loss_name = resolve_loss(config.segmentation.loss, info.name)
    self.val_loss = config.segmentation.val_loss
    self.val_batch_size = config.input.batch_size
    self.softmax = self.loss_name == "softmax_ce_dice"
    self.keys = ("image", "mask") + (("fov",) if info.has_fov else ())

  @property
  def num_outputs(self) -> int:
    return len(self.class_names) + int(self.softmax)

  def pp_train(self) -> str:
    return self.config.input.pp_train

  def pp_eval(self, test: bool) -> str:
    del test  # the full image, at the model's input size; masks stay as stored
    return self.config.input.pp_eval

  # ------------------------------------------------------------ losses
  def _loss_parts(self, logits: jnp.ndarray, masks: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per image: the mean pixel-wise loss (BCE, or cross-entropy; 0 where the loss has
    none) (N,), and per class the soft sums Σy·p, Σp, Σy of the Dice loss (N, K)."""
    logits = logits.astype(jnp.float32)
    masks = masks.astype(jnp.float32)
    if self.softmax:
      targets = _with_background(masks)
      pixel = optax.softmax_cross_entropy(logits, targets).mean(axis=(1, 2))
      probs, targets = jax.nn.softmax(logits)[..., 1:], targets[..., 1:]
    else:
      probs, targets = jax.nn.sigmoid(logits), masks
      pixel = (optax.sigmoid_binary_cross_entropy(logits, masks).mean(axis=(1, 2, 3))
               if "bce" in self.loss_name else jnp.zeros(logits.shape[:1], jnp.float32))
    return {"pixel_loss": pixel, "soft_intersection": (targets * probs).sum(axis=(1, 2)),
            "soft_prediction_sum": probs.sum(axis=(1, 2)),
            "soft_target_sum": targets.sum(axis=(1, 2))}

  def _combine(self, parts: Mapping[str, Any], pooled: bool) -> Any:
    """The configured loss from `_loss_parts` (jax or numpy arrays): of all the images
    pooled into one (a scalar), or of each image on its own ((N,))."""
    pixel, sums = parts["pixel_loss"], [parts[k] for k in _SOFT_SUMS]
    if pooled:  # images of one size: the pixel mean of the batch is the mean of means
      pixel, sums = pixel.mean(axis=0), [s.sum(axis=0) for s in sums]
    if "dice" not in self.loss_name:
      return pixel
    if not self.softmax:  # the study's sigmoid Dice flattens the classes too
      sums = [s.sum(axis=-1, keepdims=True) for s in sums]
    intersection, prediction, target = sums
    dice = 1.0 - (2.0 * intersection + _SMOOTH) / (target + prediction + _SMOOTH)
    return pixel + dice.mean(axis=-1)

  def _loss_terms(self, logits: jnp.ndarray, masks: jnp.ndarray, pooled: bool = True
                  ) -> jnp.ndarray:
    """The configured loss of a batch (pooled) or of each of its images."""
    return self._combine(self._loss_parts(logits, masks), pooled)

  def loss(self, outputs: Any, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    if isinstance(outputs, (tuple, list)):  # (main, auxiliary) logits
      main, aux = outputs
      return (self._loss_terms(main, batch["mask"])
              + AUX_WEIGHT * self._loss_terms(aux, batch["mask"]))
    return self._loss_terms(outputs, batch["mask"])

  def validation_loss(self, predictions: Mapping[str, np.ndarray]) -> float:
    """`config.segmentation.val_loss` over a split's images, in the order evaluated."""
    parts = {k: np.asarray(predictions[k], np.float64) for k in _LOSS_PARTS}
    num = len(parts["pixel_loss"])
    if not num:
      return math.nan
    if self.val_loss == "per_image":
      return float(np.mean(self._combine(parts, pooled=False)))
    starts = range(0, num, self.val_batch_size)
    losses = [self._combine({k: v[i:i + self.val_batch_size] for k, v in parts.items()},
                            pooled=True) for i in starts]
    sizes = [min(self.val_batch_size, num - i) for i in starts]
    return float(np.average(losses, weights=sizes))

  # ------------------------------------------------------------ evaluation
  def make_predict(self, apply_fn: Callable, normalize: base.Normalize
                   ) -> Callable[[dict, dict], tuple[jnp.ndarray, jnp.ndarray]]:
    """(variables, batch) -> (logits, 0/1 predictions (N, S, S, K)) at the masks' size."""

    def predict(variables: dict, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
      logits = apply_fn(variables, normalize(batch["image"]), train=False)
      logits = logits.astype(jnp.float32)
      size = batch["mask"].shape[1:3]
      if logits.shape[1:3] != size:
        logits = jax.image.resize(logits, logits.shape[:1] + size + logits.shape[3:],
                                  "bilinear")
      if self.softmax:
        winner = jnp.argmax(logits, axis=-1)
        predicted = jax.nn.one_hot(winner, logits.shape[-1], dtype=jnp.float32)[..., 1:]
      else:
        predicted = (jax.nn.sigmoid(logits) > 0.5).astype(jnp.float32)
      return logits, predicted

    return predict

  def make_eval_step(self, apply_fn: Callable, normalize: base.Normalize,
                     masks: bool = False) -> base.EvalStep:
    """Per image and class: pixel counts of intersection, prediction and mask (inside the
    field of view where there is one), and the image's parts of the loss; with `masks`
    also the predicted and true masks themselves, (N, H, W, K) uint8 at the stored mask
    resolution, zero outside the field of view (what `post_hoc` scores)."""
    predict = self.make_predict(apply_fn, normalize)

    def eval_step(variables: dict, batch: dict) -> dict:
      logits, predicted = predict(variables, batch)
      truth = (batch["mask"] > 0).astype(jnp.float32)
      inside = (batch["fov"] > 0).astype(jnp.float32) if "fov" in batch else 1.0
      counts = {"intersection": predicted * truth * inside,
                "prediction_sum": predicted * inside, "target_sum": truth * inside}
      out = {k: v.sum(axis=(1, 2)).astype(jnp.int32) for k, v in counts.items()}
      if masks:
        out["predicted_mask"] = counts["prediction_sum"].astype(jnp.uint8)
        out["true_mask"] = counts["target_sum"].astype(jnp.uint8)
      return {**out, **self._loss_parts(logits, truth)}

    return eval_step

  def make_test_step(self, apply_fn: Callable, normalize: base.Normalize) -> base.EvalStep:
    return self.make_eval_step(apply_fn, normalize, masks=True)

  def metrics(self, predictions: Mapping[str, np.ndarray]) -> dict[str, float]:
    counts = {k: np.asarray(predictions[k], np.int64) for k in _COUNTS}
    result = overlap_metrics(**counts)
    for c, name in enumerate(self.class_names):
      per_class = overlap_metrics(**{k: v[:, c:c + 1] for k, v in counts.items()})
      result.update({f"{k}/{name}": v for k, v in per_class.items()})
    result["loss"] = self.validation_loss(predictions)
    return result

  def test_predictions(self, predictions: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {**{k: np.asarray(predictions[k], np.int64) for k in _COUNTS},
            "class_names": np.array(self.class_names)}

  def post_hoc(self, validation: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
    """HD95 and ASSD of the test masks (`make_test_step`'s), pooled as Dice is:
    {"surface": {"hd95", "assd" (the surface distances of all images and classes
    together), "mean_hd95", "mean_assd" (the mean over images of each image's value,
    its classes pooled), the same per class as "hd95/NAME", ..., "surface_one_empty"
    (image-class pairs where exactly one of prediction and truth is empty),
    "convention", "spacing"}}. Distances are in pixels of the stored masks, inside the
    field of view where there is one (surface.py)."""
    del validation  # nothing is chosen on validation
    if "predicted_mask" not in test:
      # A trial that trained for hours is not failed over a metric beside its headline.
      logging.error("No surface distances: the test split was not predicted with "
                    "make_test_step (outputs %s have no 'predicted_mask').", sorted(test))
      return {}
    result = surface.surface_metrics(test["predicted_mask"], test["true_mask"],
                                     self.class_names)
    return {"surface": {**{k: None if isinstance(v, float) and math.isnan(v) else v
                           for k, v in result.items()},
                        "convention": SURFACE_CONVENTION, "spacing": "pixel"}}

  def input_images(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    images = batch["image"][:16]
    return {"train/augmented_inputs": base.image_grid(
        overlay(images, batch["mask"][:16], np.zeros_like(batch["mask"][:16])))[None]}

  def eval_images(self, batch: Mapping[str, np.ndarray], predicted: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Validation overlays: ground truth in green, prediction in red, overlap yellow."""
    images = batch["image"]
    size = batch["mask"].shape[1:3]
    if images.shape[1:3] != size:  # show the image at the masks' resolution
      images = np.asarray(jax.image.resize(images.astype(np.float32),
                                           images.shape[:1] + size + images.shape[3:],
                                           "linear")).round().astype(np.uint8)
    return {"val/overlays": base.image_grid(
        overlay(images, batch["mask"], predicted), columns=4)[None]}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 1.0 where both are empty (the study's empty_score)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator == 0, 1.0, numerator / np.maximum(denominator, 1))


def overlap_metrics(intersection: np.ndarray, prediction_sum: np.ndarray,
                    target_sum: np.ndarray) -> dict[str, float]:
  """dice / iou pooled over all images and the given classes, and their means over images
  (each image pooled over the classes). Inputs: (N, K) pixel counts."""
  i, p, t = (np.asarray(x, np.float64) for x in (intersection, prediction_sum, target_sum))
  if not len(i):
    return {k: math.nan for k in ("dice", "mean_dice", "iou", "mean_iou")}
  total = {k: v.sum() for k, v in (("i", i), ("p", p), ("t", t))}
  image = {k: v.sum(axis=1) for k, v in (("i", i), ("p", p), ("t", t))}
  return {
      "dice": float(_ratio(2 * total["i"], total["p"] + total["t"])),
      "mean_dice": float(np.mean(_ratio(2 * image["i"], image["p"] + image["t"]))),
      "iou": float(_ratio(total["i"], total["p"] + total["t"] - total["i"])),
      "mean_iou": float(np.mean(_ratio(image["i"], image["p"] + image["t"] - image["i"]))),
  }


_GREEN, _RED = np.array([0, 255, 0], np.float32), np.array([255, 0, 0], np.float32)


def overlay(images: np.ndarray, masks: np.ndarray, predicted: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 images with the union over classes of masks (green) and
  predictions (red) blended in: RGB (N, H, W, 3) uint8."""
  gray = np.asarray(images, np.float32)
  rgb = np.broadcast_to(gray.mean(axis=-1, keepdims=True) if gray.shape[-1] != 3 else gray,
                        gray.shape[:3] + (3,))
  truth = (np.asarray(masks) > 0).any(axis=-1, keepdims=True)
  guess = (np.asarray(predicted) > 0).any(axis=-1, keepdims=True)
  tint = truth * _GREEN + guess * _RED
  shown = truth | guess
  out = np.where(shown, 0.55 * rgb + 0.45 * np.minimum(tint, 255), rgb)
  return out.round().astype(np.uint8)
