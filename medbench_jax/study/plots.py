"""PNG figures of a sweep: bars, annotation-efficiency curves, trials, CD diagrams.

Figures are drawn on matplotlib `Figure` objects rendered by the Agg canvas, so no
display or pyplot state is involved.
"""

from __future__ import annotations

import math
import pathlib
import re

from matplotlib import colormaps
from matplotlib import figure as mpl_figure
import numpy as np
import pandas as pd
import scikit_posthocs

from medbench_jax.study import stats
from medbench_jax.study import tables

METRIC_NAMES = {"mean_auc": "mean AUC (over classes)", "dice": "Dice (pooled over images)",
                "iou": "IoU (pooled over images)", "mean_dice": "Dice (mean over images)",
                "mean_iou": "IoU (mean over images)"}
_DPI = 120


def metric_name(metric: str) -> str:
  return METRIC_NAMES.get(metric, metric)


def file_stem(*parts: object) -> str:
  """A file name made of `parts`, safe on every file system."""
  return re.sub(r"[^\w.-]+", "_", "_".join(str(p) for p in parts))


def file_name(*parts: object) -> str:
  return file_stem(*parts) + ".png"


def _colors(count: int) -> list:
  palette = colormaps["tab10" if count <= 10 else "tab20"]
  return [palette(i % palette.N) for i in range(count)]


def _save(fig: mpl_figure.Figure, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=_DPI, bbox_inches="tight")
  return path


def _value_limits(low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
  # Metrics of competing models often differ by a few thousandths: zoom to the data.
  low, high = np.nanmin(low), np.nanmax(high)
  pad = max(0.02, 0.15 * (high - low))
  return max(0.0, low - pad), high + pad


def bars(setting: pd.DataFrame, title: str, path: pathlib.Path) -> pathlib.Path:
  """Mean ± std per model (groups) and init (bars) of one task/dataset/fraction."""
  models = sorted(setting["model"].unique())
  inits = sorted(setting["init_label"].unique())
  width = 0.8 / len(inits)
  fig = mpl_figure.Figure(figsize=(max(6.0, 1.0 + 0.45 * len(models) * len(inits)), 4.5))
  ax = fig.add_subplot()
  for i, (init, color) in enumerate(zip(inits, _colors(len(inits)))):
    rows = setting[setting["init_label"] == init].set_index("model").reindex(models)
    positions = np.arange(len(models)) + (i - (len(inits) - 1) / 2) * width
    ax.bar(positions, rows["mean"], width, yerr=rows["std"].fillna(0), capsize=3,
           color=color, label=init, edgecolor="black", linewidth=0.5)
  crowded = max(map(len, models)) > 12 or len(models) > 4
  ax.set_xticks(np.arange(len(models)), models, rotation=20 if crowded else 0,
                ha="right" if crowded else "center")
  ax.set_ylim(*_value_limits(setting["mean"] - setting["std"].fillna(0),
                             setting["mean"] + setting["std"].fillna(0)))
  metric = setting["metric"].iloc[0]
  ax.set_ylabel(f"test {metric_name(metric)}")
  ax.set_xlabel("model")
  ax.set_title(f"{title}\nmean ± s.d. over trials (y axis does not start at 0)")
  ax.legend(title="init", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def efficiency_curves(dataset: pd.DataFrame, title: str, path: pathlib.Path) -> pathlib.Path:
  """Metric against label fraction (log axis), one line per model/init, one data set."""
  fig = mpl_figure.Figure(figsize=(8.0, 4.8))
  ax = fig.add_subplot()
  candidates = sorted(set(zip(dataset["model"], dataset["init_label"])))
  markers = "osD^v<>ph*"
  for i, ((model, init), color) in enumerate(zip(candidates, _colors(len(candidates)))):
    rows = dataset[(dataset["model"] == model) & (dataset["init_label"] == init)]
    rows = rows.sort_values("label_fraction")
    ax.errorbar(rows["label_fraction"], rows["mean"], yerr=rows["std"].fillna(0),
                label=f"{model} / {init}", color=color, marker=markers[i % len(markers)],
                capsize=3, linewidth=1.5, markersize=5)
  fractions = sorted(dataset["label_fraction"].unique())
  ax.set_xscale("log")
  ax.set_xticks(fractions, [tables.format_fraction(f) for f in fractions])
  ax.minorticks_off()
  ax.set_xlabel("labelled training data (fraction of the training set, log scale)")
  ax.set_ylabel(f"test {metric_name(dataset['metric'].iloc[0])}")
  ax.set_title(f"{title}\nmean ± s.d. over trials")
  ax.legend(title="model / init", fontsize="small", loc="upper left",
            bbox_to_anchor=(1.01, 1))
  ax.grid(alpha=0.3)
  return _save(fig, path)


def trial_points(setting_trials: pd.DataFrame, title: str, path: pathlib.Path) -> pathlib.Path:
  """Box plot of each model/init's trials with the trials drawn over it."""
  trials = setting_trials.dropna(subset=["value"])
  candidates = sorted(set(zip(trials["model"], trials["init_label"])))
  fig = mpl_figure.Figure(figsize=(max(6.0, 1.0 + 1.1 * len(candidates)), 4.8))
  ax = fig.add_subplot()
  values = [trials[(trials["model"] == m) & (trials["init_label"] == i)]["value"].to_numpy()
            for m, i in candidates]
  crowded = len(candidates) > 4
  ax.boxplot(values, tick_labels=[f"{m} / {i}" if crowded else f"{m}\n{i}"
                                  for m, i in candidates],
             widths=0.5, medianprops={"color": "black"}, showfliers=False)
  jitter = np.random.default_rng(0)  # fixed: identical figures from identical results
  for position, (points, color) in enumerate(zip(values, _colors(len(values))), start=1):
    ax.scatter(position + jitter.uniform(-0.12, 0.12, len(points)), points, color=color,
               edgecolor="black", linewidth=0.5, zorder=3, s=28)
  if crowded:
    for label in ax.get_xticklabels():
      label.set_rotation(30)
      label.set_horizontalalignment("right")
  ax.set_ylabel(f"test {metric_name(trials['metric'].iloc[0])}")
  ax.set_title(f"{title}\none point per trial (seed); box: quartiles and median")
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def reliability_diagrams(panels: list[tuple[str, dict, float, float]], title: str,
                         path: pathlib.Path) -> pathlib.Path:
  """One panel per candidate (label, post_hoc.PostHoc.reliability entry, mean ECE before,
  after): fraction of positives against mean predicted probability in each non-empty
  equal-width bin, before and after the temperature, over the share of predictions per
  bin."""
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  fig = mpl_figure.Figure(figsize=(4.2 * columns, 4.0 * rows + 0.7), layout="constrained")
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax, (label, diagram, ece_before, ece_after) in zip(axes.flat, panels):
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    count = diagram["before"]["count"]
    edges = np.linspace(0, 1, len(count) + 1)
    ax.bar(edges[:-1], count / max(count.sum(), 1), width=np.diff(edges), align="edge",
           color="lightgray", edgecolor="white", label="share of predictions (before)")
    for when, ece, color, marker in (("before", ece_before, "tab:red", "o"),
                                     ("after", ece_after, "tab:blue", "s")):
      bins = diagram[when]
      filled = bins["count"] > 0
      ax.plot(bins["mean_predicted"][filled], bins["fraction_positive"][filled],
              color=color, marker=marker, markersize=4, linewidth=1.5,
              label=f"{when} temperature (ECE {tables.format_value(ece, 3)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{label}\n{diagram['what']}, {diagram['trials']} trial(s)", fontsize=9)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction of positives")
    ax.legend(fontsize="x-small", loc="upper left")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(f"{title}\ntest predictions in 15 equal-width bins, pooled over trials")
  return _save(fig, path)


def cd_diagram(analysis: stats.RankAnalysis, title: str, path: pathlib.Path,
               alpha: float = 0.05) -> pathlib.Path:
  """Critical-difference diagram: average ranks, Nemenyi non-significance crossbars."""
  count = len(analysis.average_ranks)
  # The diagram stacks labels one data unit apart below the rank axis; half an inch
  # per unit keeps labels apart and leaves room for the CD bar above the ticks.
  fig = mpl_figure.Figure(figsize=(9.0, 0.5 * (math.ceil(count / 2) + 4)))
  ax = fig.add_subplot()
  scikit_posthocs.critical_difference_diagram(
      analysis.average_ranks, analysis.nemenyi, ax=ax, alpha=alpha,
      label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}",
      label_props={"fontsize": 9})
  # scikit-posthocs puts its CD bar half a unit up, into the tick labels: draw it higher.
  best, cd = analysis.average_ranks.iloc[0], analysis.critical_difference
  ax.plot([best, best + cd], [1.3, 1.3], color="black", linewidth=2)
  ax.text(best + cd / 2, 1.4, f"critical difference (Nemenyi) = {cd:.2f}", ha="center",
          va="bottom", fontsize=9)
  ax.set_ylim(top=1.9)
  ax.set_title(f"{title}\naverage rank (1 = best) over {analysis.scores.shape[0]} data sets; "
               f"bars join candidates not different by Nemenyi (α = {alpha:g})",
               fontsize=10)
  return _save(fig, path)
