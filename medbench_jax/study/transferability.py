"""How well frozen features suit a target task, before fine-tuning: LogME, linear probe.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021): per target column y, the log evidence (marginal likelihood) of
the Bayesian linear model y = F w + e with prior w ~ N(0, I/alpha) and noise
e ~ N(0, I/beta), maximised over alpha and beta by MacKay's fixed-point updates and
divided by the number of examples. Features are used as given (no centring, no bias
column), as in the paper. Targets are the label columns of a multi-label task, or the
one-hot classes of a single-label one; the score is the mean over columns. A column
with a single label value has no defined score and is left out of the mean (logged).

The linear probe fits one logistic regression per label column (scikit-learn, on
standardised features) and scores the ROC AUC on held-out examples, averaged over
columns whose held-out labels take both values.

`rank_correlations` says how well such a score orders candidates as fine-tuning does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from absl import logging
import numpy as np
import pandas as pd
import scipy.stats
from sklearn import linear_model
from sklearn import metrics as sk_metrics
from sklearn import model_selection
from sklearn import pipeline
from sklearn import preprocessing

from medbench_jax import paths
from medbench_jax.study import runs

PROBE_SCORES = ("logme", "linear_probe")
_MAX_ITERATIONS = 1000
_TOLERANCE = 1e-10  # relative change of alpha/beta that ends the fixed-point iteration
# alpha beyond this times beta * the largest eigenvalue of F^T F: the prior has
# shrunk every weight to nothing, and the evidence is at its alpha -> inf limit.
_NEGLIGIBLE = 1e12


@dataclasses.dataclass(frozen=True)
class EvidenceFit:
  alpha: float  # prior precision of the weights
  beta: float  # noise precision
  log_evidence: float  # log p(y | F, alpha, beta), not divided by N
  iterations: int


class _Spectrum:
  """F's singular values, computed once and shared by all target columns."""

  def __init__(self, features: np.ndarray):
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {features.shape}")
    self.num_examples, self.dim = features.shape
    self.left, singular, _ = np.linalg.svd(features, full_matrices=False)
    self.squared = singular**2

  def evidence(self, projection: np.ndarray, outside_sq: float, alpha: float,
               beta: float) -> tuple[float, float, float, float]:
    """log p(y | alpha, beta), ||m||^2, ||y - F m||^2 and gamma at the posterior mean m.

    `projection` is U^T y for F = U S V^T; `outside_sq` the squared norm of the part
    of y outside F's column space.
    """
    shrink = beta * self.squared / (alpha + beta * self.squared)
    # In F's singular basis m_i = beta s_i p_i / (alpha + beta s_i^2) and F m has
    # coordinates shrink_i p_i.
    mean_sq = float(np.sum(shrink**2 * projection**2 / np.where(self.squared > 0,
                                                                self.squared, 1)))
    residual_sq = float(np.sum(((1 - shrink) * projection)**2)) + outside_sq
    log_det = (np.sum(np.log(alpha + beta * self.squared)) +
               (self.dim - self.squared.size) * math.log(alpha))
    n, d = self.num_examples, self.dim
    log_evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) -
                    n / 2 * math.log(2 * math.pi) - beta / 2 * residual_sq -
                    alpha / 2 * mean_sq - log_det / 2)
    return float(log_evidence), mean_sq, residual_sq, float(shrink.sum())

  def fit(self, target: np.ndarray) -> EvidenceFit:
    projection = self.left.T @ target
    outside_sq = max(float(target @ target - projection @ projection), 0.0)
    alpha, beta = 1.0, 1.0
    for iteration in range(1, _MAX_ITERATIONS + 1):
      _, mean_sq, residual_sq, gamma = self.evidence(projection, outside_sq, alpha, beta)
      if mean_sq == 0 or alpha > _NEGLIGIBLE * beta * self.squared.max():
        # The evidence grows as alpha -> inf (features explain nothing): its limit is
        # the noise-only model y ~ N(0, I/beta), best at beta = n / ||y||^2.
        n = self.num_examples
        beta = n / float(target @ target)
        log_evidence = n / 2 * (math.log(beta) - math.log(2 * math.pi) - 1)
        return EvidenceFit(math.inf, beta, log_evidence, iteration)
      new_alpha = gamma / mean_sq
      new_beta = (self.num_examples - gamma) / residual_sq
      converged = abs(new_alpha / new_beta - alpha / beta) <= _TOLERANCE * (alpha / beta)
      alpha, beta = new_alpha, new_beta
      if converged:
        break
    log_evidence = self.evidence(projection, outside_sq, alpha, beta)[0]
    return EvidenceFit(alpha, beta, log_evidence, iteration)


def label_columns(labels: np.ndarray) -> np.ndarray:
  """(N, K) 0/1 targets: multi-label columns as given, class ids (N,) one-hot."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    classes = np.unique(labels)
    return (labels[:, None] == classes[None, :]).astype(np.float64)
  if labels.ndim != 2:
    raise ValueError(f"labels must be (N,) class ids or (N, K) 0/1, got {labels.shape}")
  return (labels >= 0.5).astype(np.float64)


def _defined_columns(targets: np.ndarray) -> np.ndarray:
  defined = (targets.min(axis=0) != targets.max(axis=0))
  if not defined.all():
    logging.warning("Label column(s) %s take a single value; left out of the score.",
                    np.flatnonzero(~defined).tolist())
  return defined


def fit_evidence(features: np.ndarray, target: np.ndarray) -> EvidenceFit:
  """The evidence-maximising alpha and beta for one target column, and the evidence."""
  return _Spectrum(features).fit(np.asarray(target, np.float64))


def logme(features: np.ndarray, labels: np.ndarray) -> float:
  """LogME score of `features` (N, D) for `labels` (see the module docstring)."""
  targets = label_columns(labels)
  if len(targets) != len(features):
    raise ValueError(f"{len(features)} feature rows but {len(targets)} labels")
  spectrum = _Spectrum(features)
  scores = [spectrum.fit(targets[:, k]).log_evidence / spectrum.num_examples
            for k in np.flatnonzero(_defined_columns(targets))]
  return float(np.mean(scores)) if scores else math.nan


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 regularization: float = 1.0) -> float:
  """Mean held-out ROC AUC of per-column logistic regressions (inverse strength C)."""
  train_targets, test_targets = label_columns(train_labels), label_columns(test_labels)
  if train_targets.shape[1] != test_targets.shape[1]:
    raise ValueError(f"{train_targets.shape[1]} train label columns but "
                     f"{test_targets.shape[1]} test ones")
  defined = _defined_columns(train_targets) & _defined_columns(test_targets)
  aucs = []
  for k in np.flatnonzero(defined):
    model = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=regularization, max_iter=1000))
    model.fit(train_features, train_targets[:, k])
    aucs.append(sk_metrics.roc_auc_score(test_targets[:, k],
                                         model.decision_function(test_features)))
  return float(np.mean(aucs)) if aucs else math.nan


def linear_probe_holdout(features: np.ndarray, labels: np.ndarray, holdout: float = 0.25,
                         seed: int = 0, regularization: float = 1.0,
                         groups: np.ndarray | None = None) -> float:
  """linear_probe on a seeded random split of one labelled set.

  With `groups` (one id per row, e.g. the image a pixel comes from), whole groups go to
  one side (scikit-learn's GroupShuffleSplit), `holdout` being their share of groups.
  """
  if groups is None:
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        features, labels, test_size=holdout, random_state=seed)
    return linear_probe(train_x, train_y, test_x, test_y, regularization)
  features, labels = np.asarray(features), np.asarray(labels)
  if len(groups) != len(features):
    raise ValueError(f"{len(features)} feature rows but {len(groups)} group ids")
  splitter = model_selection.GroupShuffleSplit(n_splits=1, test_size=holdout,
                                               random_state=seed)
  train, test = next(splitter.split(features, labels, groups))
  return linear_probe(features[train], labels[train], features[test], labels[test],
                      regularization)


def rank_correlations(estimates: np.ndarray, fine_tuned: np.ndarray) -> dict[str, float]:
  """Spearman's rho (and its p-value) and weighted Kendall's tau of two scorings.

  The weighted tau (scipy, hyperbolic weights by rank) counts disagreements among the
  best candidates more than among the worst: what matters when picking a model.
  """
  spearman = scipy.stats.spearmanr(estimates, fine_tuned)
  return {"spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue),
          "weighted_tau": float(scipy.stats.weightedtau(estimates, fine_tuned).statistic)}


def read_probe_file(path: str | pathlib.Path) -> pd.DataFrame:
  """The JSON lines of a probe file, one candidate per line (null scores are NaN).

  Each line: {"task", "dataset", "model", "init", "label_fraction", "logme",
  "linear_probe"}. Errors name the file, line and key; a candidate listed twice is
  an error.
  """
  path = paths.as_path(path)  # a local file or gs://...
  rows, lines_of = [], {}
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
    missing = [k for k in (*runs.KEY_COLUMNS, *PROBE_SCORES) if k not in record]
    if missing:
      raise ValueError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
    row = {k: record[k] for k in runs.KEY_COLUMNS}
    if not isinstance(row["label_fraction"], (int, float)):
      raise ValueError(f"{path}:{number}: 'label_fraction' must be a number, got "
                       f"{row['label_fraction']!r}")
    for score in PROBE_SCORES:
      value = record[score]
      if value is not None and not isinstance(value, (int, float)):
        raise ValueError(f"{path}:{number}: '{score}' must be a number or null, got "
                         f"{value!r}")
      row[score] = math.nan if value is None else float(value)
    key = tuple(row[k] for k in runs.KEY_COLUMNS)
    if key in lines_of:
      raise ValueError(f"{path}:{number}: {runs.run_label(key)} already on line "
                       f"{lines_of[key]}")
    lines_of[key] = number
    rows.append(row)
  return pd.DataFrame(rows, columns=[*runs.KEY_COLUMNS, *PROBE_SCORES])
