"""Validation and test evaluation: predictions gathered from every device and host,
ten-crop averaging, metrics by scikit-learn, and the results.json file."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from medbench_jax import metrics
from medbench_jax import sharding
from medbench_jax.data import pipeline

EvalStep = Callable[[dict, dict], dict]


def make_eval_step(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> EvalStep:
  """Probabilities and per-example BCE for a batch; (B, 10, H, W, 1) batches are ten-crop
  stacks whose sigmoid outputs are averaged per image, as the reference code does."""

  def eval_step(variables, batch):
    images = batch["image"]
    crops = images.shape[1] if images.ndim == 5 else 1
    flat = images.reshape((-1,) + images.shape[-3:])
    logits = model.apply(variables, pipeline.normalize(flat, mean, std), train=False)
    logits = logits.astype(jnp.float32).reshape(images.shape[0], crops, -1)
    probs = jax.nn.sigmoid(logits).mean(axis=1)
    labels = batch["labels"]
    if crops == 1:
      loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels)
    else:
      p = jnp.clip(probs, 1e-7, 1 - 1e-7)
      loss = -(labels * jnp.log(p) + (1 - labels) * jnp.log1p(-p))
    return {"probs": probs, "loss": loss.mean(axis=-1), "labels": labels,
            "valid": batch["valid"]}

  return eval_step


def predict(eval_step: EvalStep, variables: dict, dataset: grain.IterDataset,
            data_sharding: NamedSharding) -> dict[str, np.ndarray]:
  """Runs the whole split; returns host numpy arrays of the valid examples only.

  Every process returns the same complete arrays (gathered across hosts).
  """
  outputs = []
  for local_batch in pipeline.iterate(dataset):
    out = eval_step(variables, sharding.to_global(local_batch, data_sharding))
    outputs.append(multihost_utils.process_allgather(out, tiled=True))
  gathered = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  valid = gathered.pop("valid").astype(bool)
  return {k: v[valid] for k, v in gathered.items()}


def classification_metrics(predictions: dict[str, np.ndarray],
                           class_names: Sequence[str]) -> dict[str, float]:
  result = metrics.multilabel_auc(predictions["labels"], predictions["probs"], class_names)
  result["loss"] = float(predictions["loss"].mean())
  return result


def _json_number(x: Any) -> Any:
  # JSON has no NaN: an undefined metric is written as null.
  if isinstance(x, float) and math.isnan(x):
    return None
  return x


def assemble_results(*, config: dict, class_names: Sequence[str], trials: list[dict],
                     subset: dict, skipped_examples: int = 0) -> dict:
  """results.json as DESIGN.md specifies (metric "mean_auc" for classification)."""
  values = [t["test"]["mean_auc"] for t in trials]
  values = [math.nan if v is None else v for v in values]
  return {
      "task": "classification",
      "metric": "mean_auc",
      "dataset": config["dataset"]["name"],
      "model": config["model"]["name"],
      "init": config["model"]["init"],
      "label_fraction": float(config["dataset"]["label_fraction"]),
      "label_subset": subset,
      "class_names": list(class_names),
      "skipped_examples": skipped_examples,
      "trials": trials,
      "summary": {k: _json_number(v) for k, v in metrics.summarize(values).items()},
      "config": config,
  }


def trial_record(*, seed: int, best_step: int, best_val_loss: float,
                 test_metrics: dict[str, float]) -> dict:
  return {"seed": seed, "best_step": best_step, "best_val_loss": best_val_loss,
          "test": {k: _json_number(v) for k, v in test_metrics.items()}}


def write_json(path, obj: dict) -> None:
  text = json.dumps(obj, indent=2, allow_nan=False)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.rename(path)
