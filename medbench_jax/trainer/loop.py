"""The fine-tuning loop of one trial: steps, evaluation cadence, early stopping,
reduce-on-plateau, speed logging, TensorBoard and checkpoints. Task-agnostic: what the
outputs mean comes from the Task.

Early stopping follows the reference study: after every evaluation, a strictly lower
validation loss is the new best (saved to `best`); the trial stops at the evaluation that
makes `patience + 1` in a row without one (patience 10: the 11th). The `latest` checkpoint
is written after every evaluation, with the data iterator's position and the loop's
`Progress`, so a resumed trial replays nothing.

Every step's loss and gradient norm are checked before the next evaluation or save
(so a non-finite update never reaches a checkpoint): train.nonfinite="stop" ends the
trial with NonFiniteError naming the first such step, its learning rate and its
batch's statistics; "skip" (the step left the state as it was) logs and counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import math
import shutil
import tempfile
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax.tasks import base as tasks_base
from medbench_jax.trainer import checkpoints as checkpoints_lib
from medbench_jax.trainer import optim
from medbench_jax.trainer import state as state_lib


@dataclasses.dataclass
class Progress:
  """Where a trial stands: stored as JSON (these fields, in this order) in every `latest`
  checkpoint, so a resumed trial continues exactly where it stopped."""
  step: int = 0  # updates done
  best_val_loss: float = math.inf
  best_step: int = -1  # the step of best_val_loss; -1 before the first evaluation
  bad_evals: int = 0  # evaluations in a row without a lower validation loss
  stopped_early: bool = False
  skipped_updates: int = 0  # non-finite updates skipped (train.nonfinite="skip")
  plateau: optim.ReduceLROnPlateau = dataclasses.field(default_factory=optim.ReduceLROnPlateau)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, stored: Mapping[str, Any]) -> Progress:
    """The inverse of to_json; checkpoints from before skipped_updates existed give 0."""
    return cls(**{**stored, "plateau": optim.ReduceLROnPlateau(**stored["plateau"])})


@dataclasses.dataclass
class Schedule:
  """How long a trial trains and how often it evaluates, in steps."""
  total_steps: int
  steps_per_epoch: int
  eval_every: int
  log_every: int
  batch_size: int


@dataclasses.dataclass
class Speed:
  """Training throughput of this run (excluding evaluations and the compiling first step)."""
  first_step_s: float | None = None
  images: int = 0
  seconds: float = 0.0

  def images_per_s(self) -> float | None:
    return self.images / self.seconds if self.seconds else None


@dataclasses.dataclass
class Window:
  """The steps since the last report: their metrics (not yet fetched) and timing."""
  metrics: list = dataclasses.field(default_factory=list)
  steps: int = 0  # steps timed (not the compiling first step)
  input_wait: float = 0.0  # of those steps, seconds spent waiting for batches
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def restart_clock(self) -> None:
    self.steps, self.input_wait, self.start = 0, 0.0, time.perf_counter()


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# Per-step metrics written to TensorBoard (the step also returns its batch's statistics).
LOGGED_METRICS = ("loss", "grad_norm", "lr")


class NonFiniteError(FloatingPointError):
  """A training step whose loss or gradients are not finite (train.nonfinite="stop")."""


def describe_batch(stats: dict[str, float]) -> str:
  """'image min .. max .., mean ..; labels ...' from state.batch_statistics."""
  keys = dict.fromkeys(k.rsplit("_", 1)[0] for k in stats)
  return "; ".join(
      f"{key} min {stats[key + '_min']:.4g} max {stats[key + '_max']:.4g} mean "
      f"{stats[key + '_mean']:.4g}, {int(stats[key + '_nonfinite'])} non-finite value(s)"
      for key in keys)


@dataclasses.dataclass
class Loop:
  """The training loop of one trial and what it works with; `fit` runs it."""
  config: ml_collections.ConfigDict
  task: tasks_base.Task
  schedule: Schedule
  # (state, this process's batch) -> (state, metrics): one update on the global batch.
  step_fn: Callable[[state_lib.TrainState, dict], tuple[state_lib.TrainState, dict]]
  # (state, step) -> the validation metrics, "loss" among them.
  validate: Callable[[state_lib.TrainState, int], dict[str, float]]
  train_iter: Iterator
  ckpt: checkpoints_lib.Checkpoints
  writer: metric_writers.MetricWriter
  log_prefix: str  # "trial K": starts the log lines, to tell trials apart
  tb_dir: str  # where a profiler trace (config.train.profile_steps) goes

  def fit(self, state: state_lib.TrainState, progress: Progress
          ) -> tuple[state_lib.TrainState, Speed]:
    """Trains from `progress.step` until the step budget or early stopping, updating
    `progress`; returns the final state and the measured speed."""
    schedule = self.schedule
    speed = Speed()
    logging.info("Training for %d steps (%d per epoch, batch %d), evaluating every %d",
                 schedule.total_steps, schedule.steps_per_epoch, schedule.batch_size,
                 schedule.eval_every)
    window = Window()
    profile = [int(x) for x in self.config.train.profile_steps.split(":")] if (
        self.config.train.profile_steps) else None
    trace_dir = None  # where the running profiler trace goes
    while progress.step < schedule.total_steps and not progress.stopped_early:
      if profile and progress.step == profile[0]:
        # JAX's profiler writes a URL through XLA's own GCS client, not epath: trace
        # locally, copy into tb_dir at the end.
        trace_dir = (tempfile.mkdtemp(prefix="medbench_trace_")
                     if paths.is_remote(self.tb_dir) else self.tb_dir)
        jax.profiler.start_trace(trace_dir)
      compiling = speed.first_step_s is None
      state = self._train_step(state, progress, window, compiling)
      # A run resumed inside the profiled steps started no trace.
      if trace_dir is not None and progress.step == profile[1]:
        jax.block_until_ready(window.metrics[-1])
        jax.profiler.stop_trace()
        if trace_dir != self.tb_dir:
          paths.copy_tree(trace_dir, self.tb_dir)
          shutil.rmtree(trace_dir, ignore_errors=True)
        trace_dir = None
        logging.info("[%s] profile of steps %d-%d written to %s", self.log_prefix, profile[0],
                     profile[1] - 1, self.tb_dir)
      if compiling:
        # Compilation happens here: timed apart so it does not dilute the throughput.
        jax.block_until_ready(window.metrics[-1])
        runtime.thaw_heap()
        speed.first_step_s = time.perf_counter() - window.start
        self.writer.write_scalars(progress.step, {"perf/first_step_s": speed.first_step_s})
        logging.info("[%s] first step took %.1f s (compilation included)", self.log_prefix,
                     speed.first_step_s)
        window.restart_clock()

      preempted = runtime.preemption_requested()
      evaluating = (progress.step % schedule.eval_every == 0
                    or progress.step == schedule.total_steps)
      # Every evaluation and save comes after a check of the steps since the last one, so
      # a non-finite update never reaches a checkpoint.
      if window.metrics and (preempted or evaluating
                             or progress.step % schedule.log_every == 0):
        self.report(window, progress, speed)
      if evaluating:
        state = self.evaluate(state, progress)
        window.restart_clock()
      if preempted:
        self.ckpt.save_latest(progress.step, state, self.train_iter, progress.to_json())
        self.ckpt.wait_until_finished()
        self.writer.flush()
        logging.warning("[%s] preempted: state saved at step %d", self.log_prefix,
                        progress.step)
        raise runtime.Preempted(progress.step)
    self.ckpt.wait_until_finished()
    return state, speed

  def _train_step(self, state: state_lib.TrainState, progress: Progress, window: Window,
                  compiling: bool) -> state_lib.TrainState:
    """One update on the next batch; its metrics wait in `window` for the next report."""
    t = time.perf_counter()
    local = next(self.train_iter)
    window.input_wait += time.perf_counter() - t
    if progress.step == 0:
      self.writer.write_images(0, self.task.input_images(local))
    if compiling:
      runtime.freeze_heap()  # while the step is traced and compiled
    state, step_metrics = self.step_fn(state, local)
    window.metrics.append(step_metrics)
    window.steps += 1
    progress.step += 1
    return state

  def report(self, window: Window, progress: Progress, speed: Speed) -> None:
    """Fetches and checks the window's step metrics, writes them, and logs the speed of
    its timed steps; the window starts again."""
    fetched = jax.device_get(window.metrics)
    window.metrics = []
    step, schedule = progress.step, self.schedule
    first = step - len(fetched) + 1
    self._check_finite(fetched, first, progress)
    for i, m in enumerate(fetched):
      self.writer.write_scalars(first + i, {f"train/{k}": float(v) for k, v in m.items()
                                            if k in LOGGED_METRICS})
    if not window.steps:  # only the compiling first step, timed on its own
      return
    elapsed = time.perf_counter() - window.start
    rate = window.steps * schedule.batch_size / elapsed
    speed.images += window.steps * schedule.batch_size
    speed.seconds += elapsed
    self.writer.write_scalars(step, {"perf/images_per_s": rate,
                                     "perf/step_time_s": elapsed / window.steps,
                                     "perf/input_wait_fraction": window.input_wait / elapsed})
    logging.info("[%s] step %d/%d (epoch %.1f) loss %.4f lr %.2e | %.1f img/s, "
                 "input wait %.0f%% | ETA %s", self.log_prefix, step, schedule.total_steps,
                 step / schedule.steps_per_epoch, fetched[-1]["loss"], fetched[-1]["lr"],
                 rate, 100 * window.input_wait / elapsed,
                 format_eta((schedule.total_steps - step) * elapsed / window.steps))
    window.restart_clock()

  def _check_finite(self, fetched: list[dict], first_step: int, progress: Progress) -> None:
    """Stops at the first non-finite step of `fetched` (steps first_step, ...), or counts
    and logs the updates the step skipped (train.nonfinite="skip")."""
    for i, m in enumerate(fetched):
      if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
        continue
      what = (f"loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])} at step "
              f"{first_step + i} (learning rate {float(m['lr']):.3g}); its batch: "
              f"{describe_batch(m['batch'])}")
      if self.config.train.nonfinite == "skip":
        progress.skipped_updates += int(m["skipped"])
        logging.warning("[%s] non-finite update skipped (train.nonfinite=skip): %s",
                        self.log_prefix, what)
        continue
      saved = self.ckpt.latest.latest_step()
      raise NonFiniteError(
          f"[{self.log_prefix}] non-finite {what}. Stopped; "
          + (f"the latest checkpoint (step {saved}, "
             f"{self.ckpt.latest.directory / str(saved)}) holds the state before it"
             if saved is not None else "no checkpoint was saved")
          + ". Check the data for bad values (labels, masks), lower optim.lr or set "
          "optim.grad_clip_norm; train.nonfinite=skip skips such updates instead.")

  def evaluate(self, state: state_lib.TrainState, progress: Progress,
               val: dict[str, float] | None = None) -> state_lib.TrainState:
    """Validates (or takes `val`, metrics already computed: packed trials score all
    trials with one read of the split); a lower loss is saved as `best`; steps the
    plateau schedule, decides on early stopping and saves `latest`. Returns the state
    (its learning rate may change)."""
    step = progress.step
    if val is None:
      val = self.validate(state, step)
    self.writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
    improved = val["loss"] < progress.best_val_loss
    if improved:
      progress.best_val_loss, progress.best_step, progress.bad_evals = val["loss"], step, 0
      self.ckpt.save_best(step, state, val)
    else:
      progress.bad_evals += 1
    if self.config.optim.schedule == "plateau":
      lr = state_lib.learning_rate(state)
      new_lr = progress.plateau.step(val["loss"], lr)
      if new_lr != lr:
        logging.info("Validation loss plateaued: learning rate %.2e -> %.2e", lr, new_lr)
        state = state_lib.set_learning_rate(state, new_lr)
    progress.stopped_early = progress.bad_evals > self.config.train.patience
    logging.info("[%s] step %d val loss %.4f %s%s", self.log_prefix, step, val["loss"],
                 self.task.describe(val), " (best)" if improved else "")
    self.ckpt.save_latest(step, state, self.train_iter, progress.to_json())
    if progress.stopped_early:
      logging.info("Early stopping at step %d: no lower val loss for %d evaluations",
                   step, progress.bad_evals)
    return state
