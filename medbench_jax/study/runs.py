"""Finds a sweep's runs, their trials, and everything wrong with them.

A run is a workdir holding `results.json` (docs/architecture.md). Below a sweep root the runs are
every results.json found, together with the points of `sweep.json` where the sweep
runner wrote one. A point whose workdir has no results.json is listed as failed,
blocked or running when its `status.json` says so (with its reason), else as missing
(naming any unfinished point it depends on). A run with fewer trials than asked (the
sweep point's num_trials, else its config.num_trials) is used and listed as
incomplete. Runs of the same task, dataset, model, init and label fraction found in
several workdirs are one group; a seed found twice in a group is used once and the
repeat listed. Nothing is left out without a line in the problem list.

Trial K of a run is `trials[K]` in its results.json, with its saved predictions in
`WORKDIR/trial_K/test_predictions.npz`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
import pandas as pd

from medbench_jax import paths

KEY_COLUMNS = ("task", "dataset", "model", "init", "label_fraction")
_REQUIRED = ("task", "metric", "dataset", "model", "init", "label_fraction", "trials")
_UNFINISHED_STATES = ("failed", "blocked", "running")

Key = tuple[str, str, str, str, float]


@dataclasses.dataclass(frozen=True)
class Problem:
  """A run the report could not use as asked, and why."""
  kind: str  # missing|failed|blocked|running|incomplete|invalid|duplicate_seed|...
  run: str  # the sweep point's name, else the run's folder below the sweep root
  workdir: str
  detail: str


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished workdir."""
  name: str
  workdir: epath.Path
  results: dict[str, Any]
  expected_trials: int | None

  @property
  def key(self) -> Key:
    return tuple(self.results[k] for k in KEY_COLUMNS)


@dataclasses.dataclass
class Collection:
  root: epath.Path
  runs: list[Run]
  problems: list[Problem]

  def asked_trials(self) -> dict[Key, int | None]:
    """Trials asked per group: the sum over its runs, None where any run does not say."""
    asked = {}
    for run in self.runs:
      previous = asked.get(run.key, 0)
      asked[run.key] = (None if previous is None or run.expected_trials is None
                        else previous + run.expected_trials)
    return asked


def display_path(root: epath.Path, workdir: epath.Path) -> str:
  """`workdir` relative to the sweep root where it lies below it."""
  try:
    return str(workdir.relative_to(root))
  except ValueError:
    return str(workdir)


def run_label(key: Key) -> str:
  task, dataset, model, init, fraction = key
  return f"{model} / {init}, {dataset} ({task}), label fraction {fraction:g}"


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def _check_results(results: Any, path: epath.Path) -> None:
  if not isinstance(results, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(results).__name__}")
  missing = [k for k in _REQUIRED if k not in results]
  if missing:
    raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
  if not isinstance(results["label_fraction"], (int, float)):
    raise ValueError(f"{path}: label_fraction must be a number, got "
                     f"{results['label_fraction']!r}")
  if not isinstance(results["trials"], list):
    raise ValueError(f"{path}: 'trials' must be a list")
  for k, trial in enumerate(results["trials"]):
    for field in ("seed", "test"):
      if field not in trial:
        raise ValueError(f"{path}: trials[{k}] has no '{field}'")
    if results["metric"] not in trial["test"]:
      raise ValueError(f"{path}: trials[{k}].test has no '{results['metric']}' (the run's "
                       "metric); null is how results.json writes an undefined one")


class _Collector:
  """Accumulates runs and problems while walking one sweep root."""

  def __init__(self, root: epath.Path):
    self.root = root
    self.runs: list[Run] = []
    self.problems: list[Problem] = []
    self.seen: set[epath.Path] = set()

  def problem(self, kind: str, name: str, workdir: epath.Path, detail: str) -> None:
    logging.warning("%s: %s (%s): %s", kind, name, display_path(self.root, workdir), detail)
    self.problems.append(Problem(kind, name, display_path(self.root, workdir), detail))

  def status(self, workdir: epath.Path, name: str) -> dict[str, str] | None:
    path = workdir / "status.json"
    if not path.exists():
      return None
    try:
      status = _read_json(path)
      if not isinstance(status, dict) or "state" not in status:
        raise ValueError(f"{path}: expected {{\"state\": ..., \"reason\": ...}}")
    except ValueError as e:
      self.problem("invalid", name, workdir, str(e))
      return None
    return status

  def add_finished(self, workdir: epath.Path, name: str, expected: int | None) -> None:
    path = workdir / "results.json"
    try:
      results = _read_json(path)
      _check_results(results, path)
    except ValueError as e:
      self.problem("invalid", name, workdir, str(e))
      return
    status = self.status(workdir, name)
    if status and status["state"] in _UNFINISHED_STATES:
      self.problem("status_conflict", name, workdir,
                   f"status.json says {status['state']} ({status.get('reason', '')}) but "
                   "results.json exists; its results are used")
    if expected is None:
      expected = results.get("config", {}).get("num_trials")
    count = len(results["trials"])
    if expected is not None and count < expected:
      self.problem("incomplete", name, workdir, f"{count} of {expected} trials")
    metric = results["metric"]
    for k, trial in enumerate(results["trials"]):
      if trial["test"][metric] is None:
        self.problem("undefined_metric", name, workdir,
                     f"trial {k} (seed {trial['seed']}): {metric} is null; left out of "
                     "mean and std")
    self.runs.append(Run(name, workdir, results, expected))

  def add_unfinished(self, workdir: epath.Path, name: str, waits_for: str = "") -> None:
    status = self.status(workdir, name)
    if status and status["state"] in _UNFINISHED_STATES:
      self.problem(status["state"], name, workdir, status.get("reason", "") or "no reason given")
    else:
      detail = "no results.json"
      if status:
        detail += f"; status.json says {status['state']!r}"
      if waits_for:
        detail += f"; depends on {waits_for}"
      self.problem("missing", name, workdir, detail)


def _sweep_points(root: epath.Path) -> list[dict[str, Any]]:
  path = root / "sweep.json"
  if not path.exists():
    return []
  sweep = _read_json(path)
  points = sweep.get("points") if isinstance(sweep, dict) else None
  if not isinstance(points, list):
    raise ValueError(f"{path}: expected {{\"sweep\": ..., \"points\": [...]}}")
  for i, point in enumerate(points):
    for field in ("name", "workdir"):
      if field not in point:
        raise ValueError(f"{path}: points[{i}] has no '{field}'")
  return points


# Folders of a run that hold no run: not walked into (on a bucket, each is listings).
_RUN_INTERNALS = ("ckpt", "tb")


def _find(root: epath.Path, name: str) -> list[epath.Path]:
  """Every file called `name` below `root`, sorted, skipping checkpoint and TensorBoard
  folders. (epath has no recursive glob, and its walk loses the gs:// of a bucket.)"""
  found, pending = [], [root]
  while pending:
    for entry in pending.pop().iterdir():
      if entry.name == name:
        found.append(entry)
      elif entry.name not in _RUN_INTERNALS and entry.is_dir():
        pending.append(entry)
  return sorted(found)


def collect(root: str | os.PathLike) -> Collection:
  """Every run below `root` (a local folder or gs://...) and every problem found; see the
  module docstring."""
  root = paths.as_path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"Runs folder {root} does not exist or is not a directory.")
  collector = _Collector(root)
  points = _sweep_points(root)
  finished = {p["name"] for p in points if (root / p["workdir"] / "results.json").exists()}
  for point in points:
    workdir = paths.as_path(root / point["workdir"])
    collector.seen.add(workdir)
    if point["name"] in finished:
      collector.add_finished(workdir, point["name"], point.get("num_trials"))
    else:
      waits_for = ", ".join(d for d in point.get("depends_on", []) if d not in finished)
      collector.add_unfinished(workdir, point["name"], waits_for)
  for path in _find(root, "results.json"):
    workdir = path.parent
    if workdir not in collector.seen:
      collector.seen.add(workdir)
      collector.add_finished(workdir, display_path(root, workdir), None)
  for path in _find(root, "status.json"):
    workdir = path.parent
    if workdir not in collector.seen:
      collector.seen.add(workdir)
      collector.add_unfinished(workdir, display_path(root, workdir))
  return Collection(root, collector.runs, collector.problems)


def _number(value: Any) -> float:
  return math.nan if value is None else float(value)


def trials_frame(collection: Collection) -> pd.DataFrame:
  """One row per trial: the run's key, seed, metric value and every test metric.

  A seed already seen in the same group (from another workdir) is left out and listed
  in `collection.problems` as duplicate_seed.
  """
  rows = []
  seen: dict[tuple[Key, Any], str] = {}  # (group, seed) -> the trial that has it
  for run in sorted(collection.runs, key=lambda r: str(r.workdir)):
    results = run.results
    for k, trial in enumerate(results["trials"]):
      first = seen.setdefault((run.key, trial["seed"]), f"{run.name} trial {k}")
      if first != f"{run.name} trial {k}":
        collection.problems.append(Problem(
            "duplicate_seed", run.name, display_path(collection.root, run.workdir),
            f"trial {k}: seed {trial['seed']} already in {first}; this trial is not used"))
        continue
      row = dict(zip(KEY_COLUMNS, run.key))
      row.update(metric=results["metric"], seed=trial["seed"], trial=k,
                 value=_number(trial["test"][results["metric"]]), run=run.name,
                 workdir=str(run.workdir), best_step=trial.get("best_step"),
                 best_val_loss=_number(trial.get("best_val_loss")))
      row.update({name: _number(v) for name, v in trial["test"].items()})
      rows.append(row)
  columns = [*KEY_COLUMNS, "metric", "seed", "trial", "value", "run", "workdir", "best_step",
             "best_val_loss"]
  frame = pd.DataFrame(rows, columns=None if rows else columns)
  metric_columns = sorted(c for c in frame.columns if c not in columns)
  return frame[columns + metric_columns].sort_values(
      [*KEY_COLUMNS, "seed"], kind="stable").reset_index(drop=True)
