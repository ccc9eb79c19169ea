"""Operating points: per-class decision thresholds chosen on validation, scored on test.

A threshold t calls an example positive when its probability is >= t (scikit-learn's
convention in `roc_curve`). Candidate thresholds are the distinct validation scores,
and, for a target specificity only, the next float above the highest score (nothing
called positive). Rules (`method`), each with its tie rule:
  youden       maximise Youden's J = sensitivity + specificity - 1; ties: the highest
               threshold (fewest positive calls), as `argmax` over `roc_curve`'s
               decreasing thresholds picks.
  f1           maximise F1 = 2TP / (2TP + FP + FN); ties: the highest threshold.
  sensitivity  the highest threshold whose sensitivity is >= `target` (the most
               specific one that meets it).
  specificity  the lowest threshold whose specificity is >= `target` (the most
               sensitive one that meets it).
J and F1 are compared exactly (integer counts), so ties are real ties. A class whose
validation labels take one value has no threshold (None): sensitivity and
specificity need both label values there.

On test, at the threshold: sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV
TP/(TP+FP), NPV TN/(TN+FN), F1 2TP/(2TP+FP+FN), balanced accuracy (sensitivity +
specificity)/2, and AUPRC, the average precision sum_n (R_n - R_{n-1}) P_n over the
distinct scores (scikit-learn's `average_precision_score`; threshold-free). A metric
whose denominator is zero is undefined: NaN in arrays, None in the record (PPV with
no positive calls, NPV with no negative calls, sensitivity and AUPRC without
positives, specificity without negatives, balanced accuracy when either half is
undefined); with no threshold, every thresholded metric is undefined. Each comes
with a percentile bootstrap interval over resampled test examples (the same
resamples for every class and metric, tasks/metrics.py); resamples where a metric is
undefined are left out of its interval.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import numpy as np

from medbench_jax.tasks import metrics

METHODS = ("youden", "f1", "sensitivity", "specificity")
METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "auprc")


def check_rule(method: str, target: float | None) -> None:
  """Raises a ValueError unless (method, target) is a rule of this module."""
  if method not in METHODS:
    raise ValueError(f"operating point method {method!r} is not allowed; allowed: {METHODS}")
  if method in ("youden", "f1"):
    if target is not None:
      raise ValueError(f"method={method!r} takes no target (got {target})")
  elif target is None or not 0 < target <= 1:
    raise ValueError(f"method={method!r} needs a target in (0, 1], got {target}")


def _candidates(positive: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distinct scores, highest first, and the positives and negatives at or above each."""
  order = np.argsort(-scores, kind="stable")
  ranked, labels = scores[order], positive[order]
  last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
  return ranked[last], np.cumsum(labels)[last], np.cumsum(~labels)[last]


def choose_threshold(labels: np.ndarray, scores: np.ndarray, method: str = "youden",
                     target: float | None = None) -> float:
  """The threshold of one class chosen on validation (labels and scores (N,));
  NaN where the labels take one value."""
  check_rule(method, target)
  positive = np.asarray(labels) >= 0.5
  scores = np.asarray(scores, np.float64)
  num_pos = int(positive.sum())
  num_neg = len(positive) - num_pos
  if not num_pos or not num_neg:
    return math.nan
  thresholds, tp, fp = _candidates(positive, scores)
  if method == "youden":
    # J * P * N in integers: exact ties; argmax takes the first, the highest threshold.
    return float(thresholds[np.argmax(tp * num_neg - fp * num_pos)])
  if method == "f1":
    # Correctly rounded divisions of exact integers: equal F1s are equal floats.
    return float(thresholds[np.argmax(2 * tp / (tp + fp + num_pos))])
  if method == "sensitivity":
    return float(thresholds[np.flatnonzero(tp / num_pos >= target)[0]])
  # Specificity falls as the threshold does; nothing called positive has specificity 1.
  thresholds = np.r_[np.nextafter(thresholds[0], np.inf), thresholds]
  meets = np.flatnonzero((num_neg - np.r_[0, fp]) / num_neg >= target)
  return float(thresholds[meets[-1]])


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                      method: str = "youden", target: float | None = None
                      ) -> dict[str, float]:
  """Per-class thresholds (labels and scores (N, K)); NaN where undefined."""
  labels, scores = _check_shapes(labels, scores, class_names)
  return {name: choose_threshold(labels[:, c], scores[:, c], method, target)
          for c, name in enumerate(class_names)}


def _check_shapes(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  if labels.shape != scores.shape or labels.ndim != 2:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal (N, K)")
  if labels.shape[1] != len(class_names):
    raise ValueError(f"{labels.shape[1]} label columns but {len(class_names)} class names")
  return labels, scores


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1),
                    np.nan)


class _Ranked:
  """One class's labels and scores sorted once, scored on any resampling counts."""

  def __init__(self, labels: np.ndarray, scores: np.ndarray, threshold: float = math.nan):
    scores = np.asarray(scores, np.float64)
    self.order = np.argsort(-scores, kind="stable")
    ranked = scores[self.order]
    self.positive = (np.asarray(labels) >= 0.5)[self.order]
    # The last rank of each distinct score: where a threshold can fall.
    self.last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    # Scores >= threshold are the first `called` ranks.
    self.called = None if math.isnan(threshold) else int(np.sum(ranked >= threshold))

  def cumulative(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drawn examples and drawn positives up to each rank, (B, N + 1) with a zero first."""
    weights = np.asarray(counts, np.int32)[:, self.order]
    drawn = np.zeros((len(weights), weights.shape[1] + 1), np.int32)
    positives = np.zeros_like(drawn)
    np.cumsum(weights, axis=1, out=drawn[:, 1:])
    np.cumsum(weights * self.positive, axis=1, out=positives[:, 1:])
    return drawn, positives

  def average_precision(self, drawn: np.ndarray, positives: np.ndarray) -> np.ndarray:
    tp = positives[:, self.last + 1].astype(np.float64)
    calls = drawn[:, self.last + 1]
    gained = np.diff(tp, axis=1, prepend=0)
    # Where no positive is gained the precision may be 0/0; it is weighted by zero.
    precision = np.where(gained > 0, tp / np.maximum(calls, 1), 0.0)
    return _divide((gained * precision).sum(axis=1), tp[:, -1])

  def metrics(self, counts: np.ndarray) -> dict[str, np.ndarray]:
    drawn, positives = self.cumulative(counts)
    result = {"auprc": self.average_precision(drawn, positives)}
    if self.called is None:
      nan = np.full(len(drawn), np.nan)
      return {**result, **{k: nan for k in METRICS if k != "auprc"},
              **{k: nan for k in ("tp", "fp", "tn", "fn")}}
    tp = positives[:, self.called].astype(np.float64)
    fp = drawn[:, self.called] - tp
    fn = positives[:, -1] - tp
    tn = drawn[:, -1] - drawn[:, self.called] - fn
    sensitivity, specificity = _divide(tp, tp + fn), _divide(tn, tn + fp)
    return {**result, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": sensitivity, "specificity": specificity,
            "ppv": _divide(tp, tp + fp), "npv": _divide(tn, tn + fn),
            "f1": _divide(2 * tp, 2 * tp + fp + fn),
            "balanced_accuracy": (sensitivity + specificity) / 2}


def _full_set(num_examples: int) -> np.ndarray:
  return np.ones((1, num_examples), np.int32)


def average_precision(labels: np.ndarray, scores: np.ndarray,
                      counts: np.ndarray | None = None) -> np.ndarray:
  """Average precision of each resample: row b of `counts` (B, N) draws example i
  counts[b, i] times (default: the full set once); NaN where a resample has no
  positives."""
  ranked = _Ranked(labels, scores)
  counts = _full_set(len(ranked.order)) if counts is None else counts
  return ranked.average_precision(*ranked.cumulative(counts))


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float,
                      counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """METRICS of one class at `threshold` for each resample of `counts` (B, N) (default:
  the full set once, B = 1), with the confusion counts tp, fp, tn, fn; NaN where
  undefined (see the module docstring)."""
  ranked = _Ranked(labels, scores, threshold)
  return ranked.metrics(_full_set(len(ranked.order)) if counts is None else counts)


def _number(x: float) -> float | None:
  return None if math.isnan(x) else float(x)


def operating_points(val_labels: np.ndarray, val_scores: np.ndarray,
                     test_labels: np.ndarray, test_scores: np.ndarray,
                     class_names: Sequence[str], method: str = "youden",
                     target: float | None = None, num_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
  """Thresholds chosen on validation and the test metrics at them, JSON-ready.

  Returns {"method", "target", "level", "resamples", "test_examples", "classes":
  {NAME: {"threshold", "tp", "fp", "tn", "fn", METRIC: {"value", "ci_low",
  "ci_high"}, ...}}}; undefined numbers are None. num_resamples=0 skips the
  intervals (None).
  """
  thresholds = choose_thresholds(val_labels, val_scores, class_names, method, target)
  test_labels, test_scores = _check_shapes(test_labels, test_scores, class_names)
  columns = [_Ranked(test_labels[:, c], test_scores[:, c], thresholds[name])
             for c, name in enumerate(class_names)]

  def stat(counts: np.ndarray) -> np.ndarray:  # (B, K, len(METRICS))
    return np.stack([np.stack([m[k] for k in METRICS], axis=-1)
                     for m in (column.metrics(counts) for column in columns)], axis=1)

  full = stat(_full_set(len(test_labels)))[0]
  resampled = (metrics.bootstrap(stat, len(test_labels), num_resamples, seed)
               if num_resamples and len(test_labels) else None)
  classes = {}
  for c, (name, column) in enumerate(zip(class_names, columns)):
    confusion = column.metrics(_full_set(len(test_labels)))
    record = {"threshold": _number(thresholds[name]),
              **{k: None if math.isnan(v := confusion[k][0]) else int(v)
                 for k in ("tp", "fp", "tn", "fn")}}
    for m, key in enumerate(METRICS):
      low, high = (metrics.percentile_interval(resampled[:, c, m], level)
                   if resampled is not None else (math.nan, math.nan))
      record[key] = {"value": _number(full[c, m]), "ci_low": _number(low),
                     "ci_high": _number(high)}
    classes[name] = record
  return {"method": method, "target": target, "level": level, "resamples": num_resamples,
          "test_examples": len(test_labels), "classes": classes}
