"""Trial packing (train.pack_trials=N): N trials of one config trained as one program.

The trials' train states are stacked on a leading trial axis and one jitted, vmapped step
updates them all, so N batches of 32 fill an accelerator that one batch of 32 leaves idle.
Each trial keeps what makes it a trial: its seed (initialisation, data order, dropout and
augmentation keys), its learning-rate plateau and its early stopping. A trial that stops
is frozen (the step leaves its state as it was) and keeps its best checkpoint; the program
ends when all N have stopped. Validation and test batches are read and preprocessed once
and scored by all N (evaluation.Evaluator with packed=True).

Everything a trial writes (checkpoints, TensorBoard, predictions, result.json) is where
an unpacked trial writes it, so `report` sees no difference and a killed packed run
resumes each trial from its own latest checkpoint. The trials step together while they
are at the same step; after a kill between two trials' saves, the ones behind step alone
until they catch up.

On a mesh with several devices the trial axis is a mesh axis (sharding.make_mesh): 8
trials on 8 devices train in one program, each on its own device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbench_jax import runtime
from medbench_jax import tasks
from medbench_jax.data import sources
from medbench_jax.trainer import checkpoints as checkpoints_lib
from medbench_jax.trainer import evaluation
from medbench_jax.trainer import loop
from medbench_jax.trainer import optim
from medbench_jax.trainer import sharding
from medbench_jax.trainer import state as state_lib
from medbench_jax.trainer import tensorboard
from medbench_jax.trainer import trials as trials_lib

# pack_trials=auto keeps the compiled step's memory under this share of a device's.
MEMORY_SHARE = 0.8


def packed_train_step_fn(config: ml_collections.ConfigDict, task: tasks.Task,
                         normalize: Any, seeds: Sequence[int]) -> Callable:
  """(stacked states, stacked batches (trials, batch, ...), active (trials,) bool) ->
  (states, metrics with a leading trial axis): trials.train_step_fn of each trial's seed,
  vmapped; an inactive trial's state comes back unchanged."""
  seeds = np.asarray(seeds, np.int32)

  def one_trial(state, batch, seed, active):
    new_state, metrics = trials_lib.train_step_fn(config, task, normalize, seed)(state, batch)
    return jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state,
                        state), metrics

  return lambda states, batches, active: jax.vmap(one_trial)(states, batches, seeds, active)


def _stack(states: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _take(states: Any, trial: jax.Array) -> Any:
  return jax.tree.map(lambda leaf: leaf[trial], states)


def _set_learning_rate(states: state_lib.TrainState, trial: int, lr: float
                       ) -> state_lib.TrainState:
  """Trial `trial`'s injected learning rate (reduce-on-plateau), in place."""
  hyperparams = optim.find_hyperparams(states.opt_state)
  rates = hyperparams["learning_rate"]
  hyperparams["learning_rate"] = jax.device_put(rates.at[trial].set(lr), rates.sharding)
  return states


def device_memory_bytes() -> tuple[int, str]:
  """What one device may hold, and where the figure comes from: the runtime's limit on
  accelerators; on a CPU, the host's memory shared by its local devices."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} bytes_limit"
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host // jax.local_device_count(), "host memory / local devices"


def step_memory_bytes(compiled: Any) -> int:
  """A compiled step's peak memory per device by XLA's analysis: arguments, outputs and
  temporaries, less what the donated arguments share with the outputs."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


@dataclasses.dataclass
class Group:
  """The packed trials of one program and everything each of them keeps apart."""
  trials: list[int]
  files: list[trials_lib.TrialFiles]
  seeds: list[int]
  loops: list[loop.Loop]  # each trial's iterator, checkpoints, writer and log prefix
  progress: list[loop.Progress]
  speeds: list[loop.Speed]

  @property
  def size(self) -> int:
    return len(self.trials)


class PackedRun:
  """Trains one group of packed trials of a run and writes each trial's outputs."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Any, trials: list[int],
               splits: sources.Splits, task: tasks.Task):
    self.config, self.workdir, self.splits, self.task = config, workdir, splits, task
    self.trials = trials
    self.mesh = sharding.make_mesh(config.mesh.fsdp,
                                   sharding.trial_axis_size(len(trials), config.mesh.fsdp))
    self.schedule = trials_lib.make_schedule(config, len(splits.train))
    self.model, self.size = trials_lib.create_model(config, task, splits)
    self.tx = trials_lib.make_optimizer(config, self.schedule)
    self.normalize = state_lib.normalizer(config)
    self.data_sharding = sharding.batch_sharding(self.mesh)

  # ---------------------------------------------------------------- state
  def _initial_states(self) -> tuple[list[state_lib.TrainState], Any]:
    states, state_sharding = [], None
    for trial in self.trials:
      state, state_sharding = trials_lib.initial_state(
          self.config, self.task, self.model, self.size, self.tx, self.mesh,
          self.config.seed + trial)
      states.append(state)
    return states, state_sharding

  def run(self) -> list[dict]:
    """Trains the group's trials to their ends, tests each one's best checkpoint and
    returns their records."""
    config, task, splits = self.config, self.task, self.splits
    start = time.perf_counter()
    n = len(self.trials)
    logging.info("Packing trials %s into one program (train.pack_trials=%s; trial axis of "
                 "%d device(s))", self.trials, config.train.pack_trials,
                 self.mesh.shape.get(sharding.TRIAL, 1))
    states, state_sharding = self._initial_states()
    trials_lib.log_model(config, task, self.mesh, states[0], state_sharding,
                          self.size)
    packed_sharding = jax.tree.map(sharding.stacked, state_sharding)
    stack = jax.jit(lambda *s: _stack(s), out_shardings=packed_sharding)
    take = jax.jit(_take, out_shardings=state_sharding)

    group = self._group()
    for k, trial in enumerate(self.trials):
      states[k], group.progress[k] = trials_lib.restore_or_start(
          config, group.loops[k].ckpt, states[k], group.loops[k].train_iter, trial,
          group.seeds[k])
    packed = stack(*states)
    del states

    train_step = trials_lib.AheadOfTime(jax.jit(
        packed_train_step_fn(config, task, self.normalize, group.seeds),
        in_shardings=(packed_sharding, sharding.stacked(self.data_sharding),
                      sharding.replicated(self.mesh)),
        out_shardings=(packed_sharding, sharding.replicated(self.mesh)), donate_argnums=(0,)))
    evaluator = evaluation.Evaluator.create(config, task, self.model.apply, self.normalize,
                                            self.data_sharding, packed=True)
    validations = _Validations(self, evaluator, group)
    packed = PackedLoop(
        group=group, schedule=self.schedule, batch_sharding=sharding.stacked(self.data_sharding),
        step_fn=train_step, validate=validations, take=take).fit(packed)
    for lp in group.loops:
      if hasattr(lp.train_iter, "close"):
        lp.train_iter.close()

    # ---------------------------------------------------------------- test
    best = stack(*[lp.ckpt.restore_best(take(packed, k)) for k, lp in enumerate(group.loops)])
    tester = evaluation.Evaluator.create(config, task, self.model.apply, self.normalize,
                                         self.data_sharding, packed=True, test=True)
    predictions = trials_lib.best_predictions(tester, state_lib.model_variables(best), splits)
    ids = {name: trials_lib.example_ids(getattr(splits, name)) for name in predictions}
    wall_s = round(time.perf_counter() - start, 1)
    # The program ran as long as its longest-training trial: its steps and seconds are
    # the program's, and each trial's record carries them (with its own throughput).
    program = max(group.speeds, key=lambda speed: speed.seconds)
    records = []
    for k in range(n):
      cost = trials_lib.training_cost(program, self.schedule.batch_size, train_step.flops)
      cost["train_images_per_s"] = group.speeds[k].images_per_s()
      records.append(trials_lib.finish_trial(
          group.files[k], task, group.seeds[k], group.progress[k],
          evaluation.unpack(predictions["validation"], k),
          evaluation.unpack(predictions["test"], k), ids, group.loops[k].writer,
          cost={"wall_s": wall_s, "packed_trials": n, **cost}))
      group.loops[k].ckpt.close()
    return records

  def _group(self) -> Group:
    files = [trials_lib.TrialFiles.of(self.workdir, t) for t in self.trials]
    seeds = [self.config.seed + t for t in self.trials]
    loops = []
    for f, seed in zip(files, seeds):
      f.directory.mkdir(parents=True, exist_ok=True)
      loops.append(loop.Loop(
          config=self.config, task=self.task, schedule=self.schedule, step_fn=None,
          validate=None, train_iter=trials_lib.train_iterator(
              self.config, self.task, self.splits, seed),
          ckpt=checkpoints_lib.Checkpoints(f.directory / "ckpt"),
          writer=tensorboard.create_writer(f.tb_dir, just_logging=not runtime.is_lead()),
          log_prefix=f"trial {f.trial}", tb_dir=os.fspath(f.tb_dir)))
    return Group(trials=self.trials, files=files, seeds=seeds, loops=loops,
                 progress=[loop.Progress() for _ in files],
                 speeds=[loop.Speed() for _ in files])


class _Validations:
  """Scores every packed trial on the validation split with one read of it, and shows
  the fixed validation examples' predictions in each trial's TensorBoard."""

  def __init__(self, run: PackedRun, evaluator: evaluation.Evaluator, group: Group):
    self.run, self.evaluator, self.group = run, evaluator, group
    task = run.task
    self.shown = evaluation.first_examples(run.splits.validation, task.pp_eval(test=False),
                                           task.keys, task.num_eval_images)
    self.predict_shown = jax.jit(jax.vmap(task.make_predict(run.model.apply, run.normalize),
                                          in_axes=(0, None))) if self.shown else None
    self.show_gradcam = trials_lib.gradcam_images(run.config, task, run.model, run.normalize,
                                                  run.splits)

  def __call__(self, packed: state_lib.TrainState, step: int) -> list[dict[str, float]]:
    variables = state_lib.model_variables(packed)
    task = self.run.task
    if self.shown:
      _, predicted = self.predict_shown(variables, self.shown)
      for k, lp in enumerate(self.group.loops):
        lp.writer.write_images(step, task.eval_images(self.shown, np.asarray(predicted[k])))
    if self.show_gradcam:
      for k, lp in enumerate(self.group.loops):
        self.show_gradcam(jax.tree.map(lambda x, k=k: x[k], variables), step, lp.writer)
    # The step seeds labels drawn per read, as in an unpacked trial's validation.
    predictions = self.evaluator.predict(variables, self.run.splits.validation, test=False,
                                         seed=step)
    return [task.metrics(evaluation.unpack(predictions, k)) for k in range(self.group.size)]


@dataclasses.dataclass
class PackedLoop:
  """The training loop of packed trials: Loop's cadence, checks and early stopping, per
  trial, around one packed step."""
  group: Group
  schedule: loop.Schedule
  batch_sharding: jax.sharding.NamedSharding  # of the stacked batches
  # (packed state, stacked global batches, active mask) -> (state, stacked metrics)
  step_fn: Callable
  validate: Callable[[state_lib.TrainState, int], list[dict[str, float]]]
  take: Callable[[state_lib.TrainState, int], state_lib.TrainState]  # one trial's state

  def _running(self) -> list[int]:
    return [k for k, p in enumerate(self.group.progress)
            if p.step < self.schedule.total_steps and not p.stopped_early]

  def fit(self, packed: state_lib.TrainState) -> state_lib.TrainState:
    """Trains until every trial has stopped or used its step budget."""
    group, schedule = self.group, self.schedule
    windows = [loop.Window() for _ in group.trials]
    filler = None  # a stopped trial's batch: any batch, its update is discarded
    logging.info("Training %d packed trials for %d steps (%d per epoch, batch %d each), "
                 "evaluating every %d", group.size, schedule.total_steps,
                 schedule.steps_per_epoch, schedule.batch_size, schedule.eval_every)
    compiled = False
    while running := self._running():
      # Trials behind (a kill between two trials' saves) step alone until they catch up.
      behind = min(group.progress[k].step for k in running)
      active = [k in running and group.progress[k].step == behind for k in range(group.size)]
      t = time.perf_counter()
      batches = [next(group.loops[k].train_iter) if active[k] else None
                 for k in range(group.size)]
      wait = time.perf_counter() - t
      filler = filler or jax.tree.map(np.zeros_like, next(b for b in batches if b))
      for k, batch in enumerate(batches):
        if batch and group.progress[k].step == 0:
          group.loops[k].writer.write_images(0, group.loops[k].task.input_images(batch))
      stacked = jax.tree.map(lambda *xs: np.stack(xs), *[b or filler for b in batches])
      if not compiled:
        runtime.freeze_heap()
      packed, metrics = self.step_fn(
          packed, sharding.to_global(stacked, self.batch_sharding), np.asarray(active))
      if not compiled:
        # Compilation happens here: timed apart so it does not dilute the throughput.
        jax.block_until_ready(metrics)
        runtime.thaw_heap()
        first_step_s = time.perf_counter() - t
        logging.info("[packed trials %s] first step took %.1f s (compilation included)",
                     group.trials, first_step_s)
      for k in np.flatnonzero(active):
        group.progress[k].step += 1
        windows[k].metrics.append((metrics, k))
        windows[k].steps += 1
        windows[k].input_wait += wait
        if not compiled:
          group.speeds[k].first_step_s = first_step_s
          group.loops[k].writer.write_scalars(group.progress[k].step,
                                              {"perf/first_step_s": first_step_s})
          windows[k].restart_clock()
      compiled = True
      packed = self._after_step(packed, active, windows)
    for lp in group.loops:
      lp.ckpt.wait_until_finished()
    return packed

  def _after_step(self, packed: state_lib.TrainState, active: list[bool],
                  windows: list[Any]) -> state_lib.TrainState:
    """Loop.fit's reporting, evaluation and preemption, for each trial that stepped."""
    group, schedule = self.group, self.schedule
    preempted = runtime.preemption_requested()
    stepped = [k for k in range(group.size) if active[k]]
    evaluating = [k for k in stepped
                  if group.progress[k].step % schedule.eval_every == 0
                  or group.progress[k].step == schedule.total_steps]
    reporting = [k for k in stepped if windows[k].metrics and (
        preempted or k in evaluating or group.progress[k].step % schedule.log_every == 0)]
    # The trials share each step's stacked metrics: fetched once, then sliced per trial.
    pending = {id(m): m for k in reporting for m, _ in windows[k].metrics}
    fetched = dict(zip(pending, jax.device_get(list(pending.values()))))
    for k in reporting:
      windows[k].metrics = [jax.tree.map(lambda x, k=k: x[k], fetched[id(m)])
                            for m, _ in windows[k].metrics]
      group.loops[k].report(windows[k], group.progress[k], group.speeds[k])
    if evaluating:
      scores = self.validate(packed, group.progress[evaluating[0]].step)
      for k in evaluating:
        lp = group.loops[k]
        trial_state = self.take(packed, k)
        lr = state_lib.learning_rate(trial_state)
        new_lr = state_lib.learning_rate(lp.evaluate(trial_state, group.progress[k],
                                                     val=scores[k]))
        if not math.isclose(new_lr, lr):
          packed = _set_learning_rate(packed, k, new_lr)
        windows[k].restart_clock()
    if preempted:
      for k in self._running():
        lp = group.loops[k]
        lp.ckpt.save_latest(group.progress[k].step, self.take(packed, k), lp.train_iter,
                            group.progress[k].to_json())
      for lp in group.loops:
        lp.ckpt.wait_until_finished()
        lp.writer.flush()
      steps = sorted({group.progress[k].step for k in range(group.size)})
      logging.warning("[packed trials %s] preempted: states saved at step(s) %s",
                      group.trials, steps)
      raise runtime.Preempted(steps[-1])
    return packed


def run_packed(config: ml_collections.ConfigDict, workdir: Any, splits: sources.Splits,
               task: tasks.Task, trials: list[int]) -> list[dict]:
  """The records of `trials` (unfinished trials of the run), trained in groups of
  train.pack_trials (pack_size) as packed programs."""
  records = []
  size = pack_size(config, splits, task, len(trials))
  for first in range(0, len(trials), size):
    records.extend(PackedRun(config, workdir, trials[first:first + size], splits, task).run())
  return records


def pack_size(config: ml_collections.ConfigDict, splits: sources.Splits, task: tasks.Task,
              unfinished: int) -> int:
  """train.pack_trials, or for "auto" the most trials (up to `unfinished`) whose packed
  step fits MEMORY_SHARE of a device's memory by XLA's memory analysis."""
  wanted = config.train.pack_trials
  if wanted != "auto":
    return max(1, min(int(wanted), unfinished))
  limit, source = device_memory_bytes()
  fits, tried = 1, {}
  n = 1
  while n <= unfinished:
    tried[n] = compiled_step_memory(config, splits, task, n)
    if tried[n] > MEMORY_SHARE * limit:
      break
    fits = n
    n *= 2
  logging.info("train.pack_trials=auto: %d trial(s) per program (compiled step memory per "
               "device: %s; limit %.0f%% of %.2f GiB, %s)", fits,
               ", ".join(f"{k} trial(s) {v / 2**30:.2f} GiB" for k, v in tried.items()),
               100 * MEMORY_SHARE, limit / 2**30, source)
  return fits


def compiled_step_memory(config: ml_collections.ConfigDict, splits: sources.Splits,
                         task: tasks.Task, n: int) -> int:
  """Per-device memory of the packed train step of n trials, compiled from shapes alone
  (no state or batch is made)."""
  run = PackedRun(config, None, list(range(n)), splits, task)
  # Pretrained weights load into the variables a random initialisation has: its shapes.
  rng, image = jax.random.key(0), jnp.zeros((1, run.size, run.size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(run.model.init, train=False),
                             {"params": rng, "dropout": rng}, image)
  state = jax.eval_shape(functools.partial(state_lib.create_state, run.model, tx=run.tx),
                         variables)
  state_sharding = sharding.state_shardings(state, run.mesh, config)
  packed_sharding = jax.tree.map(sharding.stacked, state_sharding)
  packed_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((n, *x.shape), x.dtype, sharding=s), state,
      packed_sharding)
  example = next(iter(trials_lib.train_iterator(config, task, splits, 0)))
  batch_sharding = sharding.stacked(run.data_sharding)
  batches = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((n, config.input.batch_size, *x.shape[1:]), x.dtype,
                                     sharding=batch_sharding), example)
  active = jax.ShapeDtypeStruct((n,), bool, sharding=sharding.replicated(run.mesh))
  step = jax.jit(packed_train_step_fn(config, task, run.normalize, list(range(n))),
                 out_shardings=(packed_sharding, sharding.replicated(run.mesh)),
                 donate_argnums=(0,))
  return step_memory_bytes(step.lower(packed_state, batches, active).compile())
