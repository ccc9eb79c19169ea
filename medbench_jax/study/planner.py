"""What a sweep will cost before it starts: device-hours per point and in total, and the
wall time of running them on the backend's slots.

A point's time on its slot is, per trial,

  epochs x (steps per epoch x train step + validation batches x eval step)
  + test batches x crops x eval step                        (ten crops at test: x10)

plus, once per point, a start-up (process, imports, opening the data set: STARTUP_S,
assumed) and, once per sweep and model setting, the first train step (tracing and XLA
compilation, measured; later runs load it from the persistent compilation cache). Its
device-hours are that time x the slot's devices. Where each figure comes from:

  data set size  the prepared data set's split sizes (TFDS metadata); a phantom set's
                 configured sizes before it is generated; times the label fraction of
                 the splits it subsets. Unknown before preparation otherwise.
  epochs         the sweep's finished points: each trial ran until its best step
                 plus patience + 1 evaluations (early stopping), or its budget; their mean,
                 from runs of the same data set, model and label fraction where there are,
                 else the same data set and label fraction, else the same data set. Without
                 any: the budget where patience cannot stop the run earlier, else
                 ASSUMED_BEST_EPOCH + patience + 1 evaluations (stated as an assumption).
  step times     `python -m medbench_jax.bench train|eval` results of the same model, batch,
                 input size and dtype on the device kind (CACHE_DIR/bench/<kind>.jsonl,
                 benchmarks/train_speed.record); of another batch or size of the same model,
                 scaled by pixels per step (stated). Without an eval measurement an eval
                 image costs a third of a train image (a forward pass of forward + backward).
                 Without a train measurement the point has no estimate and says so.

Not in the formula: checkpoint writes, evaluation programs' compilation, input-pipeline
waits beyond what the bench measured, data-set preparation, queueing. Once some of the
sweep's points have finished, their wall times (status.json) against the formula's
estimate for them give a factor that scales the rest, which covers these on average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import heapq
import json
import math
import os
from typing import Any

from etils import epath
import ml_collections

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep as sweep_lib

ASSUMED_BEST_EPOCH = 10  # where the validation loss bottoms out, without finished runs
STARTUP_S = 15.0  # per point process: interpreter, imports, data set opened (assumed)
FORWARD_SHARE = 1 / 3  # an eval image's cost relative to a train image's, unmeasured
TEN_CROPS = 10


@dataclasses.dataclass(frozen=True)
class StepTime:
  """Seconds per step of one model setting on a device kind, and where it comes from."""
  step_s: float
  first_step_s: float | None
  source: str


@dataclasses.dataclass
class Estimate:
  """One point's expected cost; seconds None where a figure is unknown (notes say why)."""
  name: str
  state: str
  trials: int
  devices: int
  train_examples: int | None = None
  epochs: float | None = None
  seconds: float | None = None  # on its slot, start-up and compilation included
  compile_s: float = 0.0  # the first train step, where this point is the first to need it
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def device_hours(self) -> float | None:
    return None if self.seconds is None else self.seconds * self.devices / 3600


# ---------------------------------------------------------------------- data set sizes


def split_sizes(config: ml_collections.ConfigDict) -> tuple[dict[str, int] | None, str]:
  """Examples per split the run will use (label fraction applied), and their source."""
  from medbench_jax.data import prepare
  from medbench_jax.data import sources

  d = config.dataset
  builder = prepare.builder_for(d)
  if builder.is_prepared():
    sizes = {s: int(builder.info.splits[s].num_examples) for s in ("train", "validation",
                                                                     "test")}
    source = f"prepared {d.name}"
  elif d.name in prepare.PHANTOM_DATASETS and not d.manual_dir:
    sizes = {"train": d.phantom.num_train, "validation": d.phantom.num_val,
             "test": d.phantom.num_test}
    source = f"{d.name} as configured (generated on first use)"
  else:
    return None, f"{d.name} is not prepared: its size is unknown until it is"
  for split in sources.fraction_splits(d):
    sizes[split] = max(1, int(sizes[split] * d.label_fraction))
  if d.frontal_only:
    source += ", all views (frontal_only not applied)"
  return sizes, source


# ---------------------------------------------------------------------- epochs


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """What a finished run tells of early stopping: its data set, model, label fraction
  and the epochs each trial trained."""
  dataset: str
  model: str
  label_fraction: float
  epochs: tuple[float, ...]
  workdir: str


def trial_epochs(results: Mapping[str, Any]) -> list[float]:
  """Epochs each trial of a results.json trained: to its best step plus patience + 1
  evaluations (when early stopping ended it), at most the run's step budget."""
  config = results["config"]
  train = config["train"]
  batch = config["input"]["batch_size"]
  num_train = results.get("label_subset", {}).get("num_selected")
  if not num_train or num_train < batch:
    return []
  steps_per_epoch = num_train // batch
  total = train["num_epochs"] * steps_per_epoch
  if train.get("max_steps"):
    total = min(total, train["max_steps"])
  eval_every = train.get("eval_every_steps") or steps_per_epoch
  epochs = []
  for trial in results.get("trials", []):
    best = trial.get("best_step")
    if best is None or best < 0:
      continue
    stopped = best + (train["patience"] + 1) * eval_every
    epochs.append(min(stopped, total) / steps_per_epoch)
  return epochs


def finished_runs(workdirs: Sequence[epath.Path]) -> list[FinishedRun]:
  """The finished runs among `workdirs` whose results.json tells how long their trials
  trained."""
  runs = []
  for workdir in workdirs:
    path = workdir / "results.json"
    if not path.exists():
      continue
    try:
      results = json.loads(path.read_text())
      epochs = trial_epochs(results)
    except (ValueError, KeyError, TypeError):
      continue  # unreadable or of another format: it teaches nothing
    if epochs:
      runs.append(FinishedRun(results["dataset"], results["model"],
                              float(results["label_fraction"]), tuple(epochs),
                              str(path.parent)))
  return runs


def expected_epochs(config: ml_collections.ConfigDict, runs: Sequence[FinishedRun],
                    steps_per_epoch: int) -> tuple[float, str]:
  """Epochs the point's trials are expected to train, and why."""
  train = config.train
  budget = float(train.num_epochs)
  if train.max_steps:
    budget = min(budget, train.max_steps / steps_per_epoch)
  eval_every = (train.eval_every_steps or steps_per_epoch) / steps_per_epoch  # in epochs
  d = config.dataset
  same = [lambda r: (r.dataset, r.model, r.label_fraction) == (
              d.name, config.model.name, d.label_fraction),
          lambda r: (r.dataset, r.label_fraction) == (d.name, d.label_fraction),
          lambda r: r.dataset == d.name]
  what = ["same data set, model and label fraction", "same data set and label fraction",
          "same data set"]
  for match, described in zip(same, what):
    epochs = [e for run in runs if match(run) for e in run.epochs]
    if epochs:
      mean = sum(epochs) / len(epochs)
      return min(mean, budget), (f"mean of {len(epochs)} finished trial(s) under the root "
                                 f"({described})")
  if (train.patience + 1) * eval_every >= budget:
    return budget, "the whole budget (patience cannot stop it earlier)"
  assumed = min(budget, ASSUMED_BEST_EPOCH + (train.patience + 1) * eval_every)
  return assumed, (f"assumed: best at epoch {ASSUMED_BEST_EPOCH}, stopped {train.patience + 1} "
                   "evaluations later (no finished run of this data set under the root)")


# ---------------------------------------------------------------------- step times


def read_bench(device_kind: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
  """The `bench train|eval` lines cached for `device_kind` (oldest first)."""
  from medbench_jax.benchmarks import train_speed

  path = train_speed.cache_file(device_kind, cache_dir)
  if not os.path.exists(path):
    return []
  lines = []
  with open(path) as f:
    for text in f:
      try:
        lines.append(json.loads(text))
      except json.JSONDecodeError:
        continue  # a line cut short by a killed bench
  return lines


def step_time(lines: Sequence[Mapping[str, Any]], step: str, settings: Mapping[str, Any],
              device_kind: str, ten_crop: bool = False) -> StepTime | None:
  """The newest measurement of `settings` (train_speed.step_settings) on the device kind,
  else one of the same model and dtype scaled by pixels per step, else None."""
  model_kw = json.loads(json.dumps(settings.get("model_kw", {})))  # tuples as JSON has them

  def matches(line, exact):
    keys = ["model", "dtype", "num_outputs"] + (["batch_size", "image_size"] if exact else [])
    return (line.get("bench") == step and line.get("framework") == "jax"
            and bool(line.get("ten_crop", False)) == ten_crop
            and line.get("model_kw", model_kw) == model_kw
            and all(line.get(k) == settings[k] for k in keys) and line.get("step_s"))

  where = f"bench {step} on {device_kind}"
  exact = [line for line in lines if matches(line, True)]
  if exact:
    line = exact[-1]
    return StepTime(line["step_s"], line.get("first_step_s"),
                    f"{where} ({line.get('time', 'undated')})")
  similar = [line for line in lines if matches(line, False)]
  if similar:
    line = similar[-1]
    scale = (settings["batch_size"] * settings["image_size"] ** 2) / (
        line["batch_size"] * line["image_size"] ** 2)
    return StepTime(line["step_s"] * scale, line.get("first_step_s"),
                    f"{where} at batch {line['batch_size']}, {line['image_size']} px, "
                    f"scaled x{scale:.2f} by pixels per step")
  return None


# ---------------------------------------------------------------------- the estimate


def _crops(config: ml_collections.ConfigDict) -> int:
  return TEN_CROPS if config.train.test_tta and "ten_crop" in config.input.pp_test else 1


def _cost(est: Estimate, config: ml_collections.ConfigDict, runs: Sequence[FinishedRun],
          lines: Sequence[Mapping[str, Any]], device_kind: str, compiled: set[str],
          epochs: float | None = None) -> None:
  """Fills in `est` (seconds None where a figure is unknown, with the reason in its notes);
  `epochs` where known (a finished point's own), else expected; `compiled`: the model
  settings whose first step an earlier point pays."""
  from medbench_jax.benchmarks import train_speed

  sizes, size_source = split_sizes(config)
  if sizes is None:
    est.notes.append(size_source)
    return
  est.train_examples = sizes["train"]
  batch = config.input.batch_size
  steps_per_epoch = sizes["train"] // batch
  if steps_per_epoch < 1:
    est.notes.append(f"{sizes['train']} training examples: fewer than one batch")
    return
  epochs_source = "its own trials"
  if epochs is None:
    epochs, epochs_source = expected_epochs(config, runs, steps_per_epoch)
  est.epochs = epochs
  est.notes += [f"size: {size_source}", f"epochs: {epochs_source}"]
  train_settings = train_speed.step_settings(config, "train")
  train = step_time(lines, "train", train_settings, device_kind)
  if train is None:
    est.notes.append(
        f"no `bench train` of {train_settings['model']} (batch {batch}, "
        f"{train_settings['image_size']} px, {train_settings['dtype']}) on {device_kind}: "
        "run `python -m medbench_jax.bench train --config=...` there (step time unknown)")
    return
  est.notes.append(f"train step {train.step_s:.3g} s: {train.source}")
  eval_settings = train_speed.step_settings(config, "eval")
  eval_batch = eval_settings["batch_size"]
  measured_eval = step_time(lines, "eval", eval_settings, device_kind)
  if measured_eval is not None:
    eval_image_s = measured_eval.step_s / eval_batch
    est.notes.append(f"eval step {measured_eval.step_s:.3g} s: {measured_eval.source}")
  else:
    eval_image_s = train.step_s / batch * FORWARD_SHARE
    est.notes.append(f"eval: assumed {FORWARD_SHARE:.2f} of a train image "
                     "(no `bench eval` measurement)")
  val_s = math.ceil(sizes["validation"] / eval_batch) * eval_batch * eval_image_s
  test_s = math.ceil(sizes["test"] / eval_batch) * eval_batch * eval_image_s * _crops(config)
  per_trial = est.epochs * (steps_per_epoch * train.step_s + val_s) + test_s
  key = json.dumps(train_settings, sort_keys=True, default=str)
  if key not in compiled and train.first_step_s:
    compiled.add(key)
    est.compile_s = train.first_step_s
  est.seconds = STARTUP_S + est.compile_s + est.trials * per_trial


def _measured_s(workdir: epath.Path) -> float | None:
  """A finished point's wall time as the sweep runner measured it (status.json)."""
  wall = (sweep_lib.read_status(workdir) or {}).get("wall_s")
  return float(wall) if isinstance(wall, (int, float)) and wall > 0 else None


def estimate(plan: sweep_lib.Plan, configs: Mapping[str, ml_collections.ConfigDict], *,
             device_kind: str, devices_per_point: int = 1,
             cache_dir: str | None = None) -> list[Estimate]:
  """Each point's expected cost (done points cost nothing more).

  The sweep's finished points calibrate the rest: where the runner measured their wall
  time, the unfinished points' estimates are scaled by measured / estimated of those
  (their own epochs; the same model of what the formula leaves out)."""
  runs = finished_runs([p.workdir for p in plan.points])
  lines = read_bench(device_kind, cache_dir)
  compiled: set[str] = set()
  compiled_before: set[str] = set()  # by finished points, for their own estimates
  estimates, measured, predicted = [], 0.0, 0.0
  for point in plan.points:
    config = configs[point.name]
    state = sweep_lib.workdir_state(point.workdir)
    est = Estimate(point.name, state, int(config.num_trials), devices_per_point)
    estimates.append(est)
    if state == sweep_lib.DONE:
      own = next((r for r in runs if r.workdir == str(point.workdir)), None)
      wall = _measured_s(point.workdir)
      if own is not None and wall is not None:
        prior = Estimate(point.name, state, est.trials, devices_per_point)
        _cost(prior, config, runs, lines, device_kind, compiled_before,
              epochs=sum(own.epochs) / len(own.epochs))
        if prior.seconds:
          measured, predicted = measured + wall, predicted + prior.seconds
      est.seconds = 0.0
      continue
    if state == sweep_lib.RESUMABLE:
      est.notes.append("resumable: counted from the start (an upper bound)")
    _cost(est, config, runs, lines, device_kind, compiled)
  if predicted:
    factor = measured / predicted
    for est in estimates:
      if est.state != sweep_lib.DONE and est.seconds is not None:
        est.seconds *= factor
        est.compile_s *= factor
        est.notes.append(f"calibrated x{factor:.2f}: the sweep's finished points took "
                         f"{measured:.0f} s against {predicted:.0f} s estimated")
  return estimates


# ---------------------------------------------------------------------- slots


@dataclasses.dataclass(frozen=True)
class Assignment:
  """Where and when (seconds from the start) a point is expected to run."""
  name: str
  slot: slots_lib.Slot
  start_s: float
  end_s: float


def schedule(plan: sweep_lib.Plan, estimates: Sequence[Estimate],
             slots: Sequence[slots_lib.Slot]) -> list[Assignment]:
  """The runner's order replayed on the estimates: each unfinished point, in run order,
  on the slot that frees first once its dependencies have ended (a point of unknown cost
  counts as taking no time)."""
  cost = {e.name: e.seconds or 0.0 for e in estimates}
  done = {e.name for e in estimates if e.state == sweep_lib.DONE}
  free = [(0.0, i, i) for i in range(len(slots))]  # (free at, turn, slot): ties take turns
  turn = len(slots)
  end: dict[str, float] = {name: 0.0 for name in done}
  assignments = []
  for point in plan.points:
    if point.name in done:
      continue
    ready = max((end.get(d, 0.0) for d in point.depends_on), default=0.0)
    at, _, index = heapq.heappop(free)
    start = max(at, ready)
    end[point.name] = start + cost[point.name]
    heapq.heappush(free, (end[point.name], turn, index))
    turn += 1
    assignments.append(Assignment(point.name, slots[index], start, end[point.name]))
  return assignments


# ---------------------------------------------------------------------- printing


def _hours(seconds: float | None) -> str:
  if seconds is None:
    return "?"
  return f"{seconds / 3600:.3f}" if seconds < 360 * 3600 else f"{seconds / 3600:.0f}"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def describe(estimates: Sequence[Estimate], assignments: Sequence[Assignment],
             slots: Sequence[slots_lib.Slot], device_kind: str, *,
             show_env: bool = False) -> str:
  """The dry run's plan of slots and cost: point -> host, devices (and environment), its
  expected time and device-hours with their sources; totals."""
  lines = [f"Slots: {len(slots)} ({slots[0].description}"
           + (f" ... {slots[-1].description})" if len(slots) > 1 else ")")
           + f"; device kind {device_kind}"]
  by_name = {a.name: a for a in assignments}
  for est in estimates:
    if est.state == sweep_lib.DONE:
      continue
    a = by_name[est.name]
    where = f"{a.slot.host or 'here'}, device(s) {','.join(a.slot.devices) or 'all'}"
    cost = (f"{_duration(est.seconds)}, {_hours(est.seconds * est.devices)} device-h"
            if est.seconds is not None else "cost unknown")
    lines.append(f"  {est.name} -> {where}; start +{_duration(a.start_s)}: {cost}")
    if show_env and a.slot.env:
      lines.append("      env: " + " ".join(f"{k}={v}" for k, v in a.slot.env.items()))
    for note in est.notes:
      lines.append(f"      {note}")
  todo = [e for e in estimates if e.state != sweep_lib.DONE]
  known = [e for e in todo if e.seconds is not None]
  at_once = len({id(a.slot) for a in assignments if a.start_s == 0.0})
  total = sum(e.seconds * e.devices for e in known)
  wall = max((a.end_s for a in assignments), default=0.0)
  lines.append(f"Cost: {len(todo)} point(s) to run, {at_once} at once on {len(slots)} "
               f"slot(s); {_hours(total)} device-hours"
               + (f" for the {len(known)} with an estimate" if len(known) < len(todo) else "")
               + f"; expected wall time {_duration(wall)}"
               + (f" (without the {len(todo) - len(known)} of unknown cost)"
                  if len(known) < len(todo) else ""))
  return "\n".join(lines)
