"""Metrics of whole splits, computed on the host from gathered raw predictions.

Classification metrics come from scikit-learn; an undefined metric is NaN (written
as null in results.json), never a made-up value.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

from absl import logging
import numpy as np
from sklearn import metrics as sk_metrics


def multilabel_auc(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                   mean_over: Sequence[str] | None = None) -> dict[str, float]:
  """Per-class (one-vs-rest) ROC AUC and their mean.

  A class whose labels take a single value in `labels` has no ROC curve: its AUC
  is NaN (never a fake 0.5), it is left out of the mean, and the log says so.
  `mean_over` names the classes the mean covers (a publisher's evaluation classes,
  e.g. CheXpert's five); default all. Returns {"mean_auc": m, "auc/NAME": a, ...}.
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
  unknown = sorted(set(mean_over or ()) - set(class_names))
  if unknown:
    raise ValueError(f"mean_over names {unknown}, which are not among {list(class_names)}")
  averaged = [result[f"auc/{name}"] for name in (mean_over or class_names)]
  defined = [v for v in averaged if not math.isnan(v)]
  result["mean_auc"] = float(np.mean(defined)) if defined else math.nan
  return result


def accuracy(labels: np.ndarray, scores: np.ndarray, multi_class: bool) -> float:
  """MedMNIST's ACC: the arg-max class against the one-hot label for multi-class sets;
  otherwise each label thresholded at 0.5, accuracy averaged over labels."""
  labels = np.asarray(labels) >= 0.5
  scores = np.asarray(scores)
  if multi_class:
    return float(np.mean(scores.argmax(axis=1) == labels.argmax(axis=1)))
  return float(np.mean((scores > 0.5) == labels))
