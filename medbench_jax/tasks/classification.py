"""Image classification: multi-label and binary sets with sigmoid BCE, multi-class sets
(one-hot labels, e.g. MedMNIST's PathMNIST or RSNA's three classes) with softmax
cross-entropy.

Evaluation follows the reference study: probabilities are averaged over the ten
crops of test-time augmentation (after the sigmoid/softmax), and metrics are the
per-class ROC AUC and their mean over the data set's evaluation classes (all
classes, or the publisher's subset such as CheXpert's five competition findings),
with accuracy as MedMNIST defines it beside them.
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
from medbench_jax.tasks import calibration
from medbench_jax.tasks import metrics
from medbench_jax.tasks import operating_points

# Probabilities are clipped before the log of a ten-crop average.
_EPS = 1e-7
# config.eval.threshold_rule: a rule without a target, or METHOD:TARGET.
THRESHOLD_RULES = ("youden", "f1", "sensitivity:T", "specificity:T")
# Decimals of the reliability diagrams' bin means in result.json.
_RELIABILITY_DECIMALS = 6


def threshold_rule(rule: str) -> tuple[str, float | None]:
  """config.eval.threshold_rule -> (operating_points method, target): "youden", "f1",
  "sensitivity:0.9" (the most specific threshold with validation sensitivity >= 0.9),
  "specificity:0.9" (the most sensitive one with specificity >= 0.9)."""
  method, sep, target = rule.partition(":")
  try:
    value = float(target) if sep else None
    operating_points.check_rule(method, value)
  except ValueError:
    config_lib.check(False, "eval.threshold_rule", rule,
                     f"{' | '.join(THRESHOLD_RULES)}, T in (0, 1]")
  return method, value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.eval before any work starts."""
  threshold_rule(config.eval.threshold_rule)
  resamples = config.eval.bootstrap_resamples
  config_lib.check(isinstance(resamples, int) and resamples >= 0, "eval.bootstrap_resamples",
                   resamples, "an integer >= 0 (0: no intervals)")


class Classification(base.Task):
  """A classifier head over the data set's labels; headline metric mean AUC."""

  name = "classification"
  metric = "mean_auc"
  keys = ("image", "labels")

  def __init__(self, config, info):
    super().__init__(config, info)
    self.multi_class = info.task == "multi-class"

  def pp_train(self) -> str:
    return self.config.input.pp_train

  def pp_eval(self, test: bool) -> str:
    if test and self.config.train.test_tta:
      return self.config.input.pp_test
    return self.config.input.pp_eval

  def loss(self, outputs: jnp.ndarray, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    logits = outputs.astype(jnp.float32)
    if self.multi_class:
      return optax.softmax_cross_entropy(logits, batch["labels"]).mean()
    return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()

  def make_eval_step(self, apply_fn: Callable, normalize: base.Normalize) -> base.EvalStep:
    """Probabilities and per-example loss; (B, crops, H, W, C) batches are test-time
    augmentation stacks whose probabilities are averaged per image."""
    activation = jax.nn.softmax if self.multi_class else jax.nn.sigmoid

    def eval_step(variables: dict, batch: dict) -> dict:
      images, crops = base.flatten_crops(batch["image"])
      logits = apply_fn(variables, normalize(images), train=False).astype(jnp.float32)
      probs = base.mean_over_crops(activation(logits), len(batch["image"]), crops)
      labels = batch["labels"]
      if crops == 1:
        per_label = (optax.softmax_cross_entropy(logits, labels)[:, None] if self.multi_class
                     else optax.sigmoid_binary_cross_entropy(logits, labels))
      else:
        p = jnp.clip(probs, _EPS, 1 - _EPS)
        per_label = (-(labels * jnp.log(p)).sum(axis=-1, keepdims=True) if self.multi_class
                     else -(labels * jnp.log(p) + (1 - labels) * jnp.log1p(-p)))
      return {"probs": probs, "loss": per_label.mean(axis=-1), "labels": labels}

    return eval_step

  def metrics(self, predictions: Mapping[str, np.ndarray]) -> dict[str, float]:
    result = metrics.multilabel_auc(predictions["labels"], predictions["probs"],
                                    self.class_names, mean_over=self.info.eval_class_names)
    result["accuracy"] = metrics.accuracy(predictions["labels"], predictions["probs"],
                                          self.multi_class)
    result["loss"] = float(predictions["loss"].mean())
    return result

  def test_predictions(self, predictions: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {"labels": predictions["labels"].astype(np.float32),
            "probs": predictions["probs"].astype(np.float32),
            "class_names": np.array(self.class_names)}

  def results_fields(self) -> dict[str, Any]:
    return {**super().results_fields(),
            "eval_class_names": list(self.info.eval_class_names)}

  def post_hoc(self, validation: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
    """Per-class thresholds chosen on validation by config.eval.threshold_rule and the
    test metrics at them (operating_points.py, bootstrap intervals over
    config.eval.bootstrap_resamples resamples, seed 0 as the report's), and the test
    calibration before and after a temperature fitted on validation (calibration.py).

    Returns {"thresholds": {"rule", "per_class": {NAME: float | None}},
    "operating_points": operating_points.operating_points(...), "calibration": ...}
    (`compact_calibration`); a class with one validation label value has no threshold
    (None), and nothing is scored where validation or test has no example."""
    rule = self.config.eval.threshold_rule
    method, target = threshold_rule(rule)
    if not len(validation["labels"]) or not len(test["labels"]):
      logging.warning("No operating points or calibration: %d validation and %d test "
                      "examples.", len(validation["labels"]), len(test["labels"]))
      return {"thresholds": {"rule": rule, "per_class": dict.fromkeys(self.class_names)}}
    points = operating_points.operating_points(
        validation["labels"], validation["probs"], test["labels"], test["probs"],
        self.class_names, method, target,
        num_resamples=self.config.eval.bootstrap_resamples)
    calibrated = calibration.calibrate(validation["labels"], validation["probs"],
                                       test["labels"], test["probs"], self.class_names,
                                       self.multi_class)
    return {"thresholds": {"rule": rule, "per_class": {
                name: record["threshold"] for name, record in points["classes"].items()}},
            "operating_points": points,
            "calibration": compact_calibration(calibrated)}


def _rounded(values: list) -> list:
  return [None if v is None else round(v, _RELIABILITY_DECIMALS) for v in values]


def compact_calibration(calibrated: Mapping[str, Any]) -> dict[str, Any]:
  """calibration.calibrate's record in result.json's size: the numbers as they are, and
  the reliability diagrams of the equal-width bins only (their edges are
  linspace(0, 1, num_bins + 1)), per class (and "top_label" for multi-class sets) before
  and after the temperature: {"reliability": {"before" | "after": {NAME: {"count",
  "mean_predicted", "fraction_positive"}}}}, bin means rounded to 6 decimals, None in
  empty bins."""
  result = {k: v for k, v in calibrated.items() if k not in ("before", "after")}
  result["reliability"] = {}
  for when in ("before", "after"):
    record = dict(calibrated[when])
    diagrams = record.pop("reliability")["uniform"]
    result[when] = {k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in record.items()}
    result["reliability"][when] = {
        name: {"count": bins["count"], "mean_predicted": _rounded(bins["mean_predicted"]),
               "fraction_positive": _rounded(bins["fraction_positive"])}
        for name, bins in diagrams.items()}
  return result
