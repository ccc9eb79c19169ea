"""Calibration of predicted probabilities, and a temperature fitted on validation.

Binning (scikit-learn's `calibration_curve`): 15 bins, equal-width over [0, 1]
("uniform") or equal-mass between the probabilities' quantiles ("quantile"); bin i
holds (e_i, e_{i+1}], the first also e_0. ECE = sum_b (n_b / N) |y_b - p_b| over the
non-empty bins, y_b the fraction of positives and p_b the mean probability in bin b.
  multi-label, binary  per class, the class's probability against its label; the
                       headline ECE is the mean over classes (classwise ECE), the Brier
                       score the mean over classes of each class's binary Brier score.
  multi-class          the top label (Guo et al., ICML 2017): the highest probability
                       against whether its class is the label; Brier is the multi-class
                       score, the mean over examples of sum_k (p_k - y_k)^2.
Reliability diagrams are the per-bin means (None for an empty bin) and counts.

Temperature scaling divides the logits by one scalar T > 0 that minimises the
validation negative log-likelihood (sigmoid cross-entropy for multi-label and binary
sets, softmax cross-entropy for multi-class ones); scipy's bounded scalar search runs
over log T in [log 0.01, log 100]. Saved predictions hold probabilities (ten-crop
averages where test-time augmentation ran), so `calibrate` takes their logits: the
inverse sigmoid, or the log (softmax is unchanged by the missing constant).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special

NUM_BINS = 15
STRATEGIES = ("uniform", "quantile")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before a log
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def bin_edges(probs: np.ndarray, num_bins: int = NUM_BINS, strategy: str = "uniform"
              ) -> np.ndarray:
  """The num_bins + 1 edges of `strategy` for probabilities `probs`."""
  if strategy == "uniform":
    return np.linspace(0.0, 1.0, num_bins + 1)
  if strategy == "quantile":
    return np.percentile(probs, np.linspace(0, 100, num_bins + 1))
  raise ValueError(f"binning strategy {strategy!r} is not allowed; allowed: {STRATEGIES}")


def reliability(labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_BINS,
                strategy: str = "uniform") -> dict[str, np.ndarray]:
  """Per bin: `edges` (num_bins + 1), `count`, `mean_predicted` and `fraction_positive`
  (NaN where the bin is empty) of binary labels (N,) against probabilities (N,)."""
  labels = (np.asarray(labels) >= 0.5).astype(np.float64)
  probs = np.asarray(probs, np.float64)
  edges = bin_edges(probs, num_bins, strategy)
  bins = np.searchsorted(edges[1:-1], probs)
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_predicted = np.bincount(bins, probs, num_bins) / count
    fraction_positive = np.bincount(bins, labels, num_bins) / count
  return {"edges": edges, "count": count, "mean_predicted": mean_predicted,
          "fraction_positive": fraction_positive}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = NUM_BINS, strategy: str = "uniform") -> float:
  """ECE of binary labels (N,) against probabilities (N,); NaN with no examples."""
  bins = reliability(labels, probs, num_bins, strategy)
  filled = bins["count"] > 0
  if not filled.any():
    return math.nan
  gaps = np.abs(bins["fraction_positive"][filled] - bins["mean_predicted"][filled])
  return float(np.sum(bins["count"][filled] * gaps) / bins["count"].sum())


def _columns(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
             multi_class: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The binary (labels, probabilities) pairs ECE is computed on, by name."""
  if multi_class:
    top = probs.argmax(axis=1)
    pairs = {"top_label": (top == labels.argmax(axis=1), probs.max(axis=1))}
  else:
    pairs = {}
  return {**pairs, **{name: (labels[:, c], probs[:, c]) for c, name in enumerate(class_names)}}


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                        multi_class: bool, num_bins: int = NUM_BINS) -> dict[str, Any]:
  """ECE (both binnings), Brier score and reliability diagrams of (N, K) labels and
  probabilities. Returns {"ece_uniform", "ece_quantile", "brier", "ece_uniform/NAME",
  "ece_quantile/NAME", "brier/NAME", ..., "reliability": {STRATEGY: {NAME: {...}}}},
  NAME covering the classes and, for multi-class sets, "top_label"."""
  labels = (np.asarray(labels) >= 0.5).astype(np.float64)
  probs = np.asarray(probs, np.float64)
  if labels.shape != probs.shape or labels.ndim != 2 or labels.shape[1] != len(class_names):
    raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} must be "
                     f"(N, {len(class_names)})")
  result: dict[str, Any] = {}
  diagrams: dict[str, dict] = {s: {} for s in STRATEGIES}
  for name, (y, p) in _columns(labels, probs, class_names, multi_class).items():
    for strategy in STRATEGIES:
      result[f"ece_{strategy}/{name}"] = expected_calibration_error(y, p, num_bins, strategy)
      bins = reliability(y, p, num_bins, strategy)
      diagrams[strategy][name] = {k: [None if math.isnan(v) else float(v) for v in bins[k]]
                                  for k in ("edges", "mean_predicted", "fraction_positive")}
      diagrams[strategy][name]["count"] = bins["count"].tolist()
    if name != "top_label":
      result[f"brier/{name}"] = float(np.mean((p - y) ** 2))
  for strategy in STRATEGIES:
    result[f"ece_{strategy}"] = (result[f"ece_{strategy}/top_label"] if multi_class else
                                 float(np.mean([result[f"ece_{strategy}/{n}"]
                                                for n in class_names])))
  result["brier"] = float(np.mean(((probs - labels) ** 2).sum(axis=1)) if multi_class
                          else np.mean((probs - labels) ** 2))
  result["reliability"] = diagrams
  return result


def logits_from_probs(probs: np.ndarray, multi_class: bool) -> np.ndarray:
  """Logits that give back `probs` (clipped away from 0 and 1) through the sigmoid, or
  through the softmax up to a per-example constant."""
  p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
  return np.log(p) if multi_class else np.log(p) - np.log1p(-p)


def probs_from_logits(logits: np.ndarray, multi_class: bool) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  return scipy.special.softmax(logits, axis=1) if multi_class else scipy.special.expit(logits)


def negative_log_likelihood(labels: np.ndarray, logits: np.ndarray, multi_class: bool
                            ) -> float:
  """Mean softmax cross-entropy per example, or mean sigmoid cross-entropy per label."""
  labels = np.asarray(labels, np.float64)
  logits = np.asarray(logits, np.float64)
  if multi_class:
    return float(-np.mean((labels * scipy.special.log_softmax(logits, axis=1)).sum(axis=1)))
  return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def fit_temperature(labels: np.ndarray, logits: np.ndarray, multi_class: bool) -> float:
  """The T > 0 minimising the NLL of logits / T on (validation) labels."""
  labels = (np.asarray(labels) >= 0.5).astype(np.float64)
  logits = np.asarray(logits, np.float64)
  if not labels.size:
    raise ValueError("fitting a temperature needs at least one example")
  fit = scipy.optimize.minimize_scalar(
      lambda log_t: negative_log_likelihood(labels, logits / math.exp(log_t), multi_class),
      bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
  return float(math.exp(fit.x))


def calibrate(val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray,
              test_probs: np.ndarray, class_names: Sequence[str], multi_class: bool,
              num_bins: int = NUM_BINS) -> dict[str, Any]:
  """A temperature fitted on validation and the test calibration before and after it.

  Returns {"temperature", "num_bins", "val_nll_before", "val_nll_after", "before":
  calibration_metrics(...), "after": ...}; JSON-ready (undefined numbers None)."""
  val_labels = (np.asarray(val_labels) >= 0.5).astype(np.float64)
  val_logits = logits_from_probs(val_probs, multi_class)
  temperature = fit_temperature(val_labels, val_logits, multi_class)
  scaled = probs_from_logits(logits_from_probs(test_probs, multi_class) / temperature,
                             multi_class)

  def clean(record: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in record.items()}

  return {
      "temperature": temperature, "num_bins": num_bins,
      "val_nll_before": negative_log_likelihood(val_labels, val_logits, multi_class),
      "val_nll_after": negative_log_likelihood(val_labels, val_logits / temperature,
                                               multi_class),
      "before": clean(calibration_metrics(test_labels, test_probs, class_names, multi_class,
                                          num_bins)),
      "after": clean(calibration_metrics(test_labels, scaled, class_names, multi_class,
                                         num_bins)),
  }
