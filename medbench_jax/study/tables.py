"""Markdown tables in the study's layouts, with significance markers.

Cells read `mean ± std [std_paper] (n)`: mean and sample standard deviation (ddof=1) of
the trials' test metric, in brackets the population standard deviation (ddof=0) that the
study's tables print (its np.std), n trials (`n/m` when m were asked); each table's first
header says so (CELLS). Markers compare a cell with
the baseline of the same task, data set and label fraction: `*` p < alpha, `†` the
Holm-adjusted p < alpha, `‡` the Benjamini-Hochberg-adjusted p < alpha, each
correction over the tests of the one table. The baseline's cells are bold.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import pathlib
import re

import numpy as np
import pandas as pd

from medbench_jax.study import stats

MARKERS = (("*", "p_value"), ("†", "p_holm"), ("‡", "p_bh"))
# What a cell holds (format_cell), for the tables' headers.
CELLS = "mean ± std (ddof=1) [std (ddof=0), as the paper] (n)"
_PREFIX = re.compile(r"^([A-Za-z][\w.+-]*):(?!//)(.*)$")  # FORMAT:PATH, run:WORKDIR


def _init_suffix(init: str, parts: int) -> str:
  match = _PREFIX.match(init)
  prefix, path = (match.group(1) + ":", match.group(2)) if match else ("", init)
  if "/" not in path.strip("/"):
    return init
  return prefix + str(pathlib.PurePath(*pathlib.PurePath(path).parts[-parts:]))


def readable_inits(inits: Sequence[str]) -> dict[str, str]:
  """Short, distinct labels for inits: a checkpoint path by its file (or run) name.

  `/ckpt/moco_v2.pth` -> `moco_v2.pth`, `byol:/w/pretrain_res50x1.pkl` ->
  `byol:pretrain_res50x1.pkl`, `run:/sweeps/a/trial_0` -> `run:a/trial_0` (a trial
  folder keeps its run's name). Where two labels would clash, both keep more of
  their paths. `random`, `imagenet`, `timm:NAME.TAG` stay as they are.
  """
  inits = sorted(set(inits))
  parts = {init: 2 if re.search(r"trial_\d+/?$", init) else 1 for init in inits}
  while True:
    labels = {init: _init_suffix(init, parts[init]) for init in inits}
    clashing = [i for i in inits if list(labels.values()).count(labels[i]) > 1]
    growing = [i for i in clashing if labels[i] != _init_suffix(i, parts[i] + 1)]
    if not growing:
      return labels
    for init in growing:
      parts[init] += 1


def format_fraction(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def format_p(p: float) -> str:
  if p is None or math.isnan(p):
    return "—"
  return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def format_value(value: float, digits: int = 4) -> str:
  return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_interval(value: float, low: float, high: float, digits: int = 4) -> str:
  """`value [low, high]`; the brackets left out where the interval is undefined."""
  text = format_value(value, digits)
  if text == "—" or any(x is None or math.isnan(x) for x in (low, high)):
    return text
  return f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def format_change(before: float, after: float, digits: int = 4) -> str:
  """`before → after`."""
  return f"{format_value(before, digits)} → {format_value(after, digits)}"


def format_spread(values: Sequence[float], digits: int = 4) -> str:
  """`mean ± std` (ddof=1) of the defined values; the mean alone for one value."""
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  if not values.size:
    return "—"
  spread = f" ± {values.std(ddof=1):.{digits}f}" if values.size > 1 else ""
  return f"{values.mean():.{digits}f}{spread}"


def format_cell(row: pd.Series) -> str:
  """`mean ± std [std_paper] (n)` of one summary row (see the module docstring)."""
  n = int(row["n"])
  if n == 0:
    return "—"
  count = f"{n}" if pd.isna(row.get("asked")) or n >= row["asked"] else (
      f"{n}/{int(row['asked'])}")
  spread = "" if math.isnan(row["std"]) else f" ± {row['std']:.4f}"
  if spread and not pd.isna(row.get("std_paper")):
    spread += f" [{row['std_paper']:.4f}]"
  return f"{row['mean']:.4f}{spread} ({count})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def corrected(tests: pd.DataFrame) -> pd.DataFrame:
  """`tests` with Holm and BH adjustments of its p_value column added."""
  tests = tests.copy()
  tests["p_holm"], tests["p_bh"] = stats.correct(tests["p_value"].to_numpy(float))
  return tests


def _marked(row: pd.Series, alpha: float, is_baseline: bool) -> str:
  cell = format_cell(row)
  if is_baseline:
    return f"**{cell}**"
  marks = "".join(m for m, column in MARKERS
                  if not pd.isna(row.get(column)) and row[column] < alpha)
  return f"{cell} {marks}" if marks else cell


def _tests_block(tests: pd.DataFrame, columns: dict[str, str]) -> str:
  """The tests of one table: `columns` (name -> header) name the candidate."""
  tested = tests.dropna(subset=["p_value"])
  if tested.empty:
    return ""
  header = [*columns.values(), "Δ mean", "p", "Holm", "BH"]
  rows = [[*(row[c] for c in columns), f"{row['delta']:+.4f}", format_p(row["p_value"]),
           format_p(row["p_holm"]), format_p(row["p_bh"])] for _, row in tested.iterrows()]
  return (f"\nTests against the baseline ({len(tested)}, corrected together):\n\n" +
          markdown_table(header, rows) + "\n")


def _with_delta(rows: pd.DataFrame, summary: pd.DataFrame,
                baseline: tuple[str, str] | None) -> pd.DataFrame:
  rows = rows.copy()
  rows["delta"] = math.nan
  if baseline is not None:
    base = summary[(summary["model"] == baseline[0]) & (summary["init"] == baseline[1])]
    means = base.set_index(stats.SETTING_COLUMNS)["mean"]
    keys = pd.MultiIndex.from_frame(rows[stats.SETTING_COLUMNS])
    rows["delta"] = rows["mean"].to_numpy() - means.reindex(keys).to_numpy()
  return rows


def _is_baseline(row: pd.Series, baseline: tuple[str, str] | None) -> bool:
  return baseline is not None and (row["model"], row["init"]) == baseline


def models_by_inits(setting: pd.DataFrame, summary: pd.DataFrame,
                    baseline: tuple[str, str] | None,
                    alpha: float) -> tuple[str, pd.DataFrame]:
  """Rows models, columns inits, for the summary rows of one task/dataset/fraction.

  Returns the Markdown and the table's tests (with p_holm, p_bh).
  """
  setting = corrected(_with_delta(setting, summary, baseline))
  inits = sorted(setting["init_label"].unique())
  rows = []
  for model, group in setting.groupby("model", sort=True):
    cells = {row["init_label"]: _marked(row, alpha, _is_baseline(row, baseline))
             for _, row in group.iterrows()}
    rows.append([model, *(cells.get(init, "—") for init in inits)])
  text = markdown_table([f"model \\ init: {CELLS}", *inits], rows)
  return text + "\n" + _tests_block(setting, {"model": "model", "init_label": "init"}), setting


def candidates_by_fractions(dataset: pd.DataFrame, summary: pd.DataFrame,
                            baseline: tuple[str, str] | None,
                            alpha: float) -> tuple[str, pd.DataFrame]:
  """Rows model/init, columns label fractions, for the summary rows of one data set."""
  dataset = corrected(_with_delta(dataset, summary, baseline))
  fractions = sorted(dataset["label_fraction"].unique())
  rows = []
  for (model, label), group in dataset.groupby(["model", "init_label"], sort=True):
    cells = {row["label_fraction"]: _marked(row, alpha, _is_baseline(row, baseline))
             for _, row in group.iterrows()}
    rows.append([model, label, *(cells.get(f, "—") for f in fractions)])
  text = markdown_table([f"model: {CELLS}", "init", *map(format_fraction, fractions)],
                        rows)
  dataset = dataset.assign(fraction=dataset["label_fraction"].map(format_fraction))
  return text + "\n" + _tests_block(
      dataset, {"model": "model", "init_label": "init", "fraction": "labels"}), dataset


def frame_table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
  """Markdown of `frame`'s columns (keys) under headers (values); floats formatted."""
  def text(value):
    if isinstance(value, (float, np.floating)):
      return format_value(float(value))
    return str(value)
  rows = [[text(row[c]) for c in columns] for _, row in frame.iterrows()]
  return markdown_table(list(columns.values()), rows)
