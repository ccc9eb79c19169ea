"""One sweep's report: CSV tables, Markdown with statistics, PNG plots.

`build` reads every run below a sweep root (runs.py) and writes to OUT:
  trials.csv       one row per trial: key, seed, the run's metric (value), every test metric
  summary.csv      task,dataset,model,init,label_fraction,metric,mean,std,n,p_value,std_paper
  tests.csv        every test against the baseline, per table, with Holm and BH adjustments
  bootstrap.csv    per trial with saved predictions: metric and its 95% bootstrap interval
  delong.csv       per class, DeLong's test of each trial against the baseline's (same seed)
  ranks_*.csv      per task and label fraction over data sets: Nemenyi and Conover p-values
  probe.csv        transferability estimates beside fine-tuned means (with --probe), and
  probe_correlations.csv  their rank correlations with the fine-tuned means
  operating_points.csv  per trial and class: the threshold chosen on validation and the
                   test metrics at it with their bootstrap intervals
  calibration.csv  per trial: ECE and Brier score before and after the temperature
  surface.csv      per segmentation trial: HD95 and ASSD, pooled and mean over images
  problems.csv     runs missing, failed, blocked, incomplete or otherwise not used as asked
  efficiency.csv   per run: device-hours, runs per device-hour, MFU (study/efficiency.py)
  report.md        all of it as tables, with plots/*.png (unless with_plots=False)
Group keys in CSVs are exactly as in results.json; tables and plots show an init by a
short label (tables.readable_inits), which --baseline accepts too. Without a baseline
there are no p-values, corrections or DeLong tests.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import pathlib
import tempfile

from etils import epath
import pandas as pd

from medbench_jax import paths
from medbench_jax.study import efficiency
from medbench_jax.study import plots
from medbench_jax.study import post_hoc
from medbench_jax.study import predictions
from medbench_jax.study import runs
from medbench_jax.study import stats
from medbench_jax.study import tables
from medbench_jax.study import transferability

SUMMARY_COLUMNS = [*runs.KEY_COLUMNS, "metric", "mean", "std", "n", "p_value", "std_paper"]
PROBLEM_COLUMNS = ["kind", "run", "workdir", "detail"]
_TEST_NAMES = {"student": "two-sample Student t-test", "welch": "Welch's t-test",
               "paired": "paired t-test (by seed)"}


@dataclasses.dataclass
class Report:
  """What `build` wrote: the report folder (local, or an epath.Path in a bucket)."""
  out: pathlib.Path | epath.Path
  num_runs: int
  num_trials: int
  problems: list[runs.Problem]
  plots: list[pathlib.Path | epath.Path]


def _title(task: str, dataset: str, fraction: float | None = None) -> str:
  title = f"{dataset} ({task})"
  return title if fraction is None else f"{title}, {tables.format_fraction(fraction)} labels"


class _Writer:
  """Collects report.md sections and plots while the report is built."""

  def __init__(self, out: pathlib.Path, with_plots: bool):
    self.out = out
    self.with_plots = with_plots
    self.lines: list[str] = []
    self.plots: list[pathlib.Path] = []

  def add(self, *lines: str) -> None:
    self.lines += lines

  def plot(self, draw, caption: str, name: str, *args) -> None:
    if not self.with_plots:
      return
    path = draw(*args, caption, self.out / "plots" / name)
    self.plots.append(path)
    self.add(f"![{caption}](plots/{name})", "")

  def csv(self, frame: pd.DataFrame, name: str) -> None:
    frame.to_csv(self.out / name, index=False)


def _problems_section(writer: _Writer, problems: Sequence[runs.Problem]) -> None:
  writer.add(f"## Runs not used as asked ({len(problems)})", "")
  if not problems:
    writer.add("None: every run finished all its trials.", "")
    return
  writer.add(tables.markdown_table(PROBLEM_COLUMNS,
                                   [[getattr(p, c) for c in PROBLEM_COLUMNS]
                                    for p in problems]), "")


def _results_sections(writer: _Writer, summary: pd.DataFrame, trials: pd.DataFrame,
                      baseline: tuple[str, str] | None, alpha: float) -> pd.DataFrame:
  """Per task and data set: the two table layouts and their plots; returns the tests."""
  tests = []
  for (task, dataset), rows in summary.groupby(["task", "dataset"], sort=True):
    metric = plots.metric_name(rows["metric"].iloc[0])
    writer.add(f"## {dataset} ({task}): test {metric}", "")
    for fraction, setting in rows.groupby("label_fraction", sort=True):
      title = _title(task, dataset, fraction)
      writer.add(f"### {tables.format_fraction(fraction)} labels: models × inits", "")
      text, table_tests = tables.models_by_inits(setting, summary, baseline, alpha)
      tests.append(table_tests.assign(table=f"models x inits: {title}"))
      writer.add(text)
      suffix = (task, dataset, f"{fraction:g}")
      writer.plot(plots.bars, title, plots.file_name("bars", *suffix), setting)
      setting_trials = trials[(trials["task"] == task) & (trials["dataset"] == dataset) &
                              (trials["label_fraction"] == fraction)]
      writer.plot(plots.trial_points, title, plots.file_name("trials", *suffix),
                  setting_trials)
    if rows["label_fraction"].nunique() > 1:
      title = _title(task, dataset)
      writer.add(f"### {metric} × label fraction", "")
      text, table_tests = tables.candidates_by_fractions(rows, summary, baseline, alpha)
      tests.append(table_tests.assign(table=f"label fractions: {title}"))
      writer.add(text)
      writer.plot(plots.efficiency_curves, f"{title}: annotation efficiency",
                  plots.file_name("efficiency", task, dataset), rows)
  if not tests:
    return pd.DataFrame()
  return pd.concat(tests, ignore_index=True)


def _ranks_sections(writer: _Writer, summary: pd.DataFrame, alpha: float) -> None:
  writer.add("## Ranks across data sets", "",
             "Per task and label fraction: each candidate's mean over trials is ranked "
             "within each data set (1 = best, ties averaged); Friedman test (scipy) over "
             "data sets; Nemenyi post-hoc (scikit-posthocs) with Demšar's critical "
             "difference, Conover post-hoc (Holm-adjusted) in the CSV beside it. Only "
             "candidates with results on the same data sets are compared.", "")
  candidates = summary.assign(candidate=summary["model"] + " / " + summary["init_label"])
  for (task, fraction), rows in candidates.groupby(["task", "label_fraction"], sort=True):
    title = f"{task}, {tables.format_fraction(fraction)} labels"
    writer.add(f"### {title}", "")
    scores = rows.pivot_table(index="dataset", columns="candidate", values="mean",
                              aggfunc="first", dropna=False)
    analysis = stats.rank_analysis(scores, alpha)
    if isinstance(analysis, str):
      writer.add(f"Not tested: {analysis}.", "")
      continue
    stem = plots.file_stem("ranks", task, f"{fraction:g}")
    for name in ("nemenyi", "conover"):
      getattr(analysis, name).to_csv(writer.out / f"{stem}_{name}.csv")
    writer.add(tables.markdown_table(
        ["candidate", "average rank"],
        [[c, f"{r:.2f}"] for c, r in analysis.average_ranks.items()]), "",
               f"Friedman χ² = {analysis.statistic:.3f}, p = {tables.format_p(analysis.p_value)} "
               f"over {analysis.scores.shape[0]} data sets; Nemenyi critical difference "
               f"{analysis.critical_difference:.3f} (α = {alpha:g}); pairwise p-values in "
               f"`{stem}_nemenyi.csv` and `{stem}_conover.csv`.", "")
    for removed in analysis.removed:
      writer.add(f"- left out: {removed}")
    writer.add("")
    writer.plot(plots.cd_diagram, f"{title}: critical-difference diagram",
                f"{stem}_cd.png", analysis)


_OPERATING_HEADERS = {"sensitivity": "sensitivity", "specificity": "specificity",
                      "ppv": "PPV", "npv": "NPV", "f1": "F1",
                      "balanced_accuracy": "balanced accuracy", "auprc": "AUPRC"}
_NOT_RECORDED = "not recorded (trials finished before they recorded it)"


def _not_recorded_lines(writer: _Writer, groups: Sequence[runs.Key], labels: dict) -> None:
  """One line per group without the section's records."""
  for task, dataset, model, init, fraction in groups:
    writer.add(f"- {model} / {labels.get(init, init)}, "
               f"{_title(task, dataset, fraction)}: {_NOT_RECORDED}")
  if groups:
    writer.add("")


def _operating_points_section(writer: _Writer, found: post_hoc.PostHoc, labels: dict) -> None:
  frame = found.operating_points
  writer.add("## Operating points at thresholds chosen on validation", "",
             "Per class: the threshold each trial chose on its validation predictions by "
             "the rule shown (`youden`: maximum sensitivity + specificity - 1, `f1`, or a "
             "target `sensitivity:T` / `specificity:T`), and the test metrics at it. Cells: "
             "the mean over trials, in brackets the mean over trials of each trial's "
             "percentile bootstrap interval (95%, test examples resampled); n trials.", "")
  if frame.empty:
    writer.add(f"Operating points: {_NOT_RECORDED}, for every classification run.", "")
    return
  for (task, dataset, fraction), setting in frame.groupby(stats.SETTING_COLUMNS, sort=True):
    writer.add(f"### {_title(task, dataset, fraction)}", "")
    rows = []
    for (model, init, name), trials in setting.groupby(["model", "init", "class"],
                                                       sort=True):
      cells = [tables.format_interval(trials[m].mean(), trials[f"{m}_low"].mean(),
                                      trials[f"{m}_high"].mean(), 3)
               for m in post_hoc.OPERATING_METRICS]
      rows.append([model, labels.get(init, init), name, ", ".join(sorted(set(trials["rule"]))),
                   tables.format_value(trials["threshold"].mean()), *cells, len(trials)])
    writer.add(tables.markdown_table(
        ["model", "init", "class", "rule", "threshold", *_OPERATING_HEADERS.values(), "n"],
        rows), "")
  _not_recorded_lines(writer, found.not_recorded["operating_points"], labels)


def _calibration_section(writer: _Writer, found: post_hoc.PostHoc, labels: dict) -> None:
  frame = found.calibration
  writer.add("## Calibration: a temperature fitted on validation", "",
             "Test expected calibration error (15 equal-width and 15 equal-mass bins; "
             "multi-label and binary sets: the mean over classes, multi-class sets: the top "
             "label) and Brier score, before → after dividing the logits by the temperature "
             "that minimises each trial's validation negative log-likelihood. Cells: means "
             "over trials; temperature: mean ± std (ddof=1). Reliability diagrams pool the "
             "equal-width bins of a candidate's trials (and classes).", "")
  if frame.empty:
    writer.add(f"Calibration: {_NOT_RECORDED}, for every classification run.", "")
    return
  for (task, dataset, fraction), setting in frame.groupby(stats.SETTING_COLUMNS, sort=True):
    title = _title(task, dataset, fraction)
    writer.add(f"### {title}", "")
    rows, panels = [], []
    for (model, init), trials in setting.groupby(["model", "init"], sort=True):
      label = labels.get(init, init)
      rows.append([model, label, tables.format_spread(trials["temperature"], 3),
                   *(tables.format_change(trials[f"{k}_before"].mean(),
                                          trials[f"{k}_after"].mean())
                     for k in post_hoc.CALIBRATION_NUMBERS), len(trials)])
      diagram = found.reliability[(task, dataset, model, init, fraction)]
      panels.append((f"{model} / {label}", diagram,
                     trials["ece_uniform_before"].mean(), trials["ece_uniform_after"].mean()))
    writer.add(tables.markdown_table(
        ["model", "init", "temperature", "ECE equal-width", "ECE equal-mass", "Brier", "n"],
        rows), "")
    writer.plot(plots.reliability_diagrams, f"{title}: reliability",
                plots.file_name("reliability", task, dataset, f"{fraction:g}"), panels)
  _not_recorded_lines(writer, found.not_recorded["calibration"], labels)


def _surface_section(writer: _Writer, found: post_hoc.PostHoc, labels: dict) -> None:
  frame = found.surface
  writer.add("## Surface distances (segmentation)", "",
             "HD95 (95th percentile) and ASSD (mean) of the symmetric surface distances, in "
             "pixels of the stored masks: pooled over all test images and classes, and the "
             "mean over images of each image's value, as Dice is pooled. Empty masks: both "
             "empty score 0; one empty scores the image diagonal (the largest distance the "
             "image allows). Cells: mean ± std (ddof=1) over trials; one-empty: image-class "
             "pairs with exactly one empty mask, summed over trials.", "")
  if frame.empty:
    writer.add(f"Surface distances: {_NOT_RECORDED}, for every segmentation run.", "")
    return
  for (task, dataset, fraction), setting in frame.groupby(stats.SETTING_COLUMNS, sort=True):
    writer.add(f"### {_title(task, dataset, fraction)}", "")
    rows = [[model, labels.get(init, init),
             *(tables.format_spread(trials[k]) for k in ("dice", *post_hoc.SURFACE_NUMBERS)),
             int(trials["one_empty"].sum()), len(trials)]
            for (model, init), trials in setting.groupby(["model", "init"], sort=True)]
    writer.add(tables.markdown_table(
        ["model", "init", "Dice (pooled)", "HD95 (pooled)", "ASSD (pooled)",
         "HD95 (mean over images)", "ASSD (mean over images)", "one-empty", "n"], rows), "")
  _not_recorded_lines(writer, found.not_recorded["surface"], labels)


def _probe_section(writer: _Writer, probe: pd.DataFrame, summary: pd.DataFrame) -> None:
  labels = tables.readable_inits([*summary["init"], *probe["init"]])
  merged = probe.merge(summary[[*runs.KEY_COLUMNS, "mean", "std", "std_paper", "n"]],
                       on=list(runs.KEY_COLUMNS), how="left")
  merged["init_label"] = merged["init"].map(labels)
  writer.csv(merged.drop(columns="init_label"), "probe.csv")
  writer.add("## Transferability estimates", "",
             "LogME and linear-probe AUC of each candidate's frozen features beside its "
             "fine-tuned mean; rank correlations (Spearman's ρ, weighted Kendall's τ) "
             "where at least 3 candidates have both.", "")
  correlations = []
  for (task, dataset, fraction), rows in merged.groupby(stats.SETTING_COLUMNS, sort=True):
    writer.add(f"### {_title(task, dataset, fraction)}", "")
    fine_tuned = [tables.format_cell(r) if not pd.isna(r["mean"])
                  else "— (no run)" for _, r in rows.iterrows()]
    writer.add(tables.markdown_table(
        ["model", "init", "LogME", "linear probe AUC", f"fine-tuned {tables.CELLS}"],
        [[r["model"], r["init_label"], tables.format_value(r["logme"]),
          tables.format_value(r["linear_probe"]), cell]
         for (_, r), cell in zip(rows.iterrows(), fine_tuned)]), "")
    for score in transferability.PROBE_SCORES:
      both = rows.dropna(subset=[score, "mean"])
      if len(both) < 3:
        writer.add(f"- {score}: {len(both)} candidate(s) with a score and a fine-tuned "
                   "mean; no rank correlation")
        continue
      result = transferability.rank_correlations(both[score], both["mean"])
      correlations.append({"task": task, "dataset": dataset, "label_fraction": fraction,
                           "score": score, "candidates": len(both), **result})
      writer.add(f"- {score}: Spearman ρ = {result['spearman']:.3f} (p = "
                 f"{tables.format_p(result['spearman_p'])}), weighted τ = "
                 f"{result['weighted_tau']:.3f}, over {len(both)} candidates")
    writer.add("")
  writer.csv(pd.DataFrame(correlations, columns=[
      *stats.SETTING_COLUMNS, "score", "candidates", "spearman", "spearman_p",
      "weighted_tau"]), "probe_correlations.csv")


def _bootstrap_section(writer: _Writer, intervals: pd.DataFrame, num_resamples: int,
                       seed: int) -> None:
  writer.add("## Bootstrap 95% confidence intervals (per trial)", "",
             f"Test examples resampled with replacement {num_resamples} times (seed "
             f"{seed}, the same resamples for every run on a test set); percentile "
             "intervals of each trial's metric.", "")
  if intervals.empty:
    writer.add("No trial has saved predictions.", "")
    return
  intervals = intervals.assign(
      cell=[f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in
            zip(intervals["value"], intervals["ci_low"], intervals["ci_high"])],
      seed=[f"seed {s}" for s in intervals["seed"]],
      labels=intervals["label_fraction"].map(tables.format_fraction))
  for (task, dataset), rows in intervals.groupby(["task", "dataset"], sort=True):
    wide = rows.pivot_table(index=["label_fraction", "labels", "model", "init_label"],
                            columns="seed", values="cell", aggfunc="first").reset_index()
    seeds = [c for c in wide.columns if str(c).startswith("seed ")]
    writer.add(f"### {dataset} ({task}): {rows['metric'].iloc[0]} [95% interval]", "",
               tables.frame_table(wide.fillna("—"), {
                   "labels": "labels", "model": "model", "init_label": "init",
                   **{s: s for s in seeds}}), "")


def _delong_section(writer: _Writer, delong: pd.DataFrame, alpha: float) -> None:
  writer.add("## DeLong tests against the baseline (per class, same seed)", "",
             "Cells: AUC minus the baseline's AUC on the same test set, DeLong's p-value, "
             f"`†` where the Holm-adjusted p (over the tests of one table) < {alpha:g}.",
             "")
  if delong.empty:
    writer.add("No pair of classification trials with saved predictions.", "")
    return
  delong = delong.assign(cell=[
      f"{a - b:+.4f} (p={tables.format_p(p)}){' †' if h < alpha else ''}"
      for a, b, p, h in zip(delong["auc"], delong["baseline_auc"], delong["p_value"],
                            delong["p_holm"])])
  for (task, dataset, fraction), rows in delong.groupby(stats.SETTING_COLUMNS, sort=True):
    wide = rows.pivot_table(index=["model", "init_label", "seed"], columns="class",
                            values="cell", aggfunc="first").reset_index()
    classes = [c for c in wide.columns if c not in ("model", "init_label", "seed")]
    writer.add(f"### {_title(task, dataset, fraction)}", "", tables.frame_table(
        wide.fillna("—"), {"model": "model", "init_label": "init", "seed": "seed",
                           **{c: c for c in classes}}), "")


def build(runs_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          baseline: str | None = None, test: str = "student",
          probe: str | os.PathLike | None = None, num_resamples: int = 1000, seed: int = 0,
          alpha: float = 0.05, with_plots: bool = True) -> Report:
  """Writes the report of every run below `runs_dir` into `out_dir` (module docstring).

  Each may be a local folder or gs://...; a report for a bucket is written to a local
  scratch folder first (pandas and matplotlib write local files) and then copied there.
  """
  if paths.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix="medbench_report_") as scratch:
      local = build(runs_dir, scratch, baseline=baseline, test=test, probe=probe,
                    num_resamples=num_resamples, seed=seed, alpha=alpha,
                    with_plots=with_plots)
      out = paths.as_path(out_dir)
      for path in sorted(p for p in local.out.rglob("*") if p.is_file()):
        target = out / path.relative_to(local.out).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return dataclasses.replace(
        local, out=out, plots=[out / p.relative_to(local.out).as_posix() for p in local.plots])
  if test not in stats.TESTS:
    raise ValueError(f"test must be one of {', '.join(stats.TESTS)}; got {test!r}")
  probe_scores = transferability.read_probe_file(probe) if probe is not None else None
  collection = runs.collect(runs_dir)
  trials = runs.trials_frame(collection)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  writer = _Writer(out, with_plots)
  labels = tables.readable_inits(trials["init"])
  trials["init_label"] = trials["init"].map(labels)
  summary = stats.summarize(trials)
  base = stats.resolve_baseline(summary, baseline, labels) if baseline else None
  summary["p_value"], unpaired = stats.compare_to_baseline(trials, summary, base, test)
  asked = collection.asked_trials()
  summary["asked"] = [asked.get(tuple(r[c] for c in runs.KEY_COLUMNS))
                      for _, r in summary.iterrows()]
  summary["init_label"] = summary["init"].map(labels)
  problems = collection.problems + unpaired

  writer.csv(trials.drop(columns="init_label"), "trials.csv")
  writer.csv(summary[SUMMARY_COLUMNS], "summary.csv")
  intervals = pd.DataFrame()
  if num_resamples > 0:
    intervals, found = predictions.bootstrap_table(trials, collection.root, num_resamples,
                                                   seed)
    problems += found
    intervals["init_label"] = intervals["init"].map(labels)
    writer.csv(intervals.drop(columns="init_label"), "bootstrap.csv")
  delong = pd.DataFrame()
  if base is not None:
    delong, found = predictions.delong_table(trials, base, collection.root)
    problems += found
    delong["init_label"] = delong["init"].map(labels)
    writer.csv(delong.drop(columns="init_label"), "delong.csv")

  baseline_text = (f"`{base[0]}` / `{labels[base[1]]}` (init `{base[1]}`), "
                   f"{_TEST_NAMES[test]}" if base else "none (no p-values)")
  writer.add(f"# Report: {collection.root.name}", "",
             f"{len(collection.runs)} runs, {len(trials)} trials below `{collection.root}`. "
             f"Baseline: {baseline_text}.", "",
             "Cells: mean ± sample standard deviation (ddof=1) over trials, in brackets the "
             "population standard deviation (ddof=0) that the paper's tables print (its "
             "np.std), to compare with them (n; n/m where m "
             f"were asked). Against the baseline of the same setting: `*` p < {alpha:g}, "
             f"`†` Holm-adjusted p < {alpha:g}, `‡` Benjamini-Hochberg-adjusted p < "
             f"{alpha:g}, corrections over each table's tests; **bold**: the baseline.", "")
  _problems_section(writer, problems)
  tests = _results_sections(writer, summary, trials, base, alpha)
  writer.csv(tests.reindex(columns=[
      "table", *runs.KEY_COLUMNS, "metric", "mean", "delta", "p_value", "p_holm", "p_bh"]),
             "tests.csv")
  _ranks_sections(writer, summary, alpha)
  found = post_hoc.collect(collection, trials)
  for name, frame in (("operating_points", found.operating_points),
                      ("calibration", found.calibration), ("surface", found.surface)):
    writer.csv(frame, f"{name}.csv")
  if (trials["task"] == "classification").any():
    _operating_points_section(writer, found, labels)
    _calibration_section(writer, found, labels)
  if (trials["task"] == "segmentation").any():
    _surface_section(writer, found, labels)
  if probe_scores is not None:
    _probe_section(writer, probe_scores, summary)
  if num_resamples > 0:
    _bootstrap_section(writer, intervals, num_resamples, seed)
  if base is not None:
    _delong_section(writer, delong, alpha)
  writer.add(*efficiency.section(collection, out))
  (out / "report.md").write_text("\n".join(writer.lines).rstrip() + "\n")
  pd.DataFrame([dataclasses.asdict(p) for p in problems], columns=PROBLEM_COLUMNS).to_csv(
      out / "problems.csv", index=False)
  return Report(out, len(collection.runs), len(trials), problems, writer.plots)
