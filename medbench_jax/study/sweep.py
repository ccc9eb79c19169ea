"""Sweeps: grids of runs over config keys, their dependencies, and the plan of a sweep root.

A sweep file (configs/sweeps/*.py) defines `get_sweep(arg=None) -> Sweep`, built with
`grid`: the product of axes over any config keys, e.g.

  sweep.grid("configs/resnet50.py:data=chestxray14",
             {"model.name": ["resnet50", "densenet121"],
              "model.init": {"random": "random", "imagenet": "/ckpt/resnet50.pth"},
              "dataset.label_fraction": [0.1, 1.0]},
             fixed={"num_trials": 10})

Axis and fixed keys are config keys (`--config.KEY=VALUE` of medbench_jax.main), `config`
(the config file, `FILE[:ARG]`) or `arg.NAME` (NAME=VALUE added to the config file's
arg, e.g. `arg.data`). An axis is a list of values, labelled by themselves, or a mapping
label -> value (checkpoint paths need one). `run_of(point)` as a value initialises from
an earlier point's run (`run:WORKDIR`, a domain-adaptive chain) and makes the point
depend on it.

A point's name is its labels, `data=chestxray14,model=resnet50,init=imagenet`; its
workdir below the sweep root is the same with `/` for `,`, so both are readable and stay
the same as long as the sweep file does. `plan` resolves a sweep below a root: each
point's workdir, its dependencies in run order, and the config it will run with (every
config file loaded and every override applied and validated before anything starts).

On disk, per point: WORKDIR/status.json (`{"state": queued|running|done|failed|
preempted|blocked, "reason": ...}`) and WORKDIR/log.txt (every attempt's output); per
sweep: ROOT/sweep.json (the plan, read by medbench_jax/study/runs.py).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
import copy
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import re
import signal
import socket
from typing import Any

from etils import epath
import ml_collections

from medbench_jax import config_lib
from medbench_jax import paths

# A workdir is: done (results.json), resumable (a checkpoint or a finished trial), new, or
# blocked (a dependency failed or is blocked).
DONE, RESUMABLE, NEW, BLOCKED = "done", "resumable", "new", "blocked"
# status.json states the runner writes (runs.py reports failed, blocked and running).
QUEUED, RUNNING, FAILED, PREEMPTED = "queued", "running", "failed", "preempted"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
SWEEP_FILE = "sweep.json"
RUN_PREFIX = "run:"

# How a key shows in point names: the config args' names where there are some.
_SHORT_KEYS = {"model.name": "model", "model.init": "init", "dataset.name": "data",
               "dataset.label_fraction": "label_fraction"}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_ERRORS = 20


@dataclasses.dataclass(frozen=True)
class RunOf:
  """The run of the point named `point`: `run:<its workdir>` once the sweep is planned."""
  point: str


def run_of(point: Point | str) -> RunOf:
  """A value that initialises from `point`'s run and makes it a dependency."""
  return RunOf(point.name if isinstance(point, Point) else point)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: a config file, its overrides, and the labels that name it."""
  labels: tuple[tuple[str, str], ...]  # (key as shown, value label), in order
  config: str  # FILE[:ARG]
  overrides: tuple[tuple[str, Any], ...]  # (config key, value)

  @property
  def name(self) -> str:
    return ",".join(f"{key}={label}" for key, label in self.labels)

  @property
  def workdir(self) -> str:
    return "/".join(f"{key}={label}" for key, label in self.labels)

  @property
  def depends_on(self) -> tuple[str, ...]:
    return tuple(v.point for _, v in self.overrides if isinstance(v, RunOf))


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  points: Sequence[Point]


def short_key(key: str) -> str:
  """How `key` shows in point names: model, init, data, label_fraction, arg names, ..."""
  if key.startswith("arg."):
    return key[len("arg."):]
  return _SHORT_KEYS.get(key, key.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
  """A value as medbench_jax.main's `--config.KEY=VALUE` (and config args) parse it."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)
  if isinstance(value, (int, str)):
    return str(value)
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def _label(key: str, value: Any) -> str:
  label = format_value(value)
  if isinstance(value, RunOf) or not _LABEL.match(label):
    raise ValueError(f"Axis {key!r}: value {value!r} cannot name a point; give the axis as "
                     "a mapping {label: value} with labels of letters, digits and ._+-")
  return label


def _axis(key: str, values: Sequence[Any] | Mapping[str, Any]) -> list[tuple[str, Any]]:
  if isinstance(values, Mapping):
    items = list(values.items())
    for label, _ in items:
      if not isinstance(label, str) or not _LABEL.match(label):
        raise ValueError(f"Axis {key!r}: label {label!r} must be letters, digits and ._+-")
  elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
    raise ValueError(f"Axis {key!r} must be a list of values or a mapping label -> value, "
                     f"got {values!r}")
  else:
    items = [(_label(key, v), v) for v in values]
  if not items:
    raise ValueError(f"Axis {key!r} has no values")
  return items


def _with_arg(config: str, key: str, value: Any) -> str:
  text = format_value(value)
  if "," in text or "=" in text:
    raise ValueError(f"Config arg {key}={text!r}: values of config args cannot hold ',' or "
                     "'='; set the config key itself instead")
  path, _, arg = config.partition(":")
  return f"{path}:{arg + ',' if arg else ''}{key}={text}"


def grid(config: str, axes: Mapping[str, Sequence[Any] | Mapping[str, Any]] | None = None, *,
         fixed: Mapping[str, Any] | None = None,
         labels: Mapping[str, str] | None = None) -> list[Point]:
  """The points of the product of `axes` (first axis outermost).

  Args:
    config: the config file, FILE[:ARG], relative to the directory the sweep runs in.
    axes: key -> values or {label: value}; keys are config keys, `config` or `arg.NAME`.
    fixed: key -> value set on every point without naming it.
    labels: name parts put first, for what `config` or `fixed` already select (e.g.
      {"data": "chestxray14"}), or to tell grids apart ({"stage": "source"}).
  """
  axes, fixed, labels = dict(axes or {}), dict(fixed or {}), dict(labels or {})
  for key, label in labels.items():
    if not _LABEL.match(str(label)) or not _LABEL.match(key):
      raise ValueError(f"Label {key}={label!r} must be letters, digits and ._+-")
  shown = list(labels) + [short_key(k) for k in axes]
  repeated = sorted(k for k, n in collections.Counter(shown).items() if n > 1)
  if repeated:
    raise ValueError(f"Name part(s) {repeated} come from more than one axis or label; "
                     "label the grid so each shows once")
  points = []
  for combination in itertools.product(*(_axis(k, v) for k, v in axes.items())):
    point_config, overrides = config, {}
    chosen = list(fixed.items()) + [(k, v) for k, (_, v) in zip(axes, combination)]
    for key, value in chosen:
      if key == "config":
        point_config = value
    for key, value in chosen:
      if key.startswith("arg."):
        point_config = _with_arg(point_config, key[len("arg."):], value)
      elif key != "config":
        overrides[key] = value
    point_labels = list(labels.items()) + [
        (short_key(k), label) for k, (label, _) in zip(axes, combination)]
    points.append(Point(tuple(point_labels), point_config, tuple(overrides.items())))
  return points


def split_list(text: str) -> list[str]:
  """A list in a sweep arg: 'a+b+c' (commas separate the args themselves)."""
  return [part for part in text.split("+") if part]


# ---------------------------------------------------------------------- loading


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist (relative paths are taken from "
                            f"{os.getcwd()}; run from the repository root)")
  name = "_medbench_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(spec: str) -> Sweep:
  """The Sweep of `FILE[:ARG]`, from the file's get_sweep(arg)."""
  path, _, arg = spec.partition(":")
  module = _load_module(path, "Sweep file")
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"Sweep file {path} defines no get_sweep(arg=None)")
  try:
    sweep = module.get_sweep(arg or None)
  except ValueError as e:
    raise ValueError(f"{spec}: {e}") from None
  if not isinstance(sweep, Sweep):
    raise ValueError(f"{path}: get_sweep returned {type(sweep).__name__}, not a Sweep")
  if not sweep.points:
    raise ValueError(f"{spec}: the sweep has no points")
  return sweep


# ---------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class PlannedPoint:
  """A point below a sweep root: where it runs, with what, after which others."""
  name: str
  workdir: epath.Path  # absolute
  relative_workdir: str
  config: str
  overrides: dict[str, Any]  # run_of values resolved to "run:WORKDIR"
  depends_on: tuple[str, ...]
  num_trials: int | None  # None when the config was not loaded (validate=False)
  dataset: dict[str, Any] | None  # config.dataset, to prepare each data set once

  def main_args(self, workdir: str | None = None) -> list[str]:
    """medbench_jax.main's flags for this point (workdir: where the run sees it)."""
    return [f"--config={self.config}", f"--workdir={workdir or self.workdir}",
            *(f"--config.{k}={format_value(v)}" for k, v in self.overrides.items())]


@dataclasses.dataclass(frozen=True)
class Plan:
  sweep: str  # the sweep's name
  source: str  # FILE[:ARG] it came from
  root: epath.Path
  points: tuple[PlannedPoint, ...]  # dependencies first

  def by_name(self) -> dict[str, PlannedPoint]:
    return {p.name: p for p in self.points}


def resolve_root(root: str) -> epath.Path:
  """The sweep root as an absolute path (buckets, gs://..., stay as they are)."""
  if "://" in root:
    return epath.Path(root)
  return epath.Path(os.path.abspath(os.path.expanduser(root)))


def _run_order(points: Sequence[Point]) -> list[Point]:
  """Points with each one after its dependencies, otherwise in the sweep's order."""
  by_name = {p.name: p for p in points}
  for point in points:
    unknown = [d for d in point.depends_on if d not in by_name]
    if unknown:
      raise ValueError(f"Point {point.name} depends on {unknown}, which the sweep does not "
                       "define")
  order, placed, visiting = [], set(), []

  def visit(point: Point) -> None:
    if point.name in placed:
      return
    if point.name in visiting:
      cycle = visiting[visiting.index(point.name):] + [point.name]
      raise ValueError("Dependency cycle: " + " -> ".join(cycle))
    visiting.append(point.name)
    for dependency in point.depends_on:
      visit(by_name[dependency])
    visiting.pop()
    placed.add(point.name)
    order.append(point)

  for point in points:
    visit(point)
  return order


def _check_names(points: Sequence[Point]) -> None:
  counts = collections.Counter(p.name for p in points)
  repeated = [name for name, n in counts.items() if n > 1]
  if repeated:
    raise ValueError(f"{len(repeated)} point name(s) occur more than once, e.g. "
                     f"{repeated[0]!r}: add an axis or a label that tells them apart")
  workdirs = sorted(p.workdir for p in points)
  for outer, inner in zip(workdirs, workdirs[1:]):
    if inner.startswith(outer + "/"):
      raise ValueError(f"Workdir {outer} would hold workdir {inner}: give both points the "
                       "same label keys")


class _ConfigLoader:
  """Loads each config file and arg once; applies a point's overrides to a copy."""

  def __init__(self):
    self._configs: dict[str, ml_collections.ConfigDict] = {}

  def config(self, spec: str) -> ml_collections.ConfigDict:
    if spec not in self._configs:
      path, sep, arg = spec.partition(":")
      module = _load_module(path, "Config file")
      self._configs[spec] = module.get_config(arg) if sep else module.get_config()
    return self._configs[spec]

  def resolved(self, point: PlannedPoint) -> ml_collections.ConfigDict:
    config = copy.deepcopy(self.config(point.config))
    for key, value in point.overrides.items():
      *parents, leaf = key.split(".")
      node = config
      for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          raise ValueError(f"config.{'.'.join(parents[:i + 1])} does not exist")
        node = node[part]
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"config.{key} does not exist")
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:
        raise ValueError(f"config.{key}={value!r}: {e}") from None
    validate_apart_from_devices(config)
    return config


def validate_apart_from_devices(config: ml_collections.ConfigDict) -> None:
  """config_checks.validate, except config.mesh.fsdp against the devices.

  A point runs on devices the planner does not hold (a local slot, a SLURM allocation, a
  TPU slice); main checks config.mesh.fsdp against them when the point starts.
  """
  # Here, not at module level: checking a config imports the models and JAX, which the
  # sweep driver and its backends otherwise never need.
  from medbench_jax import config_checks

  fsdp = config.mesh.fsdp
  config_lib.check(isinstance(fsdp, int) and fsdp >= 1, "mesh.fsdp", fsdp,
                   "a positive integer")
  on_one_device = copy.deepcopy(config)
  on_one_device.mesh.fsdp = 1
  config_checks.validate(on_one_device)


def plan(sweep: Sweep, root: str | os.PathLike, *, source: str = "",
         validate: bool = True) -> Plan:
  """Resolves `sweep` below `root`; with `validate`, loads and checks every point's config.

  Every problem is collected before failing: the error lists them all (up to 20).
  """
  _check_names(sweep.points)
  root = resolve_root(os.fspath(root))
  ordered = _run_order(sweep.points)
  workdirs = {p.name: root / p.workdir for p in ordered}
  loader, errors, planned = _ConfigLoader(), [], []
  for point in ordered:
    overrides = {k: f"{RUN_PREFIX}{workdirs[v.point]}" if isinstance(v, RunOf) else v
                 for k, v in point.overrides}
    entry = PlannedPoint(name=point.name, workdir=workdirs[point.name],
                         relative_workdir=point.workdir, config=point.config,
                         overrides=overrides, depends_on=point.depends_on, num_trials=None,
                         dataset=None)
    if validate:
      try:
        config = loader.resolved(entry)
        entry = dataclasses.replace(entry, num_trials=int(config.num_trials),
                                    dataset=config.dataset.to_dict())
      except (ValueError, TypeError, FileNotFoundError, AttributeError, ImportError) as e:
        errors.append(f"{point.name}: {e}")
    planned.append(entry)
  if errors:
    more = len(errors) - _MAX_ERRORS
    raise ValueError(f"{len(errors)} point(s) of {source or sweep.name} cannot run:\n  " +
                     "\n  ".join(errors[:_MAX_ERRORS]) + (f"\n  ... and {more} more" if
                                                          more > 0 else ""))
  return Plan(sweep.name, source, root, tuple(planned))


def configs(plan_: Plan) -> dict[str, ml_collections.ConfigDict]:
  """Each point's resolved config (what main will run), by point name."""
  loader = _ConfigLoader()
  return {point.name: loader.resolved(point) for point in plan_.points}


# Keys of config.dataset that choose training labels from a prepared set, not the set.
_SUBSET_KEYS = ("label_fraction", "label_fraction_seed")


def datasets(points: Iterable[PlannedPoint]) -> list[dict[str, Any]]:
  """The distinct data sets of `points` to prepare (label fractions share one)."""
  distinct = {}
  for point in points:
    if point.dataset is not None:
      key = {k: v for k, v in point.dataset.items() if k not in _SUBSET_KEYS}
      distinct.setdefault(json.dumps(key, sort_keys=True), point.dataset)
  return list(distinct.values())


def prepare_datasets(dataset_configs: Iterable[dict[str, Any]]) -> None:
  """Prepares each data set (generating phantom ones), so that runs started together do
  not all prepare the same one at once."""
  from medbench_jax.data import prepare
  for dataset in dataset_configs:
    prepare.prepare_dataset(ml_collections.ConfigDict(dataset))


# ---------------------------------------------------------------------- state on disk


def workdir_state(workdir: epath.Path) -> str:
  """done (results.json), resumable (a latest checkpoint or a finished trial), or new."""
  if (workdir / "results.json").exists():
    return DONE
  if not workdir.exists():
    return NEW
  for trial in workdir.glob("trial_*"):
    if (trial / "result.json").exists():
      return RESUMABLE
    latest = trial / "ckpt" / "latest"
    if latest.exists() and any(step.name.isdigit() for step in latest.iterdir()):
      return RESUMABLE
  return NEW


def read_status(workdir: epath.Path) -> dict[str, Any] | None:
  path = workdir / STATUS_FILE
  if not path.exists():
    return None
  try:
    status = json.loads(path.read_text())
  except json.JSONDecodeError:
    return {"state": "unreadable", "reason": f"{path} is not valid JSON"}
  return status if isinstance(status, dict) else None


def write_status(workdir: epath.Path, state: str, reason: str = "", **fields: Any) -> None:
  """WORKDIR/status.json, replaced whole (readers never see half of it)."""
  workdir.mkdir(parents=True, exist_ok=True)
  status = {"state": state, "reason": reason, "host": socket.gethostname(),
            "time": datetime.datetime.now().isoformat(timespec="seconds"), **fields}
  paths.write_atomic(workdir / STATUS_FILE, json.dumps(status, indent=2))


def outcome_on_disk(workdir: epath.Path) -> str:
  """done, else the last attempt's state (status.json), else new or resumable."""
  state = workdir_state(workdir)
  status = read_status(workdir)
  return status["state"] if state != DONE and status and "state" in status else state


def log_tail(workdir: epath.Path, lines: int = 25) -> str:
  """The last lines of the point's log (the cause of a failure is usually there)."""
  path = workdir / LOG_FILE
  if not path.exists():
    return ""
  text = path.read_bytes()[-20000:].decode("utf-8", errors="replace")
  # Progress bars redraw with carriage returns; keep what was shown last.
  shown = [line.rsplit("\r", 1)[-1] for line in text.rstrip().split("\n")]
  return "\n".join(shown[-lines:])


def first_line(text: str) -> str:
  return text.split("\n", 1)[0]


def failure_reason(returncode: int, workdir: epath.Path) -> str:
  """`exit status N` or `killed by SIGNAME`, and the tail of the log."""
  if returncode < 0:
    what = f"killed by {signal.Signals(-returncode).name}"
  else:
    what = f"exit status {returncode}"
  tail = log_tail(workdir)
  return f"{what}; last lines of {workdir / LOG_FILE}:\n{tail}" if tail else what


_BLOCKING = {FAILED: "failed", BLOCKED: "is blocked", PREEMPTED: "was stopped unfinished"}


def blocked_reason(point: PlannedPoint, outcome: Mapping[str, str]) -> str | None:
  """Why `point` cannot start, given the outcomes so far (name -> state), or None."""
  for dependency in point.depends_on:
    if outcome.get(dependency) in _BLOCKING:
      return f"depends on {dependency}, which {_BLOCKING[outcome[dependency]]}"
  return None


@dataclasses.dataclass(frozen=True)
class Row:
  """A line of the dry-run table."""
  name: str
  workdir: str
  state: str
  note: str


def assess(plan_: Plan) -> list[Row]:
  """Each point's state as things stand: done / resumable / new from its workdir, blocked
  where a dependency's last attempt failed (or was blocked) and it has not finished since."""
  rows, outcome = [], {}
  for point in plan_.points:
    state = workdir_state(point.workdir)
    status = read_status(point.workdir)
    notes = []
    if state != DONE:
      if status and status.get("state") in (QUEUED, RUNNING, FAILED, PREEMPTED, BLOCKED):
        notes.append(f"last attempt: {status['state']}" + (
            f" ({first_line(status['reason'])})" if status.get("reason") else ""))
      waiting = [d for d in point.depends_on if outcome.get(d) != DONE]
      if waiting:
        notes.append("after " + ", ".join(waiting))
      reason = blocked_reason(point, outcome)
      if reason:
        state = BLOCKED
        notes.append(reason + " (rerunning retries it first)")
    outcome[point.name] = (FAILED if state != DONE and status and status.get("state") == FAILED
                           else state)
    rows.append(Row(point.name, point.relative_workdir, state, "; ".join(notes)))
  return rows


def table(rows: Sequence[Row]) -> str:
  """The dry-run table, and a count per state."""
  header = Row("point", "workdir", "state", "note")
  widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("name", "workdir",
                                                                         "state")]
  lines = [f"{r.name:<{widths[0]}}  {r.workdir:<{widths[1]}}  {r.state:<{widths[2]}}  "
           f"{r.note}".rstrip() for r in [header, *rows]]
  counts = collections.Counter(r.state for r in rows)
  lines.append(f"{len(rows)} points: " + ", ".join(
      f"{counts[s]} {s}" for s in (DONE, RESUMABLE, NEW, BLOCKED) if counts[s]))
  return "\n".join(lines)


def sweep_json(plan_: Plan, command: Sequence[str] = ()) -> dict[str, Any]:
  """ROOT/sweep.json: the plan as medbench_jax/study/runs.py reads it."""
  return {
      "sweep": plan_.sweep, "source": plan_.source, "command": list(command),
      "points": [{"name": p.name, "workdir": p.relative_workdir, "num_trials": p.num_trials,
                  "depends_on": list(p.depends_on), "config": p.config,
                  "overrides": {k: format_value(v) for k, v in p.overrides.items()}}
                 for p in plan_.points]}


def write_sweep_json(plan_: Plan, command: Sequence[str] = ()) -> None:
  plan_.root.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(plan_.root / SWEEP_FILE, json.dumps(sweep_json(plan_, command), indent=2))
