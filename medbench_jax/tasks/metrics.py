"""Metrics of whole splits, computed on the host from gathered raw predictions.

Classification metrics come from scikit-learn; an undefined metric is NaN (written
as null in results.json), never a made-up value. Bootstrap intervals resample the
examples of a split (the trainer's operating points and the report share them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math

from absl import logging
import numpy as np
from sklearn import metrics as sk_metrics

_RESAMPLE_CHUNK = 100  # resamples held in memory at once: (chunk, N) counts

# A statistic maps resampling counts (B, N) -- how often each example is drawn -- to
# the metric(s) of each of the B resamples, (B,) or (B, ...); all-ones counts give the
# full-set value.
Statistic = Callable[[np.ndarray], np.ndarray]


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


def bootstrap(stat: Statistic, num_examples: int, num_resamples: int = 1000,
              seed: int = 0) -> np.ndarray:
  """`stat` on `num_resamples` resamples (with replacement) of the examples, stacked
  along the first axis."""
  rng = np.random.default_rng(seed)
  values = []
  for start in range(0, num_resamples, _RESAMPLE_CHUNK):
    size = min(_RESAMPLE_CHUNK, num_resamples - start)
    draws = rng.integers(0, num_examples, size=(size, num_examples))
    offsets = (np.arange(size) * num_examples)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=size * num_examples)
    values.append(stat(counts.reshape(size, num_examples).astype(np.int32)))
  return np.concatenate(values)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval of bootstrap values; resamples where the metric is
  undefined (NaN) are left out, and (NaN, NaN) when all are."""
  values = values[~np.isnan(values)]
  if not values.size:
    return math.nan, math.nan
  low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)
