"""Test and validation metrics, computed by scikit-learn on gathered raw predictions."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from absl import logging
from sklearn import metrics as sk_metrics


def multilabel_auc(labels: np.ndarray, scores: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, float]:
  """Per-class ROC AUC and their mean.

  A class whose labels take a single value in `labels` has no ROC curve: its AUC
  is NaN (never a fake 0.5), it is left out of the mean, and the log says so.
  Returns {"mean_auc": m, "auc/NAME": a, ...}.
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores, np.float64)
  if labels.shape != scores.shape or labels.ndim != 2:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal (N, C)")
  if labels.shape[1] != len(class_names):
    raise ValueError(f"{labels.shape[1]} label columns but {len(class_names)} class names")
  binary = labels >= 0.5
  result = {}
  undefined = []
  for c, name in enumerate(class_names):
    if binary[:, c].all() or not binary[:, c].any():
      result[f"auc/{name}"] = math.nan
      undefined.append(name)
    else:
      result[f"auc/{name}"] = float(sk_metrics.roc_auc_score(binary[:, c], scores[:, c]))
  if undefined:
    logging.warning("AUC undefined (only one label value among %d examples) for: %s; "
                    "excluded from mean_auc.", len(labels), ", ".join(undefined))
  defined = [v for v in result.values() if not math.isnan(v)]
  result["mean_auc"] = float(np.mean(defined)) if defined else math.nan
  return result


def summarize(values: Sequence[float]) -> dict[str, float | int]:
  """Mean and sample standard deviation (ddof=1) over trials, as results.json reports."""
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  n = int(values.size)
  return {"mean": float(values.mean()) if n else math.nan,
          "std": float(values.std(ddof=1)) if n > 1 else math.nan,
          "n": n}
