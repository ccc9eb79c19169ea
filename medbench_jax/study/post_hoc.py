"""What trials recorded after their test (Task.post_hoc in result.json), as report frames.

Classification trials record per-class thresholds chosen on validation and the test
metrics at them with bootstrap intervals (`operating_points`), and the test calibration
before and after a temperature fitted on validation (`calibration`); segmentation trials
record HD95 and ASSD (`surface`). Runs finished before trials recorded them have none:
their groups are listed as not recorded, never filled in.

Each trial is read from the report's trials frame (runs.trials_frame: a seed repeated in
a group is used once), so these frames cover the same trials as the headline tables.
Reliability diagrams pool their equal-width bins over a group's trials (and, for
multi-label and binary sets, over classes; multi-class sets: the top label) by the
bins' counts, which is exactly the diagram of all those predictions together.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from medbench_jax.study import runs

OPERATING_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy",
                     "auprc")
CALIBRATION_NUMBERS = ("ece_uniform", "ece_quantile", "brier")
SURFACE_NUMBERS = ("hd95", "assd", "mean_hd95", "mean_assd")
# The trial record's key of each kind of post-hoc result, and the task that has it.
RECORDS = {"operating_points": "classification", "calibration": "classification",
           "surface": "segmentation"}


@dataclasses.dataclass
class PostHoc:
  """The post-hoc frames of a sweep: one row per trial (and class for operating points)
  with the group keys (runs.KEY_COLUMNS) and seed; `not_recorded[kind]` the groups of
  the kind's task that have trials without it; `reliability` per group that has it:
  {"what": "top label" | "all classes pooled", "trials": n, "before" | "after":
  {"count", "mean_predicted", "fraction_positive"} (NumPy arrays, NaN in empty bins)}."""
  operating_points: pd.DataFrame
  calibration: pd.DataFrame
  surface: pd.DataFrame
  reliability: dict[runs.Key, dict[str, Any]]
  not_recorded: dict[str, list[runs.Key]]


def _trial_records(collection: runs.Collection, trials: pd.DataFrame
                   ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """(the frame's keys and seed, the trial's record) for every trial of `trials`."""
  by_workdir = {str(run.workdir): run for run in collection.runs}
  for _, row in trials.iterrows():
    record = by_workdir[row["workdir"]].results["trials"][int(row["trial"])]
    yield {**{k: row[k] for k in runs.KEY_COLUMNS}, "seed": row["seed"]}, record


def _nan(value: Any) -> float:
  return np.nan if value is None else float(value)


def _pooled(diagrams: list[dict[str, list]]) -> dict[str, np.ndarray]:
  """Equal-width reliability bins of several diagrams (same edges) pooled by counts."""
  count = np.sum([d["count"] for d in diagrams], axis=0).astype(np.float64)
  pooled = {"count": count}
  for key in ("mean_predicted", "fraction_positive"):
    weighted = np.sum([np.nan_to_num(np.array(d[key], np.float64)) * np.array(d["count"])
                       for d in diagrams], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
      pooled[key] = np.where(count > 0, weighted / np.maximum(count, 1), np.nan)
  return pooled


def collect(collection: runs.Collection, trials: pd.DataFrame) -> PostHoc:
  """The post-hoc frames of the trials in `trials` (runs.trials_frame of `collection`)."""
  points, calibrations, surfaces = [], [], []
  diagrams: dict[runs.Key, dict[str, Any]] = {}
  missing: dict[str, set[runs.Key]] = {kind: set() for kind in RECORDS}
  for keys, record in _trial_records(collection, trials):
    group = tuple(keys[k] for k in runs.KEY_COLUMNS)
    for kind, task in RECORDS.items():
      if keys["task"] == task and not record.get(kind):
        missing[kind].add(group)
    if record.get("operating_points"):
      rule = record.get("thresholds", {}).get("rule", record["operating_points"]["method"])
      for name, values in record["operating_points"]["classes"].items():
        row = {**keys, "class": name, "rule": rule, "threshold": _nan(values["threshold"])}
        for metric in OPERATING_METRICS:
          row.update({metric: _nan(values[metric]["value"]),
                      f"{metric}_low": _nan(values[metric]["ci_low"]),
                      f"{metric}_high": _nan(values[metric]["ci_high"])})
        points.append(row)
    if record.get("calibration"):
      calibration = record["calibration"]
      row = {**keys, "temperature": calibration["temperature"]}
      for when in ("before", "after"):
        row.update({f"{k}_{when}": _nan(calibration[when][k]) for k in CALIBRATION_NUMBERS})
      calibrations.append(row)
      group_diagrams = diagrams.setdefault(group, {"before": [], "after": [], "trials": 0})
      group_diagrams["trials"] += 1
      for when in ("before", "after"):
        by_name = calibration["reliability"][when]
        group_diagrams["what"] = ("top label" if "top_label" in by_name
                                  else "all classes pooled")
        group_diagrams[when] += ([by_name["top_label"]] if "top_label" in by_name
                                 else list(by_name.values()))
    if record.get("surface"):
      surfaces.append({**keys, "dice": _nan(record["test"].get("dice")),
                       **{k: _nan(record["surface"][k]) for k in SURFACE_NUMBERS},
                       "one_empty": record["surface"].get("surface_one_empty")})
  reliability = {group: {"what": d["what"], "trials": d["trials"],
                         "before": _pooled(d["before"]), "after": _pooled(d["after"])}
                 for group, d in diagrams.items()}
  base = [*runs.KEY_COLUMNS, "seed"]
  return PostHoc(
      operating_points=pd.DataFrame(points, columns=[
          *base, "class", "rule", "threshold",
          *(f"{m}{s}" for m in OPERATING_METRICS for s in ("", "_low", "_high"))]),
      calibration=pd.DataFrame(calibrations, columns=[
          *base, "temperature",
          *(f"{k}_{w}" for w in ("before", "after") for k in CALIBRATION_NUMBERS)]),
      surface=pd.DataFrame(surfaces, columns=[*base, "dice", *SURFACE_NUMBERS, "one_empty"]),
      reliability=reliability,
      not_recorded={kind: sorted(groups) for kind, groups in missing.items()})
