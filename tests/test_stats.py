"""Summaries, tests against a baseline, corrections and ranks, against numpy/scipy/statsmodels."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from medbench_jax.study import stats


def _trials(rows):
  """rows: (model, init, seed, value) in one setting."""
  return pd.DataFrame([{"task": "classification", "dataset": "d", "model": m, "init": i,
                        "label_fraction": 1.0, "metric": "mean_auc", "seed": s, "value": v}
                       for m, i, s, v in rows])


TRIALS = _trials([("resnet50", "imagenet", 0, 0.80), ("resnet50", "imagenet", 1, 0.82),
                  ("resnet50", "imagenet", 2, 0.81), ("resnet50", "random", 0, 0.70),
                  ("resnet50", "random", 1, 0.74), ("resnet50", "random", 2, math.nan),
                  ("resnet50", "random", 3, 0.69), ("swin", "imagenet", 1, 0.85),
                  ("swin", "imagenet", 2, 0.88), ("swin", "imagenet", 4, 0.84),
                  ("swin", "random", 0, 0.75)])


def test_summary_equals_numpy_and_skips_undefined_trials():
  summary = stats.summarize(TRIALS).set_index(["model", "init"])
  values = np.array([0.70, 0.74, 0.69])
  row = summary.loc[("resnet50", "random")]
  assert row["n"] == 3
  assert row["mean"] == pytest.approx(values.mean(), abs=1e-15)
  assert row["std"] == pytest.approx(values.std(ddof=1), abs=1e-15)
  assert row["std_paper"] == pytest.approx(values.std(ddof=0), abs=1e-15)
  single = summary.loc[("swin", "random")]
  assert single["n"] == 1 and math.isnan(single["std"]) and single["std_paper"] == 0


@pytest.mark.parametrize("test,expected", [
    ("student", lambda a, b: scipy.stats.ttest_ind(a, b).pvalue),
    ("welch", lambda a, b: scipy.stats.ttest_ind(a, b, equal_var=False).pvalue),
    ("paired", lambda a, b: scipy.stats.ttest_rel(a, b).pvalue)])
def test_two_sample_p_values_equal_scipy(test, expected):
  a, b = [0.81, 0.83, 0.80, 0.86], [0.79, 0.80, 0.78, 0.81]
  assert stats.two_sample_p_value(a, b, test) == pytest.approx(expected(a, b), rel=1e-12)
  assert math.isnan(stats.two_sample_p_value([0.8], b, test))


def test_compare_to_baseline_unpaired_and_paired():
  summary = stats.summarize(TRIALS)
  p, problems = stats.compare_to_baseline(TRIALS, summary, ("resnet50", "imagenet"), "student")
  p = dict(zip(zip(summary["model"], summary["init"]), p))
  assert math.isnan(p[("resnet50", "imagenet")])
  assert p[("resnet50", "random")] == pytest.approx(
      scipy.stats.ttest_ind([0.70, 0.74, 0.69], [0.80, 0.82, 0.81]).pvalue)
  assert math.isnan(p[("swin", "random")])  # a single trial
  assert not problems
  p, problems = stats.compare_to_baseline(TRIALS, summary, ("resnet50", "imagenet"), "paired")
  p = dict(zip(zip(summary["model"], summary["init"]), p))
  # swin/imagenet has seeds 1, 2, 4; the baseline 0, 1, 2: pairs on seeds 1 and 2.
  assert p[("swin", "imagenet")] == pytest.approx(
      scipy.stats.ttest_rel([0.85, 0.88], [0.82, 0.81]).pvalue)
  # resnet50/random: seed 2 undefined and seed 3 not in the baseline: pairs 0 and 1.
  assert p[("resnet50", "random")] == pytest.approx(
      scipy.stats.ttest_rel([0.70, 0.74], [0.80, 0.82]).pvalue)
  details = {pr.run: pr.detail for pr in problems}
  assert "[0, 4]" in details["swin / imagenet, d (classification), label fraction 1"]
  assert "[2, 3]" in details["resnet50 / random, d (classification), label fraction 1"]
  assert "swin / random, d (classification), label fraction 1" in details  # seed 0 only


def test_no_baseline_no_p_values():
  summary = stats.summarize(TRIALS)
  p, problems = stats.compare_to_baseline(TRIALS, summary, None, "student")
  assert p.isna().all() and not problems


def test_corrections_equal_statsmodels_and_skip_nan():
  p = np.array([0.01, math.nan, 0.04, 0.03, 0.2, 0.001])
  holm, bh = stats.correct(p)
  tested = ~np.isnan(p)
  np.testing.assert_allclose(holm[tested], multipletests(p[tested], method="holm")[1])
  np.testing.assert_allclose(bh[tested], multipletests(p[tested], method="fdr_bh")[1])
  assert np.isnan(holm[1]) and np.isnan(bh[1])
  assert all(np.isnan(stats.correct([math.nan])[0]))


def test_baseline_by_exact_init_or_label():
  summary = pd.DataFrame({"model": ["resnet50", "resnet50", "swin"],
                          "init": ["/ckpt/a/moco.pth", "imagenet", "/ckpt/b/moco.pth"]})
  labels = {"/ckpt/a/moco.pth": "a/moco.pth", "imagenet": "imagenet",
            "/ckpt/b/moco.pth": "b/moco.pth"}
  assert stats.resolve_baseline(summary, "resnet50/imagenet", labels) == ("resnet50", "imagenet")
  assert stats.resolve_baseline(summary, "resnet50//ckpt/a/moco.pth", labels) == (
      "resnet50", "/ckpt/a/moco.pth")
  assert stats.resolve_baseline(summary, "resnet50/a/moco.pth", labels) == (
      "resnet50", "/ckpt/a/moco.pth")
  with pytest.raises(ValueError, match="Available: resnet50/a/moco.pth, resnet50/imagenet, "
                     "swin/b/moco.pth"):
    stats.resolve_baseline(summary, "swin/imagenet", labels)


def test_complete_design_drops_the_emptiest_line_first():
  scores = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, np.nan, 3.0, 4.0],
                         "c": [np.nan, np.nan, np.nan, 1.0], "d": [1.0, 2.0, 3.0, 4.0]},
                        index=["d1", "d2", "d3", "d4"])
  complete, removed = stats.complete_design(scores)
  assert list(complete.columns) == ["a", "b", "d"] and list(complete.index) == ["d1", "d3", "d4"]
  assert removed == ["candidate c: no result for d1, d2, d3", "block d2: no result for b"]


def test_rank_analysis_against_friedman_formula_and_demsar_table():
  rng = np.random.default_rng(0)
  scores = pd.DataFrame(rng.uniform(size=(8, 4)) + [0.3, 0.2, 0.1, 0.0],
                        columns=["w", "x", "y", "z"])
  analysis = stats.rank_analysis(scores)
  ranks = np.array([scipy.stats.rankdata(-row) for row in scores.to_numpy()])
  np.testing.assert_allclose(analysis.average_ranks[["w", "x", "y", "z"]], ranks.mean(axis=0))
  assert list(analysis.average_ranks) == sorted(analysis.average_ranks)
  n, k = scores.shape
  chi2 = 12 / (n * k * (k + 1)) * (ranks.sum(axis=0)**2).sum() - 3 * n * (k + 1)
  assert analysis.statistic == pytest.approx(chi2)
  assert analysis.p_value == pytest.approx(scipy.stats.chi2.sf(chi2, k - 1))
  # Demšar (2006), Table 5(a): q_0.05 for k = 4 is 2.569.
  assert analysis.critical_difference == pytest.approx(2.569 * math.sqrt(4 * 5 / (6 * 8)),
                                                       abs=1e-3)
  assert analysis.nemenyi.loc["w", "z"] < analysis.nemenyi.loc["w", "x"]
  assert list(analysis.conover.columns) == ["w", "x", "y", "z"]


@pytest.mark.parametrize("k,q", [(2, 1.960), (3, 2.343), (5, 2.728), (10, 3.164)])
def test_critical_difference_equals_demsar_table(k, q):
  assert stats.nemenyi_critical_difference(k, 10) == pytest.approx(
      q * math.sqrt(k * (k + 1) / 60), abs=1e-3)


def test_rank_analysis_explains_when_too_little_is_left():
  scores = pd.DataFrame({"a": [1.0, 2.0], "b": [2.0, 1.0], "c": [np.nan, 3.0]})
  reason = stats.rank_analysis(scores)
  assert isinstance(reason, str)
  assert "needs at least 3 over 2" in reason and "candidate c" in reason
