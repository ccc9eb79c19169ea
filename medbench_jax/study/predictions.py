"""Statistics on saved test predictions: bootstrap intervals and DeLong's test.

Each trial's `trial_K/test_predictions.npz` (runs.py) holds, for classification,
`labels` and `probs` (N, K) and, for segmentation, per image and class the pixel counts
`intersection`, `prediction_sum` and `target_sum` (N, K). From these:
  mean_auc   ROC AUC per class, averaged over the classes with both label values.
  dice, iou  pooled over all images and classes, 2ΣI/(ΣP+ΣT) and ΣI/(ΣP+ΣT-ΣI) (1 where
             both are empty), as the trainer scores them (tasks/segmentation.py).
  mean_dice, mean_iou  per image, pooled over its classes (1 where both are empty),
             averaged over images.
Each trial's value recomputed here is checked against its results.json; a difference
is listed as a problem.

Bootstrap intervals are per trial: the trial's test examples (images) are resampled
with replacement, the metric computed on each resample exactly as on the full set,
and the 2.5th and 97.5th percentiles taken. The generator is seeded with the same seed
for every trial, so runs on the same test set see the same resamples.

DeLong's test compares two runs' AUCs on the same test examples (correlated ROC
curves), per class, with the fast algorithm of Sun & Xu (IEEE Signal Processing
Letters 21(11), 2014): midranks instead of the O(mn) placement values.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

from etils import epath
import numpy as np
import pandas as pd
import scipy.stats

from medbench_jax import paths
from medbench_jax.study import runs
from medbench_jax.study import stats
from medbench_jax.tasks import metrics

_ARRAYS = {"classification": ("labels", "probs"),
           "segmentation": ("intersection", "prediction_sum", "target_sum")}
# Mismatch between a metric recomputed here and results.json's that is worth a line.
_TOLERANCE = 1e-4

Statistic = metrics.Statistic


def predictions_path(workdir: str | os.PathLike, trial: int) -> epath.Path:
  """Trial `trial`'s predictions in `workdir` (a local folder or gs://...)."""
  return paths.as_path(workdir) / f"trial_{trial}" / "test_predictions.npz"


def load(path: epath.Path, task: str) -> dict[str, np.ndarray]:
  """The arrays of one test_predictions.npz, checked for the keys and shapes of `task`."""
  try:
    # Read whole: a zip archive is read by seeking, which a bucket object streams poorly.
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read ({e})") from e
  expected = _ARRAYS[task] + ("class_names",)
  missing = [k for k in expected if k not in arrays]
  if missing:
    raise ValueError(f"{path}: missing array(s) {', '.join(missing)} for a {task} run")
  shape = arrays[_ARRAYS[task][0]].shape
  for name in _ARRAYS[task]:
    if arrays[name].ndim != 2 or arrays[name].shape != shape:
      raise ValueError(f"{path}: {name} has shape {arrays[name].shape}; expected (N, K) "
                       f"like {_ARRAYS[task][0]} {shape}")
  if len(arrays["class_names"]) != shape[1]:
    raise ValueError(f"{path}: {len(arrays['class_names'])} class names for {shape[1]} "
                     "columns")
  return arrays


def weighted_auc(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """ROC AUC of each resample: row b of `counts` (B, N) draws example i counts[b, i] times.

  Equals the AUC of the resampled examples, ties counted half as in the Mann-Whitney
  statistic; NaN where a resample lacks positives or negatives. Integer arithmetic
  (int32 counts, int64 sums) keeps it exact.
  """
  counts = np.asarray(counts)
  if not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f"counts must be integers (times each example is drawn), got "
                     f"{counts.dtype}")
  counts = counts.astype(np.int32, copy=False)
  labels = np.asarray(labels) >= 0.5
  scores = np.asarray(scores)
  positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
  negatives = negatives[np.argsort(scores[negatives], kind="stable")]
  negative_scores = scores[negatives]
  # Per positive, the drawn negatives below its score and those up to it: their mean
  # counts ties half.
  below = np.searchsorted(negative_scores, scores[positives], side="left")
  up_to = np.searchsorted(negative_scores, scores[positives], side="right")
  cumulative = np.zeros((len(counts), len(negatives) + 1), np.int32)
  np.cumsum(np.take(counts, negatives, axis=1), axis=1, out=cumulative[:, 1:])
  positive_counts = np.take(counts, positives, axis=1)
  twice_wins = (positive_counts * (np.take(cumulative, below, axis=1) +
                                   np.take(cumulative, up_to, axis=1))).sum(
                                       axis=1, dtype=np.int64)
  pairs = positive_counts.sum(axis=1, dtype=np.int64) * cumulative[:, -1]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, twice_wins / (2 * pairs), np.nan)


def _mean_over_classes(per_class: np.ndarray) -> np.ndarray:
  defined = ~np.isnan(per_class)
  total = np.where(defined, per_class, 0).sum(axis=1)
  count = defined.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.nan)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  # An empty prediction of an empty target is a perfect one.
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 1.0)


def statistic(task: str, metric: str, arrays: dict[str, np.ndarray]) -> Statistic | None:
  """The metric of `task` as a function of resampling counts; None if not supported."""
  if task == "classification" and metric == "mean_auc":
    labels, probs = arrays["labels"], arrays["probs"]
    return lambda w: _mean_over_classes(np.stack(
        [weighted_auc(labels[:, c], probs[:, c], w) for c in range(labels.shape[1])], axis=1))
  if task != "segmentation" or metric not in ("dice", "iou", "mean_dice", "mean_iou"):
    return None
  inter, union_sum = (arrays[k].astype(np.float64).sum(axis=1, keepdims=True)
                      for k in ("intersection", "prediction_sum"))
  union_sum = union_sum + arrays["target_sum"].sum(axis=1, keepdims=True)
  is_dice = metric.endswith("dice")
  if metric.startswith("mean_"):
    per_image = _ratio(2 * inter, union_sum) if is_dice else _ratio(inter, union_sum - inter)
    return lambda w: (w @ per_image / w.sum(axis=1, keepdims=True)).mean(axis=1)

  def pooled(w: np.ndarray) -> np.ndarray:
    i, u = w @ inter, w @ union_sum
    return (_ratio(2 * i, u) if is_dice else _ratio(i, u - i)).mean(axis=1)
  return pooled


# The resampling is shared with the operating points a trial records (tasks/metrics.py).
bootstrap = metrics.bootstrap
percentile_interval = metrics.percentile_interval


def _full_set_value(stat: Statistic, num_examples: int) -> float:
  return float(stat(np.ones((1, num_examples), np.int32))[0])


def bootstrap_table(trials: pd.DataFrame, root: epath.Path, num_resamples: int = 1000,
                    seed: int = 0) -> tuple[pd.DataFrame, list[runs.Problem]]:
  """Per trial with saved predictions: the metric, its 95% interval and the resamples.

  Returns the table (columns of runs.KEY_COLUMNS, metric, seed, value, ci_low,
  ci_high, resamples) and the problems: missing or unreadable prediction files,
  unsupported metrics, and values that disagree with results.json.
  """
  rows, problems = [], []
  for row in trials.itertuples(index=False):
    path = predictions_path(row.workdir, row.trial)

    def problem(kind: str, detail: str, row=row, path=path):
      problems.append(runs.Problem(kind, row.run, runs.display_path(root, path),
                                   f"trial {row.trial}: {detail}"))

    if not path.exists():
      problem("predictions_missing", "no test_predictions.npz; no confidence interval")
      continue
    try:
      arrays = load(path, row.task)
    except ValueError as e:
      problem("invalid", str(e))
      continue
    stat = statistic(row.task, row.metric, arrays)
    if stat is None:
      problem("no_interval", f"no bootstrap for metric {row.metric} of a {row.task} run")
      continue
    num_examples = len(arrays[_ARRAYS[row.task][0]])
    value = _full_set_value(stat, num_examples)
    if not math.isclose(value, row.value, abs_tol=_TOLERANCE) and not (
        math.isnan(value) and math.isnan(row.value)):
      problem("predictions_mismatch", f"{row.metric} from the predictions is {value:.6f}, "
              f"results.json says {row.value:.6f}; the interval is around the former")
    low, high = percentile_interval(bootstrap(stat, num_examples, num_resamples, seed))
    rows.append({**{c: getattr(row, c) for c in runs.KEY_COLUMNS}, "metric": row.metric,
                 "seed": row.seed, "value": value, "ci_low": low, "ci_high": high,
                 "resamples": num_resamples, "examples": num_examples})
  return pd.DataFrame(rows, columns=[*runs.KEY_COLUMNS, "metric", "seed", "value", "ci_low",
                                     "ci_high", "resamples", "examples"]), problems


@dataclasses.dataclass(frozen=True)
class DeLongResult:
  auc_a: float
  auc_b: float
  z: float
  p_value: float  # two-sided
  variance: float  # of auc_a - auc_b


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """AUCs of the rows of `scores` (k, N) and their DeLong covariance matrix (k, k)."""
  labels = np.asarray(labels) >= 0.5
  scores = np.atleast_2d(np.asarray(scores, np.float64))
  positives, negatives = scores[:, labels], scores[:, ~labels]
  m, n = positives.shape[1], negatives.shape[1]
  if not m or not n:
    raise ValueError(f"AUC needs positive and negative examples; got {m} and {n}")
  rank_pos = scipy.stats.rankdata(positives, axis=1)
  rank_neg = scipy.stats.rankdata(negatives, axis=1)
  rank_all = scipy.stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
  aucs = rank_all[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
  # Placement values: per positive, the fraction of negatives it outranks; per
  # negative, the fraction of positives it does not outrank (ties count half).
  positive_placements = (rank_all[:, :m] - rank_pos) / n
  negative_placements = 1.0 - (rank_all[:, m:] - rank_neg) / m
  covariance = (np.atleast_2d(np.cov(positive_placements)) / m +
                np.atleast_2d(np.cov(negative_placements)) / n)
  return aucs, covariance


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
  """DeLong's two-sided test of AUC(a) = AUC(b) on the same examples."""
  aucs, cov = delong_covariance(labels, np.stack([scores_a, scores_b]))
  difference = aucs[0] - aucs[1]
  variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  if math.isnan(variance):  # a single positive or negative example: no covariance
    z = math.nan
  elif variance > 0:
    z = difference / math.sqrt(variance)
  else:  # Identical rankings: no difference at all, or no variance to weigh one by.
    z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
  return DeLongResult(float(aucs[0]), float(aucs[1]), float(z),
                      float(2 * scipy.stats.norm.sf(abs(z))), variance)


def delong_table(trials: pd.DataFrame, baseline: tuple[str, str],
                 root: epath.Path) -> tuple[pd.DataFrame, list[runs.Problem]]:
  """DeLong's test per class of every classification trial against the baseline's
  trial with the same seed (same task, dataset and label fraction).

  p_holm is Holm-adjusted over all tests of the same task, data set and label
  fraction (one table of the report). Pairs whose test labels differ are listed as
  problems, never compared.
  """
  rows, problems, cache = [], [], {}

  def arrays_of(row) -> dict[str, np.ndarray] | None:
    path = predictions_path(row.workdir, row.trial)
    if path not in cache:
      cache[path] = load(path, "classification") if path.exists() else None
    return cache[path]

  classification = trials[trials["task"] == "classification"]
  is_baseline = (classification["model"] == baseline[0]) & (
      classification["init"] == baseline[1])
  baseline_trials = {(r.dataset, r.label_fraction, r.seed): r
                     for r in classification[is_baseline].itertuples(index=False)}
  for row in classification[~is_baseline].itertuples(index=False):
    base = baseline_trials.get((row.dataset, row.label_fraction, row.seed))
    if base is None:
      continue
    try:
      own, other = arrays_of(row), arrays_of(base)
    except ValueError:
      continue  # bootstrap_table lists unreadable files
    if own is None or other is None:
      continue  # and missing ones
    if own["labels"].shape != other["labels"].shape or not np.array_equal(
        own["labels"] >= 0.5, other["labels"] >= 0.5):
      problems.append(runs.Problem(
          "different_test_sets", row.run, runs.display_path(root, paths.as_path(row.workdir)),
          f"seed {row.seed}: test labels differ from the baseline's; no DeLong test"))
      continue
    for c, name in enumerate(own["class_names"]):
      labels = own["labels"][:, c] >= 0.5
      if labels.all() or not labels.any():
        continue  # AUC undefined for this class on this test set
      result = delong_test(labels, own["probs"][:, c], other["probs"][:, c])
      rows.append({**{k: getattr(row, k) for k in runs.KEY_COLUMNS}, "seed": row.seed,
                   "class": str(name), "auc": result.auc_a, "baseline_auc": result.auc_b,
                   "z": result.z, "p_value": result.p_value})
  table = pd.DataFrame(rows, columns=[*runs.KEY_COLUMNS, "seed", "class", "auc",
                                      "baseline_auc", "z", "p_value"])
  table["p_holm"] = math.nan
  for _, setting in table.groupby(stats.SETTING_COLUMNS):
    table.loc[setting.index, "p_holm"] = stats.correct(setting["p_value"].to_numpy())[0]
  return table, problems
