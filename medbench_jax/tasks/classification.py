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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medbench_jax.tasks import base
from medbench_jax.tasks import metrics

# Probabilities are clipped before the log of a ten-crop average.
_EPS = 1e-7


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
