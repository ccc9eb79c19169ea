"""LogME against the numerically maximised evidence; linear probe; probe files."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import scipy.stats
import threadpoolctl

from medbench_jax.study import transferability


@pytest.fixture(autouse=True)
def _single_threaded_blas():
  # Matrices here are small: BLAS threads only contend with each other and with
  # other processes (tens of times slower on a busy 2-core machine).
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield


def _data(n, d, seed=0, signal=1.0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(n, d))
  weights = rng.normal(size=(d, 3))
  labels = (signal * features @ weights + rng.normal(size=(n, 3)) > 0).astype(np.float32)
  return features, labels


def _max_log_evidence(features, target):
  """max over (alpha, beta) of log N(y; 0, I/beta + F F^T/alpha), by Nelder-Mead.

  The marginal likelihood of y = F w + e written as one Gaussian over all N
  examples: the N x N covariance is Cholesky-factored, nothing shared with LogME's
  D-dimensional posterior and singular values.
  """
  n = len(target)
  gram = features @ features.T

  def negative(log_precisions):
    alpha, beta = np.exp(log_precisions)
    factor = scipy.linalg.cho_factor(np.eye(n) / beta + gram / alpha)
    return 0.5 * (target @ scipy.linalg.cho_solve(factor, target) +
                  2 * np.log(np.diag(factor[0])).sum() + n * math.log(2 * math.pi))

  best = scipy.optimize.minimize(negative, [0.0, 0.0], method="Nelder-Mead",
                                 options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 4000})
  return -best.fun, np.exp(best.x)


@pytest.mark.parametrize("n,d", [(150, 12), (40, 60)])
def test_fixed_point_reaches_the_numerical_maximum_of_the_evidence(n, d):
  features, labels = _data(n, d)
  for k in range(labels.shape[1]):
    fit = transferability.fit_evidence(features, labels[:, k])
    expected, (alpha, beta) = _max_log_evidence(features, labels[:, k])
    assert fit.log_evidence == pytest.approx(expected, abs=1e-6 * n)
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.beta == pytest.approx(beta, rel=1e-3)


def test_logme_averages_per_label_evidence_over_examples():
  features, labels = _data(120, 8, seed=1)
  expected = np.mean([_max_log_evidence(features, labels[:, k])[0] / 120 for k in range(3)])
  assert transferability.logme(features, labels) == pytest.approx(expected, abs=1e-7)


def test_logme_ranks_informative_features_above_noise():
  informative, labels = _data(500, 32, seed=3, signal=2.0)
  noise = np.random.default_rng(99).normal(size=informative.shape)
  assert transferability.logme(informative, labels) > transferability.logme(noise, labels) + 0.05


def test_class_ids_are_one_hot_columns_and_constant_columns_are_left_out():
  features, _ = _data(90, 6, seed=4)
  classes = np.random.default_rng(4).integers(0, 3, size=90)
  one_hot = np.eye(3)[classes]
  assert transferability.logme(features, classes) == pytest.approx(
      transferability.logme(features, one_hot))
  with_constant = np.concatenate([one_hot, np.zeros((90, 1))], axis=1)
  assert transferability.logme(features, with_constant) == pytest.approx(
      transferability.logme(features, one_hot))
  assert math.isnan(transferability.logme(features, np.zeros((90, 2))))


def test_linear_probe_separable_noise_and_informative():
  rng = np.random.default_rng(5)
  labels = (rng.uniform(size=(400, 2)) < 0.4).astype(np.float32)
  separable = labels * 3.0 + rng.normal(0, 0.1, size=labels.shape)
  assert transferability.linear_probe_holdout(separable, labels) == 1.0
  noise = rng.normal(size=(400, 16))
  assert abs(transferability.linear_probe_holdout(noise, labels) - 0.5) < 0.1
  informative, labels = _data(400, 16, seed=6)
  assert transferability.linear_probe_holdout(informative, labels) > 0.8


def test_linear_probe_holdout_by_group_keeps_each_group_on_one_side():
  # Rows of one group (the pixels of one image) are near-copies with the group's random
  # label: held out row by row, their twins on the training side give the answer away
  # (more feature dimensions than training groups: the probe can memorise them).
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(120), 4)
  group_labels = (rng.uniform(size=(120, 1)) < 0.5).astype(np.float32)
  features = rng.normal(size=(120, 200))[groups] + rng.normal(0, 0.01, size=(480, 200))
  labels = group_labels[groups]
  assert transferability.linear_probe_holdout(features, labels) == 1.0
  # By group: nothing to recognise, chance level (30 held-out groups).
  assert transferability.linear_probe_holdout(features, labels, groups=groups) < 0.8
  with pytest.raises(ValueError, match="480 feature rows but 479 group ids"):
    transferability.linear_probe_holdout(features, labels, groups=groups[1:])


def test_rank_correlations():
  fine_tuned = np.array([0.80, 0.83, 0.78, 0.90, 0.85])
  same = transferability.rank_correlations(fine_tuned * 2, fine_tuned)
  assert same["spearman"] == pytest.approx(1.0) and same["weighted_tau"] == pytest.approx(1.0)
  reversed_ = transferability.rank_correlations(-fine_tuned, fine_tuned)
  assert reversed_["spearman"] == pytest.approx(-1.0)
  assert reversed_["weighted_tau"] == pytest.approx(-1.0)
  estimate = np.array([1.0, 2.0, 3.0, 5.0, 4.0])  # ranks 1 2 3 5 4 vs 2 3 1 5 4
  d = np.array([1, 2, 3, 5, 4]) - np.array([2, 3, 1, 5, 4])
  assert transferability.rank_correlations(estimate, fine_tuned)["spearman"] == pytest.approx(
      1 - 6 * (d**2).sum() / (5 * 24))


def _line(**overrides):
  line = {"task": "classification", "dataset": "chestxray14", "model": "resnet50",
          "init": "imagenet", "label_fraction": 1.0, "logme": 0.5, "linear_probe": 0.8}
  line.update(overrides)
  return json.dumps(line)


def test_probe_file_reading_and_errors(tmp_path):
  path = tmp_path / "probe.jsonl"
  path.write_text(_line() + "\n\n" + _line(init="random", logme=None) + "\n")
  probe = transferability.read_probe_file(path)
  assert list(probe["init"]) == ["imagenet", "random"]
  assert math.isnan(probe["logme"].iloc[1]) and probe["linear_probe"].iloc[1] == 0.8
  for text, message in [
      (_line() + "\n{oops", r"probe.jsonl:2: not valid JSON"),
      (_line() + "\n" + json.dumps({"task": "classification"}), r":2: missing key\(s\) dataset"),
      (_line(logme="high"), r":1: 'logme' must be a number or null"),
      (_line() + "\n" + _line(logme=0.1), r":2: resnet50 / imagenet.* already on line 1")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      transferability.read_probe_file(path)


def test_features_that_explain_nothing_give_the_noise_only_limit():
  rng = np.random.default_rng(7)
  features = rng.normal(size=(50, 5))
  target = rng.normal(size=50)
  target -= features @ np.linalg.lstsq(features, target, rcond=None)[0]  # orthogonal to F
  fit = transferability.fit_evidence(features, target)
  assert fit.alpha == math.inf
  beta = 50 / (target @ target)
  gaussian = scipy.stats.multivariate_normal(np.zeros(50), np.eye(50) / beta +
                                             features @ features.T / 1e12)
  assert fit.beta == pytest.approx(beta)
  assert fit.log_evidence == pytest.approx(gaussian.logpdf(target), abs=1e-6)
