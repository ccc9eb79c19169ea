"""Bootstrap and DeLong on saved predictions, against scikit-learn, scipy and definitions."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from medbench_jax.study import predictions


def _scores(n=240, seed=0, signal=1.0, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.uniform(size=n) < 0.3
  scores = signal * labels + rng.normal(size=n)
  return labels, (np.round(scores, 1) if ties else scores)


def _resample_counts(rng, n, b):
  draws = rng.integers(0, n, size=(b, n))
  return draws, np.stack([np.bincount(d, minlength=n) for d in draws])


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_equals_sklearn_on_the_resampled_examples(ties):
  labels, scores = _scores(ties=ties)
  draws, counts = _resample_counts(np.random.default_rng(1), len(labels), 20)
  result = predictions.weighted_auc(labels, scores, counts)
  expected = [roc_auc_score(labels[d], scores[d]) for d in draws]
  np.testing.assert_allclose(result, expected, atol=1e-12)


def test_weighted_auc_is_nan_without_negatives_and_rejects_fractional_counts():
  labels = np.array([1, 1, 0, 0])
  counts = np.array([[1, 1, 0, 0], [1, 0, 1, 2]])
  result = predictions.weighted_auc(labels, np.array([0.9, 0.8, 0.7, 0.1]), counts)
  assert math.isnan(result[0]) and result[1] == 1.0
  with pytest.raises(ValueError, match="integers"):
    predictions.weighted_auc(labels, np.zeros(4), np.ones((1, 4)))


def test_classification_statistic_is_the_mean_auc_of_defined_classes():
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(200, 3)) < [0.2, 0.5, 0.0]).astype(np.float32)
  probs = rng.uniform(size=(200, 3)).astype(np.float32) + 0.3 * labels
  stat = predictions.statistic("classification", "mean_auc", {"labels": labels, "probs": probs})
  expected = np.mean([roc_auc_score(labels[:, c], probs[:, c]) for c in (0, 1)])
  assert stat(np.ones((1, 200), np.int64))[0] == pytest.approx(expected, abs=1e-12)
  assert predictions.statistic("classification", "accuracy", {}) is None


def _segmentation(n=30, seed=0):
  rng = np.random.default_rng(seed)
  target = rng.integers(0, 500, size=(n, 2))
  target[:4, 1] = 0
  prediction = np.maximum(0, target + rng.integers(-80, 80, size=target.shape))
  prediction[:2, 1] = 0  # two images where class 1 is absent from both
  intersection = (np.minimum(prediction, target) * 0.9).astype(np.int64)
  return {"intersection": intersection, "prediction_sum": prediction, "target_sum": target}


def _reference(arrays, metric):
  """The definitions: pooled over images, or per image with 1 where P + T = 0."""
  i, p, t = (arrays[k].astype(float) for k in ("intersection", "prediction_sum", "target_sum"))
  if metric == "dice":
    return np.mean(2 * i.sum(0) / (p.sum(0) + t.sum(0)))
  if metric == "iou":
    return np.mean(i.sum(0) / (p.sum(0) + t.sum(0) - i.sum(0)))
  per_image = []
  for row in range(len(i)):
    for c in range(i.shape[1]):
      union = p[row, c] + t[row, c]
      if union == 0:
        per_image.append(1.0)
      elif metric == "mean_dice":
        per_image.append(2 * i[row, c] / union)
      else:
        per_image.append(i[row, c] / (union - i[row, c]))
  return np.mean(per_image)


@pytest.mark.parametrize("metric", ["dice", "iou", "mean_dice", "mean_iou"])
def test_segmentation_statistics_equal_their_definitions_on_resamples(metric):
  arrays = _segmentation()
  stat = predictions.statistic("segmentation", metric, arrays)
  draws, counts = _resample_counts(np.random.default_rng(2), 30, 5)
  expected = [_reference({k: v[d] for k, v in arrays.items()}, metric) for d in draws]
  np.testing.assert_allclose(stat(counts), expected, atol=1e-12)
  assert stat(np.ones((1, 30), np.int64))[0] == pytest.approx(_reference(arrays, metric))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
  labels, scores = _scores(n=400)
  stat = lambda counts: predictions.weighted_auc(labels, scores, counts)
  first = predictions.bootstrap(stat, 400, 250, seed=3)
  assert first.shape == (250,)
  np.testing.assert_array_equal(first, predictions.bootstrap(stat, 400, 250, seed=3))
  assert not np.array_equal(first, predictions.bootstrap(stat, 400, 250, seed=4))
  low, high = predictions.percentile_interval(first)
  assert low < roc_auc_score(labels, scores) < high
  assert (low, high) == tuple(np.quantile(first, [0.025, 0.975]))


def test_bootstrap_standard_error_agrees_with_delong():
  # Two estimates of the same standard error by different routes.
  labels, scores = _scores(n=600, seed=5)
  stat = lambda counts: predictions.weighted_auc(labels, scores, counts)
  spread = predictions.bootstrap(stat, 600, 2000, seed=0).std()
  _, covariance = predictions.delong_covariance(labels, scores)
  assert spread == pytest.approx(math.sqrt(covariance[0, 0]), rel=0.1)


def _placement_covariance(labels, scores):
  """DeLong et al. (1988) by definition: explicit placement values, O(m n)."""
  positives, negatives = scores[:, labels], scores[:, ~labels]
  psi = lambda x, y: (x > y) + 0.5 * (x == y)
  pos_place = np.stack([[psi(x, negatives[r]).mean() for x in positives[r]]
                        for r in range(len(scores))])
  neg_place = np.stack([[psi(positives[r], y).mean() for y in negatives[r]]
                        for r in range(len(scores))])
  return np.cov(pos_place) / positives.shape[1] + np.cov(neg_place) / negatives.shape[1]


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_its_definition_and_mann_whitney(ties):
  labels, a = _scores(n=150, seed=1, ties=ties)
  _, b = _scores(n=150, seed=2, signal=0.5, ties=ties)
  b = b + 0.8 * labels
  scores = np.stack([a, b])
  aucs, covariance = predictions.delong_covariance(labels, scores)
  for k in range(2):
    u = scipy.stats.mannwhitneyu(scores[k, labels], scores[k, ~labels]).statistic
    assert aucs[k] == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)
  np.testing.assert_allclose(covariance, _placement_covariance(labels, scores), atol=1e-14)
  result = predictions.delong_test(labels, a, b)
  variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
  z = (aucs[0] - aucs[1]) / math.sqrt(variance)
  assert result.z == pytest.approx(z)
  assert result.p_value == pytest.approx(2 * scipy.stats.norm.sf(abs(z)))


def test_delong_identical_scores_and_degenerate_cases():
  labels, scores = _scores()
  result = predictions.delong_test(labels, scores, scores)
  assert (result.z, result.p_value) == (0.0, 1.0)
  with pytest.raises(ValueError, match="positive and negative"):
    predictions.delong_covariance(np.zeros(5), np.arange(5.0))


def test_delong_holds_its_level_and_finds_real_differences():
  rng = np.random.default_rng(0)
  rejections, n = 0, 300
  for _ in range(n):
    labels = rng.uniform(size=200) < 0.4
    shared = labels + rng.normal(size=200)
    a, b = shared + rng.normal(size=200), shared + rng.normal(size=200)  # equal AUCs
    rejections += predictions.delong_test(labels, a, b).p_value < 0.05
  assert 0.02 <= rejections / n <= 0.09
  labels = rng.uniform(size=300) < 0.4
  strong = 2 * labels + rng.normal(size=300)
  weak = 0.5 * labels + rng.normal(size=300)
  assert predictions.delong_test(labels, strong, weak).p_value < 1e-4


def test_load_names_the_file_and_what_is_missing(tmp_path):
  path = tmp_path / "test_predictions.npz"
  np.savez(path, labels=np.zeros((3, 2)), class_names=np.array(["a", "b"]))
  with pytest.raises(ValueError, match=r"test_predictions.npz: missing array\(s\) probs"):
    predictions.load(path, "classification")
  np.savez(path, labels=np.zeros((3, 2)), probs=np.zeros((3, 1)), class_names=np.array(["a", "b"]))
  with pytest.raises(ValueError, match="probs has shape"):
    predictions.load(path, "classification")
  np.savez(path, labels=np.zeros((3, 2)), probs=np.zeros((3, 2)),
           class_names=np.array([object(), None], dtype=object))
  with pytest.raises(ValueError, match="cannot read"):  # never unpickled
    predictions.load(path, "classification")


def _trial_row(workdir, value, trial=0):
  return {"task": "classification", "dataset": "d", "model": "m", "init": "random",
          "label_fraction": 1.0, "metric": "mean_auc", "seed": trial, "trial": trial,
          "value": value, "run": "m_run", "workdir": str(workdir)}


def test_bootstrap_table_lists_missing_and_disagreeing_predictions(tmp_path):
  labels, scores = _scores()
  (tmp_path / "trial_0").mkdir()
  np.savez(tmp_path / "trial_0" / "test_predictions.npz", labels=labels[:, None].astype(float),
           probs=scores[:, None], class_names=np.array(["a"]))
  trials = pd.DataFrame([_trial_row(tmp_path, 0.5), _trial_row(tmp_path, 0.5, trial=1)])
  table, problems = predictions.bootstrap_table(trials, tmp_path, num_resamples=50)
  assert len(table) == 1
  assert table["value"].iloc[0] == pytest.approx(roc_auc_score(labels, scores))
  assert [p.kind for p in problems] == ["predictions_mismatch", "predictions_missing"]
  assert "results.json says 0.500000" in problems[0].detail
  assert problems[1].workdir == "trial_1/test_predictions.npz"
