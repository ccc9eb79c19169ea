"""tasks/operating_points.py: thresholds and thresholded metrics against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from medbench_jax.tasks import operating_points as op

NAMES = ("A", "B", "C")


def _data(n=400, seed=0, decimals=None):
  rng = np.random.default_rng(seed)
  labels = (rng.uniform(size=(n, 3)) < [0.1, 0.3, 0.5]).astype(np.float32)
  scores = np.clip(labels * 0.3 + rng.normal(0.4, 0.25, size=(n, 3)), 0, 1)
  if decimals is not None:  # many tied scores
    scores = np.round(scores, decimals)
  return labels, scores


def _confusion(y, s, threshold):
  tn, fp, fn, tp = sk.confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()
  return tp, fp, tn, fn


@pytest.mark.parametrize("decimals", [None, 1])
def test_youden_is_roc_curves_best_point(decimals):
  labels, scores = _data(decimals=decimals)
  for c in range(3):
    y, s = labels[:, c], scores[:, c]
    threshold = op.choose_threshold(y, s, "youden")
    fpr, tpr, thresholds = sk.roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    assert threshold in thresholds
    tp, fp, tn, fn = _confusion(y, s, threshold)
    assert tp / (tp + fn) - fp / (fp + tn) == pytest.approx(j.max(), abs=1e-12)
    # The tie rule: no higher threshold reaches the same J.
    best = thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)]
    assert threshold == best.max()


@pytest.mark.parametrize("decimals", [None, 1])
def test_f1_is_precision_recall_curves_best_point(decimals):
  labels, scores = _data(seed=1, decimals=decimals)
  for c in range(3):
    y, s = labels[:, c], scores[:, c]
    threshold = op.choose_threshold(y, s, "f1")
    precision, recall, thresholds = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
      f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    assert threshold in thresholds
    chosen = sk.f1_score(y, s >= threshold)
    assert chosen == pytest.approx(f1.max(), abs=1e-12)
    assert threshold == thresholds[np.isclose(f1, f1.max(), rtol=0, atol=1e-12)].max()


def test_ties_go_to_the_highest_threshold():
  # J = 0.5 at 0.9 and at 0.7; F1 = 2/3 at 0.9 and at 0.6.
  s = np.array([0.9, 0.8, 0.7, 0.6])
  youden_labels = np.array([1, 0, 1, 0])
  assert op.choose_threshold(youden_labels, s, "youden") == 0.9
  fpr, tpr, thresholds = sk.roc_curve(youden_labels, s)
  assert thresholds[np.argmax(tpr - fpr)] == 0.9
  assert op.choose_threshold(np.array([1, 0, 0, 1]), s, "f1") == 0.9


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_target_sensitivity_is_the_most_specific_threshold_meeting_it(target):
  labels, scores = _data(seed=2)
  y, s = labels[:, 1], scores[:, 1]
  threshold = op.choose_threshold(y, s, "sensitivity", target)
  tp, fp, tn, fn = _confusion(y, s, threshold)
  assert tp / (tp + fn) >= target
  higher = np.unique(s[s > threshold]).min()  # the next candidate up misses the target
  tp, _, _, fn = _confusion(y, s, higher)
  assert tp / (tp + fn) < target


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99, 1.0])
def test_target_specificity_is_the_most_sensitive_threshold_meeting_it(target):
  labels, scores = _data(seed=3)
  y, s = labels[:, 2], scores[:, 2]
  threshold = op.choose_threshold(y, s, "specificity", target)
  _, fp, tn, _ = _confusion(y, s, threshold)
  assert tn / (tn + fp) >= target
  lower = s[s < threshold]
  if lower.size:  # the next candidate down misses it
    _, fp, tn, _ = _confusion(y, s, lower.max())
    assert tn / (tn + fp) < target


def test_specificity_one_above_a_negative_top_score_calls_nothing_positive():
  y = np.array([0, 1, 1, 0])
  s = np.array([0.9, 0.8, 0.7, 0.1])
  threshold = op.choose_threshold(y, s, "specificity", 1.0)
  assert threshold > 0.9 and not (s >= threshold).any()


def test_bad_rules_are_refused():
  y, s = np.array([0, 1]), np.array([0.2, 0.7])
  with pytest.raises(ValueError, match="allowed"):
    op.choose_threshold(y, s, "accuracy")
  with pytest.raises(ValueError, match="needs a target"):
    op.choose_threshold(y, s, "sensitivity")
  with pytest.raises(ValueError, match="takes no target"):
    op.choose_threshold(y, s, "youden", 0.9)


def test_single_valued_validation_class_has_no_threshold():
  assert math.isnan(op.choose_threshold(np.zeros(5), np.linspace(0, 1, 5)))
  assert math.isnan(op.choose_threshold(np.ones(5), np.linspace(0, 1, 5), "f1"))


def test_threshold_metrics_equal_sklearn():
  labels, scores = _data(seed=4, decimals=2)
  for c in range(3):
    y, s = labels[:, c], scores[:, c]
    threshold = float(np.median(s))
    m = {k: float(v[0]) for k, v in op.threshold_metrics(y, s, threshold).items()}
    called = s >= threshold
    tp, fp, tn, fn = _confusion(y, s, threshold)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, called))
    assert m["specificity"] == pytest.approx(sk.recall_score(y, called, pos_label=0))
    assert m["ppv"] == pytest.approx(sk.precision_score(y, called))
    assert m["npv"] == pytest.approx(sk.precision_score(y, called, pos_label=0))
    assert m["f1"] == pytest.approx(sk.f1_score(y, called))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, called))
    assert m["auprc"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_resampled_metrics_equal_sklearn_on_the_repeated_examples():
  labels, scores = _data(n=120, seed=5, decimals=1)
  y, s = labels[:, 1], scores[:, 1]
  counts = np.random.default_rng(0).multinomial(120, np.full(120, 1 / 120), size=4)
  m = op.threshold_metrics(y, s, 0.5, counts)
  for b, row in enumerate(counts):
    ry, rs = np.repeat(y, row), np.repeat(s, row)
    assert m["auprc"][b] == pytest.approx(sk.average_precision_score(ry, rs), abs=1e-12)
    assert m["f1"][b] == pytest.approx(sk.f1_score(ry, rs >= 0.5))
    assert m["balanced_accuracy"][b] == pytest.approx(
        sk.balanced_accuracy_score(ry, rs >= 0.5))


def test_undefined_metrics_are_nan_never_a_crash():
  y = np.array([0, 0, 0, 0])
  s = np.array([0.1, 0.2, 0.3, 0.4])
  m = op.threshold_metrics(y, s, 0.9)  # no positives, no positive calls
  assert math.isnan(m["sensitivity"][0]) and math.isnan(m["ppv"][0])
  assert math.isnan(m["f1"][0]) and math.isnan(m["balanced_accuracy"][0])
  assert math.isnan(m["auprc"][0])
  assert m["specificity"][0] == 1.0 and m["npv"][0] == 1.0
  assert math.isnan(sk.f1_score(y, s >= 0.9, zero_division=np.nan))  # as scikit-learn's
  m = op.threshold_metrics(np.array([1, 0]), np.array([0.4, 0.6]), math.nan)
  assert all(math.isnan(m[k][0]) for k in op.METRICS if k != "auprc")
  assert m["auprc"][0] == pytest.approx(0.5)


def test_operating_points_record_with_intervals():
  labels, scores = _data(n=600, seed=6)
  val, test = slice(0, 300), slice(300, None)
  labels[val, 0] = 0  # class A: no threshold on validation
  result = op.operating_points(labels[val], scores[val], labels[test], scores[test], NAMES,
                               num_resamples=200, seed=1)
  assert result["method"] == "youden" and result["test_examples"] == 300
  a, b = result["classes"]["A"], result["classes"]["B"]
  assert a["threshold"] is None and a["sensitivity"]["value"] is None
  assert a["auprc"]["value"] == pytest.approx(
      sk.average_precision_score(labels[test, 0], scores[test, 0]))
  threshold = op.choose_threshold(labels[val, 1], scores[val, 1])
  assert b["threshold"] == threshold
  called = scores[test, 1] >= threshold
  assert b["f1"]["value"] == pytest.approx(sk.f1_score(labels[test, 1], called))
  assert b["tp"] + b["fn"] == int(labels[test, 1].sum())
  for key in op.METRICS:
    assert b[key]["ci_low"] <= b[key]["value"] <= b[key]["ci_high"], key
    assert b[key]["ci_low"] < b[key]["ci_high"], key
  again = op.operating_points(labels[val], scores[val], labels[test], scores[test], NAMES,
                              num_resamples=200, seed=1)
  assert again == result
  no_intervals = op.operating_points(labels[val], scores[val], labels[test], scores[test],
                                     NAMES, method="sensitivity", target=0.9, num_resamples=0)
  assert no_intervals["classes"]["B"]["ppv"]["ci_low"] is None
