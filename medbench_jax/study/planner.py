"""What a sweep will cost before it starts: device-hours per point and in total, and the
wall time of running them on the backend's slots.

A point's time on its slot is

  start-up                                  (process, imports, config checks, data set opened)
  + preparation                             (a phantom set no earlier point generates)
  + compilation                             (cold for the first point of a model setting,
                                             loaded from the compilation cache after it)
  + trials x [ set-up
               + epochs x (steps per epoch x train step + validation batches x eval step
                           + checkpoint saves per evaluation x a save)
               + test batches x test step ]  (the ten-crop step with train.test_tta)

and its device-hours are that time x the slot's devices. Where each figure comes from:

  data set size  the prepared data set's split sizes (TFDS metadata); a phantom set's
                 configured sizes before it is generated; times the label fraction of
                 the splits it subsets. Unknown before preparation otherwise.
  epochs         the sweep's finished points: each trial ran until its best step
                 plus patience + 1 evaluations (early stopping), or its budget; their mean,
                 from runs of the same data set, model and label fraction where there are,
                 else the same data set and label fraction, else the same data set. Without
                 any: the budget where patience cannot stop the run earlier, else
                 ASSUMED_BEST_EPOCH + patience + 1 evaluations (stated as an assumption).
  step times     `python -m medbench_jax.bench train|eval [--ten_crop]` results of the same
                 model, batch, input size and dtype on the device kind
                 (CACHE_DIR/bench/<kind>.jsonl, benchmarks/train_speed.record); of another
                 batch or size of the same model, scaled by pixels per step (stated).
                 Without an eval measurement an eval image costs a third of a train image
                 (a forward pass of forward + backward); without a ten-crop one a test
                 image costs ten eval images. Without a train measurement the point has no
                 estimate and says so.
  compilation    the same bench lines: first step minus a step (tracing, XLA compilation,
                 the first run) of the train, eval and test steps, plus the first trial's
                 set-up (COLD_SET_UP_S: the initialisation's compilation), once per sweep
                 and model setting (the persistent compilation cache is assumed not to hold
                 it yet); every other trial loads its programs from the cache
                 (WARM_COMPILE_S).
  start-up       the sweep's finished points: the median of their runner-measured wall
                 time (status.json) minus the trainer's (results.json cost.wall_s); else
                 STARTUP_S. Preparation: PREPARE_S per phantom set no earlier point
                 generates, whatever its resolutions (other data sets must be prepared
                 before their size is known).
  checkpoints    `latest` after every evaluation and `best` at each improvement: every
                 evaluation up to the expected best (all of them when the budget, not
                 patience, ends the run), CHECKPOINT_S each.
The constants were measured on a 2-core CPU (the comments beside them say how); on
other machines the finished points' calibration corrects them: once some of the
sweep's points have finished, their wall times (status.json) against the formula's
estimate for them give a factor that scales the rest. Not in the formula: input-pipeline
waits beyond what the bench measured, queueing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import heapq
import json
import math
import os
import statistics
from typing import Any

from etils import epath
import ml_collections

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep as sweep_lib

ASSUMED_BEST_EPOCH = 10  # where the validation loss bottoms out, without finished runs
FORWARD_SHARE = 1 / 3  # an eval image's cost relative to a train image's, unmeasured
TEN_CROPS = 10
# Overheads the bench does not measure, from the logs of a demo point (tiny Swin, 2
# trials) on a 2-core CPU under load; the finished points' calibration replaces (start-up)
# or scales them on other machines.
STARTUP_S = 18.0  # process to data set opened: interpreter, JAX/TF/grain imports, checks
PREPARE_S = 20.0  # generating and preparing a phantom set of a few hundred images
COLD_SET_UP_S = 25.0  # the first trial of a setting: the initialisation's compilation,
                      # the input pipeline's first use (measured 45, 24 and 23 s)
TRIAL_SET_UP_S = 4.0  # per trial: input pipeline, model, writer, predictions, result files
WARM_COMPILE_S = 8.0  # per trial whose programs the compilation cache holds: tracing and
                      # loading the train, eval and test steps (3 to 8 s measured)
CHECKPOINT_S = 1.0  # one save of a small model's state (orbax, manifest)


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
  packed: int = 1  # trials per program (train.pack_trials)
  train_examples: int | None = None
  epochs: float | None = None
  seconds: float | None = None  # on its slot, start-up and compilation included
  compile_s: float = 0.0  # compilations (cold for the first point of a setting, else warm)
  overhead_s: float = 0.0  # start-up, preparation, compilation, set-up and checkpoints
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


def _unprepared(config: ml_collections.ConfigDict) -> str | None:
  """The folder of the generated phantom set the point prepares from, None if its
  resolution is prepared already. Points of one phantom at other resolutions share it:
  generating it is the cost, resizing a few hundred images is not."""
  from medbench_jax.data import prepare

  d = config.dataset
  if d.name not in prepare.PHANTOM_DATASETS or d.manual_dir:
    return None
  return None if prepare.builder_for(d).is_prepared() else prepare.manual_dir_for(d)


@dataclasses.dataclass
class _Sweep:
  """What the points before this one leave behind: the model settings they compiled,
  the data sets they prepared; and the start-up measured on finished points."""
  compiled: set[str] = dataclasses.field(default_factory=set)
  prepared: set[str] = dataclasses.field(default_factory=set)
  startup_s: float = STARTUP_S
  startup_source: str = "assumed (STARTUP_S, measured on a 2-core CPU)"


def _eval_times(lines: Sequence[Mapping[str, Any]], config: ml_collections.ConfigDict,
                train: StepTime, device_kind: str, notes: list[str]
                ) -> tuple[float, float, float]:
  """Seconds of one validation batch and one test batch, and the cold compilation of
  their steps (0 where unmeasured); the sources go to `notes`."""
  from medbench_jax.benchmarks import train_speed

  settings = train_speed.step_settings(config, "eval")
  batch = settings["batch_size"]
  measured = step_time(lines, "eval", settings, device_kind)
  compile_s = 0.0
  if measured is not None:
    eval_s = measured.step_s
    compile_s += max(0.0, (measured.first_step_s or 0.0) - measured.step_s)
    notes.append(f"eval step {measured.step_s:.3g} s: {measured.source}")
  else:
    eval_s = train.step_s / train_speed.step_settings(config, "train")["batch_size"] * (
        batch * FORWARD_SHARE)
    notes.append(f"eval: assumed {FORWARD_SHARE:.2f} of a train image "
                 "(no `bench eval` measurement)")
  crops = _crops(config)
  test_s = eval_s * crops
  if crops > 1:
    ten = step_time(lines, "eval", settings, device_kind, ten_crop=True)
    if ten is not None:
      test_s = ten.step_s
      compile_s += max(0.0, (ten.first_step_s or 0.0) - ten.step_s)
      notes.append(f"test step (ten crops) {ten.step_s:.3g} s: {ten.source}")
    else:
      notes.append(f"test: {crops} crops x the eval step (no `bench eval --ten_crop`)")
  return eval_s, test_s, compile_s


def _cost(est: Estimate, config: ml_collections.ConfigDict, runs: Sequence[FinishedRun],
          lines: Sequence[Mapping[str, Any]], device_kind: str, sweep: _Sweep,
          epochs: float | None = None) -> None:
  """Fills in `est` (seconds None where a figure is unknown, with the reason in its notes);
  `epochs` where known (a finished point's own), else expected; `sweep`: what earlier
  points compiled and prepared (updated with this point's)."""
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
        "run `python -m medbench_jax.bench train --config=...` and `bench eval "
        "[--ten_crop]` with the point's --config flags there (step time unknown)")
    return
  est.notes.append(f"train step {train.step_s:.3g} s: {train.source}")
  eval_s, test_s, eval_compile_s = _eval_times(lines, config, train, device_kind, est.notes)
  eval_batch = config.input.eval_batch_size
  evals_per_epoch = steps_per_epoch / (config.train.eval_every_steps or steps_per_epoch)
  evaluations = est.epochs * evals_per_epoch
  # latest at every evaluation; best at every one up to the expected best.
  patience_evals = config.train.patience + 1
  best_saves = (evaluations - patience_evals if evaluations > patience_evals
                else evaluations)
  saves = evaluations + max(1.0, best_saves)
  per_trial = (est.epochs * steps_per_epoch * train.step_s
               + evaluations * math.ceil(sizes["validation"] / eval_batch) * eval_s
               + saves * CHECKPOINT_S
               + math.ceil(sizes["test"] / eval_batch) * test_s + TRIAL_SET_UP_S)
  programs = _programs(est, config)
  key = json.dumps(train_settings, sort_keys=True, default=str)
  if key not in sweep.compiled and train.first_step_s:
    sweep.compiled.add(key)
    cold = max(0.0, train.first_step_s - train.step_s) + eval_compile_s + COLD_SET_UP_S
    est.compile_s = cold + (programs - 1) * WARM_COMPILE_S
    est.notes.append(f"compilation: {cold:.0f} s cold (bench first steps + "
                     f"{COLD_SET_UP_S:g} s set-up), then "
                     f"{WARM_COMPILE_S:g} s a trial from the compilation cache")
  else:
    est.compile_s = programs * WARM_COMPILE_S
  prepare_s = 0.0
  unprepared = _unprepared(config)
  if unprepared is not None and unprepared not in sweep.prepared:
    sweep.prepared.add(unprepared)
    prepare_s = PREPARE_S
    est.notes.append(f"preparation: {PREPARE_S:g} s (PREPARE_S; generates {unprepared})")
  est.notes.append(f"start-up: {sweep.startup_s:.0f} s, {sweep.startup_source}; "
                   f"{saves:.1f} checkpoint saves a trial at {CHECKPOINT_S:g} s")
  est.overhead_s = (sweep.startup_s + prepare_s + est.compile_s
                    + est.trials * (saves * CHECKPOINT_S + TRIAL_SET_UP_S))
  est.seconds = sweep.startup_s + prepare_s + est.compile_s + est.trials * per_trial


def _programs(est: Estimate, config: ml_collections.ConfigDict) -> int:
  """How many programs the point's trials train in (train.pack_trials), noted in `est`.
  A packed program's step is taken as N single steps: no gain is assumed until it is
  measured (on a CPU it is about that; on an accelerator it is less)."""
  pack = config.train.pack_trials
  if pack == "auto":
    est.notes.append("train.pack_trials=auto: N is chosen at run time from the compiled "
                     "step's memory; estimated as trials one after another")
    pack = 1
  est.packed = min(int(pack), est.trials)
  programs = math.ceil(est.trials / est.packed)
  if est.packed > 1:
    est.notes.append(f"packed: {est.packed} trials per program, {programs} program(s); a "
                     f"packed step taken as {est.packed} single steps (no gain assumed)")
  return programs


def _measured_s(workdir: epath.Path) -> float | None:
  """A finished point's wall time as the sweep runner measured it (status.json)."""
  wall = (sweep_lib.read_status(workdir) or {}).get("wall_s")
  return float(wall) if isinstance(wall, (int, float)) and wall > 0 else None


def measured_startup(workdirs: Sequence[epath.Path]) -> list[float]:
  """Seconds each finished point spent outside the trainer: the runner's wall time
  (status.json) minus the trainer's (results.json cost.wall_s), where both are known."""
  startups = []
  for workdir in workdirs:
    wall = _measured_s(workdir)
    path = workdir / "results.json"
    if wall is None or not path.exists():
      continue
    try:
      trainer = json.loads(path.read_text())["cost"]["wall_s"]
    except (ValueError, KeyError, TypeError):
      continue
    if isinstance(trainer, (int, float)) and 0 < trainer <= wall:
      startups.append(wall - trainer)
  return startups


def estimate(plan: sweep_lib.Plan, configs: Mapping[str, ml_collections.ConfigDict], *,
             device_kind: str, devices_per_point: int = 1,
             cache_dir: str | None = None) -> list[Estimate]:
  """Each point's expected cost (done points cost nothing more).

  The sweep's finished points calibrate the rest: their start-up replaces STARTUP_S,
  and where the runner measured their wall time, the unfinished points' estimates are
  scaled by measured / estimated of those (their own epochs; the same model of what the
  formula leaves out)."""
  runs = finished_runs([p.workdir for p in plan.points])
  lines = read_bench(device_kind, cache_dir)
  sweep, before = _Sweep(), _Sweep()  # before: as finished points saw it, for their own
  startups = measured_startup([p.workdir for p in plan.points])
  if startups:
    for s in (sweep, before):
      s.startup_s = statistics.median(startups)
      s.startup_source = (f"median of {len(startups)} finished point(s) (status.json wall_s "
                          "- results.json cost.wall_s)")
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
        _cost(prior, config, runs, lines, device_kind, before,
              epochs=sum(own.epochs) / len(own.epochs))
        if prior.seconds:
          measured, predicted = measured + wall, predicted + prior.seconds
      est.seconds = 0.0
      continue
    if state == sweep_lib.RESUMABLE:
      est.notes.append("resumable: counted from the start (an upper bound)")
    _cost(est, config, runs, lines, device_kind, sweep)
  if predicted:
    factor = measured / predicted
    for est in estimates:
      if est.state != sweep_lib.DONE and est.seconds is not None:
        est.seconds *= factor
        est.compile_s *= factor
        est.overhead_s *= factor
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
    packed = f", {est.packed} trials per program" if est.packed > 1 else ""
    lines.append(f"  {est.name} -> {where}{packed}; start +{_duration(a.start_s)}: {cost}")
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
