"""Statistics over trials: summaries, tests against a baseline, corrections, ranks.

The tests are scipy's (t-tests, Friedman), statsmodels' (Holm, Benjamini-Hochberg) and
scikit-posthocs' (Nemenyi, Conover); this module only decides what is compared with
what. Every metric here is better when higher (AUC, Dice, IoU).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
import scikit_posthocs
import scipy.stats
from statsmodels.stats import multitest

from medbench_jax.study import runs

TESTS = ("student", "welch", "paired")
GROUP_COLUMNS = [*runs.KEY_COLUMNS, "metric"]
# Rows compared with each other share these: same test set, same labels.
SETTING_COLUMNS = ["task", "dataset", "label_fraction"]


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
  """One row per group: its key, metric, mean, std (ddof=1), n and std_paper (ddof=0).

  Trials whose metric is undefined (NaN) are not counted; runs.collect lists them.
  """
  grouped = trials.groupby(GROUP_COLUMNS, sort=True)["value"]
  summary = grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count",
                        std_paper=lambda v: v.std(ddof=0))
  return summary.reset_index()


def parse_baseline(spec: str) -> tuple[str, str]:
  model, _, init = spec.partition("/")
  if not model or not init:
    raise ValueError(f"--baseline must be MODEL/INIT (e.g. resnet50/imagenet or "
                     f"resnet50/moco_v2.pth); got {spec!r}")
  return model, init


def resolve_baseline(summary: pd.DataFrame, spec: str,
                     init_labels: dict[str, str]) -> tuple[str, str]:
  """The (model, exact init) that `spec` names; the init may be given by its label."""
  model, init = parse_baseline(spec)
  inits = sorted(set(summary.loc[summary["model"] == model, "init"]))
  if init in inits:
    return model, init
  matches = [i for i in inits if init_labels.get(i) == init]
  if len(matches) == 1:
    return model, matches[0]
  available = sorted({f"{m}/{init_labels.get(i, i)}"
                      for m, i in zip(summary["model"], summary["init"])})
  reason = (f"it matches several inits: {matches}" if matches else
            "no finished run has it")
  raise ValueError(f"--baseline={spec}: {reason}. Available: "
                   f"{', '.join(available) or 'none (no finished runs)'}")


def two_sample_p_value(values: Sequence[float], baseline: Sequence[float], test: str) -> float:
  """Two-sided p-value of `values` against `baseline`; NaN with fewer than 2 each.

  For test="paired" the two sequences must be aligned (same seeds, same order).
  """
  values, baseline = np.asarray(values, float), np.asarray(baseline, float)
  if len(values) < 2 or len(baseline) < 2:
    return math.nan
  with warnings.catch_warnings():
    # Identical trials give a zero variance; scipy then returns NaN, which is the answer.
    warnings.simplefilter("ignore", RuntimeWarning)
    if test == "paired":
      if len(values) != len(baseline):
        raise ValueError(f"paired test needs aligned samples, got {len(values)} and "
                         f"{len(baseline)}")
      return float(scipy.stats.ttest_rel(values, baseline).pvalue)
    if test not in ("student", "welch"):
      raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    return float(scipy.stats.ttest_ind(values, baseline, equal_var=test == "student").pvalue)


def compare_to_baseline(trials: pd.DataFrame, summary: pd.DataFrame,
                        baseline: tuple[str, str] | None,
                        test: str) -> tuple[pd.Series, list[runs.Problem]]:
  """Per summary row, the p-value of its trials against the baseline's.

  The baseline's trials are those of the same task, dataset and label fraction. NaN
  for the baseline's own rows and where the setting has no baseline. A paired test
  uses the seeds both have; seeds on one side only are returned as problems.
  """
  p_values = pd.Series(math.nan, index=summary.index, name="p_value")
  problems = []
  if baseline is None:
    return p_values, problems
  valid = trials.dropna(subset=["value"])
  by_group = {key: group for key, group in valid.groupby(GROUP_COLUMNS, sort=False)}
  for index, row in summary.iterrows():
    if (row["model"], row["init"]) == baseline:
      continue
    baseline_key = (row["task"], row["dataset"], *baseline, row["label_fraction"],
                    row["metric"])
    base = by_group.get(baseline_key)
    own = by_group.get(tuple(row[c] for c in GROUP_COLUMNS))
    if base is None or own is None:
      continue
    if test == "paired":
      pairs = own.merge(base, on="seed", suffixes=("", "_baseline"))
      unpaired = sorted(set(own["seed"]) ^ set(base["seed"]))
      if unpaired:
        problems.append(runs.Problem(
            "unpaired_seeds", runs.run_label(tuple(row[c] for c in runs.KEY_COLUMNS)), "",
            f"paired test against the baseline leaves out seed(s) {unpaired}, found on "
            f"one side only"))
      p_values[index] = two_sample_p_value(pairs["value"], pairs["value_baseline"], test)
    else:
      p_values[index] = two_sample_p_value(own["value"], base["value"], test)
  return p_values, problems


def correct(p_values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Holm and Benjamini-Hochberg adjusted p-values over the non-NaN entries."""
  p_values = np.asarray(p_values, float)
  holm = np.full_like(p_values, math.nan)
  bh = np.full_like(p_values, math.nan)
  tested = ~np.isnan(p_values)
  if tested.any():
    holm[tested] = multitest.multipletests(p_values[tested], method="holm")[1]
    bh[tested] = multitest.multipletests(p_values[tested], method="fdr_bh")[1]
  return holm, bh


def complete_design(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
  """Drops blocks (rows) and candidates (columns) until no score is missing.

  Repeatedly removes the row or column with the largest fraction of missing scores
  (a candidate on ties). Returns the complete table and what was removed, and why.
  """
  removed = []
  while scores.size and scores.isna().to_numpy().any():
    missing = scores.isna()
    by_column = missing.mean(axis=0)
    by_row = missing.mean(axis=1)
    if by_column.max() >= by_row.max():
      name = by_column.idxmax()
      removed.append(f"candidate {name}: no result for "
                     f"{', '.join(map(str, scores.index[missing[name]]))}")
      scores = scores.drop(columns=name)
    else:
      name = by_row.idxmax()
      removed.append(f"block {name}: no result for "
                     f"{', '.join(map(str, scores.columns[missing.loc[name]]))}")
      scores = scores.drop(index=name)
  return scores, removed


def nemenyi_critical_difference(num_candidates: int, num_blocks: int,
                                alpha: float = 0.05) -> float:
  """Demšar's (2006) critical difference of average ranks for the Nemenyi test."""
  q = scipy.stats.studentized_range.ppf(1 - alpha, num_candidates, np.inf) / math.sqrt(2)
  return q * math.sqrt(num_candidates * (num_candidates + 1) / (6 * num_blocks))


@dataclasses.dataclass
class RankAnalysis:
  """Friedman test and post-hoc comparisons of candidates over blocks (data sets)."""
  scores: pd.DataFrame  # blocks x candidates, complete
  average_ranks: pd.Series  # 1 = best; sorted best first
  statistic: float
  p_value: float
  nemenyi: pd.DataFrame  # pairwise p-values
  conover: pd.DataFrame  # pairwise p-values, Holm-adjusted
  critical_difference: float
  removed: list[str]


def rank_analysis(scores: pd.DataFrame, alpha: float = 0.05) -> RankAnalysis | str:
  """Average ranks, Friedman test and Nemenyi/Conover post-hoc tests of `scores`.

  `scores` holds one row per block and one column per candidate (higher is better);
  incomplete rows/columns are removed first (complete_design). Returns the reason as
  a string when too little is left: Friedman needs 3 candidates and 2 blocks.
  """
  scores, removed = complete_design(scores)
  num_blocks, num_candidates = scores.shape
  if num_candidates < 3 or num_blocks < 2:
    return (f"{num_candidates} candidate(s) over {num_blocks} data set(s) with results for "
            "all; the Friedman test needs at least 3 over 2" +
            (f" (removed: {'; '.join(removed)})" if removed else ""))
  ranks = scores.rank(axis=1, ascending=False, method="average")
  statistic, p_value = scipy.stats.friedmanchisquare(*scores.to_numpy().T)
  values = scores.to_numpy()

  def named(matrix: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(matrix.to_numpy(), index=scores.columns, columns=scores.columns)

  return RankAnalysis(
      scores=scores,
      average_ranks=ranks.mean(axis=0).sort_values(kind="stable"),
      statistic=float(statistic), p_value=float(p_value),
      nemenyi=named(scikit_posthocs.posthoc_nemenyi_friedman(values)),
      conover=named(scikit_posthocs.posthoc_conover_friedman(values, p_adjust="holm")),
      critical_difference=nemenyi_critical_difference(num_candidates, num_blocks, alpha),
      removed=removed)
