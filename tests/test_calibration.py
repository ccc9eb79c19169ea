"""tasks/calibration.py: ECE, Brier and reliability against scikit-learn and numpy;
the fitted temperature."""

import json
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss
from sklearn.metrics import log_loss

from medbench_jax.tasks import calibration

NAMES = ("A", "B", "C")


def _numpy_ece(y, p, edges):
  """ECE written out: bins (e_i, e_i+1], the first closed, weighted by their size."""
  y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
  total = 0.0
  for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
    inside = (p > low) & (p <= high) if i else (p >= low) & (p <= high)
    if inside.any():
      total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
  return total


def _binary(n=3000, seed=0, sharpen=2.5):
  """Labels drawn from true probabilities; predictions overconfident by `sharpen`."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1.5, size=(n, 3))
  labels = (rng.uniform(size=logits.shape) < 1 / (1 + np.exp(-logits))).astype(np.float32)
  return labels, 1 / (1 + np.exp(-sharpen * logits)), sharpen * logits


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_and_ece_equal_calibration_curve_and_numpy(strategy):
  labels, probs, _ = _binary()
  for c in range(3):
    y, p = labels[:, c], probs[:, c]
    bins = calibration.reliability(y, p, 15, strategy)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy=strategy)
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["fraction_positive"][filled], prob_true, atol=1e-12)
    np.testing.assert_allclose(bins["mean_predicted"][filled], prob_pred, atol=1e-12)
    assert bins["count"].sum() == len(y)
    ece = calibration.expected_calibration_error(y, p, 15, strategy)
    assert ece == pytest.approx(_numpy_ece(y, p, bins["edges"]), abs=1e-12)
    assert ece > 0.02  # overconfident predictions are visibly miscalibrated


def test_equal_mass_bins_hold_equal_counts():
  labels, probs, _ = _binary(n=1500)
  bins = calibration.reliability(labels[:, 0], probs[:, 0], 15, "quantile")
  assert set(bins["count"]) == {100}


def test_probabilities_on_bin_edges_fall_as_calibration_curve_puts_them():
  p = np.array([0.0, 1 / 15, 2 / 15, 0.5, 1.0, 14 / 15])
  y = np.array([0, 1, 0, 1, 1, 0])
  bins = calibration.reliability(y, p)
  prob_true, prob_pred = calibration_curve(y, p, n_bins=15)
  filled = bins["count"] > 0
  np.testing.assert_allclose(bins["mean_predicted"][filled], prob_pred)
  np.testing.assert_allclose(bins["fraction_positive"][filled], prob_true)


def test_multilabel_metrics_brier_and_mean_ece():
  labels, probs, _ = _binary(seed=1)
  result = calibration.calibration_metrics(labels, probs, NAMES, multi_class=False)
  for c, name in enumerate(NAMES):
    assert result[f"brier/{name}"] == pytest.approx(brier_score_loss(labels[:, c],
                                                                     probs[:, c]))
    assert result[f"ece_uniform/{name}"] == pytest.approx(
        calibration.expected_calibration_error(labels[:, c], probs[:, c]))
  assert result["brier"] == pytest.approx(np.mean([brier_score_loss(labels[:, c], probs[:, c])
                                                   for c in range(3)]))
  assert result["ece_quantile"] == pytest.approx(
      np.mean([result[f"ece_quantile/{n}"] for n in NAMES]))
  diagram = result["reliability"]["uniform"]["B"]
  assert len(diagram["edges"]) == 16 and sum(diagram["count"]) == len(labels)
  json.dumps(result, allow_nan=False)  # empty bins are None, not NaN


def _multiclass(n=3000, seed=0, sharpen=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1.5, size=(n, 4))
  true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  classes = np.array([rng.choice(4, p=row) for row in true])
  probs = np.exp(sharpen * logits)
  return np.eye(4)[classes], probs / probs.sum(axis=1, keepdims=True), sharpen * logits


def test_multiclass_uses_the_top_label_and_the_multiclass_brier():
  labels, probs, _ = _multiclass()
  names = ("a", "b", "c", "d")
  result = calibration.calibration_metrics(labels, probs, names, multi_class=True)
  correct = probs.argmax(axis=1) == labels.argmax(axis=1)
  confidence = probs.max(axis=1)
  edges = np.linspace(0, 1, 16)
  assert result["ece_uniform"] == pytest.approx(_numpy_ece(correct, confidence, edges))
  assert result["brier"] == pytest.approx(
      brier_score_loss(labels.argmax(axis=1), probs, labels=range(4)))


def test_temperature_minimises_the_validation_nll():
  labels, _, logits = _binary(n=4000, seed=2, sharpen=3.0)
  t = calibration.fit_temperature(labels, logits, multi_class=False)
  assert t == pytest.approx(3.0, rel=0.1)  # undoes the sharpening

  def nll(temperature):
    return calibration.negative_log_likelihood(labels, logits / temperature, False)

  grid = np.exp(np.linspace(np.log(0.5), np.log(10), 2001))
  assert t == pytest.approx(grid[np.argmin([nll(g) for g in grid])], rel=2e-3)
  assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))
  p = 1 / (1 + np.exp(-logits / t))
  assert nll(t) == pytest.approx(np.mean([log_loss(labels[:, c], p[:, c])
                                          for c in range(3)]))


def test_softmax_temperature_matches_log_loss():
  labels, _, logits = _multiclass(seed=3, sharpen=0.5)  # underconfident: T < 1
  t = calibration.fit_temperature(labels, logits, multi_class=True)
  assert t == pytest.approx(0.5, rel=0.1)
  probs = calibration.probs_from_logits(logits / t, multi_class=True)
  assert calibration.negative_log_likelihood(labels, logits / t, True) == pytest.approx(
      log_loss(labels.argmax(axis=1), probs, labels=range(4)))


@pytest.mark.parametrize("multi_class", [False, True])
def test_calibrate_fits_on_validation_and_lowers_test_ece(multi_class):
  labels, probs, _ = _multiclass(n=4000) if multi_class else _binary(n=4000, seed=4)
  names = tuple("abcd"[:labels.shape[1]])
  result = calibration.calibrate(labels[:2000], probs[:2000], labels[2000:], probs[2000:],
                                 names, multi_class)
  assert result["temperature"] > 1.5
  assert result["val_nll_after"] < result["val_nll_before"]
  for key in ("ece_uniform", "ece_quantile", "brier"):
    assert result["after"][key] < result["before"][key], key
  json.dumps(result, allow_nan=False)


def test_logits_from_probs_round_trip():
  probs = np.array([[0.2, 0.9, 0.5]])
  back = calibration.probs_from_logits(calibration.logits_from_probs(probs, False), False)
  np.testing.assert_allclose(back, probs)
  probs = np.array([[0.2, 0.3, 0.5]])
  back = calibration.probs_from_logits(calibration.logits_from_probs(probs, True), True)
  np.testing.assert_allclose(back, probs)
  assert math.isfinite(calibration.logits_from_probs(np.array([[0.0, 1.0]]), False).sum())


def test_bad_strategy_is_refused():
  with pytest.raises(ValueError, match="allowed"):
    calibration.reliability(np.array([0, 1]), np.array([0.2, 0.7]), strategy="kmeans")
