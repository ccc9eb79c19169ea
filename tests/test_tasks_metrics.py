"""tasks/metrics.py: AUC and accuracy against scikit-learn."""

import math

from absl import logging
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medbench_jax.tasks import metrics

NAMES = ("A", "B", "C")


def _data(n=500, seed=0):
  rng = np.random.default_rng(seed)
  labels = (rng.uniform(size=(n, 3)) < [0.1, 0.3, 0.5]).astype(np.float32)
  scores = np.clip(labels * 0.3 + rng.normal(0.4, 0.25, size=(n, 3)), 0, 1)
  return labels, scores


def test_auc_equals_sklearn():
  labels, scores = _data()
  result = metrics.multilabel_auc(labels, scores, NAMES)
  expected = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(3)]
  for c, name in enumerate(NAMES):
    assert abs(result[f"auc/{name}"] - expected[c]) <= 1e-6
  assert abs(result["mean_auc"] - np.mean(expected)) <= 1e-6
  assert result["mean_auc"] > 0.6  # the synthetic scores do carry signal


def test_ties_and_float32_scores_equal_sklearn():
  labels, scores = _data(seed=3)
  scores = np.round(scores, 1).astype(np.float32)  # many ties
  result = metrics.multilabel_auc(labels, scores, NAMES)
  for c, name in enumerate(NAMES):
    assert abs(result[f"auc/{name}"] - roc_auc_score(labels[:, c], scores[:, c])) <= 1e-6


def test_single_valued_class_is_undefined_not_fake(monkeypatch):
  labels, scores = _data()
  labels[:, 1] = 0.0  # class B has no positive example
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  result = metrics.multilabel_auc(labels, scores, NAMES)
  assert math.isnan(result["auc/B"])
  expected = np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in (0, 2)])
  assert abs(result["mean_auc"] - expected) <= 1e-6
  assert any("B" in w and "undefined" in w for w in warnings)


def test_all_classes_undefined_gives_nan_mean():
  result = metrics.multilabel_auc(np.ones((4, 3)), np.random.rand(4, 3), NAMES)
  assert math.isnan(result["mean_auc"])


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="must be equal"):
    metrics.multilabel_auc(np.zeros((4, 3)), np.zeros((4, 2)), NAMES)


def test_mean_over_a_subset_of_classes_and_unknown_names():
  labels, scores = _data()
  result = metrics.multilabel_auc(labels, scores, NAMES, mean_over=("A", "C"))
  expected = np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in (0, 2)])
  assert abs(result["mean_auc"] - expected) <= 1e-9 and "auc/B" in result
  with pytest.raises(ValueError, match="'D'"):
    metrics.multilabel_auc(labels, scores, NAMES, mean_over=("A", "D"))
