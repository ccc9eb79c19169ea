"""The fine-tuning loop of one trial: steps, evaluation cadence, early stopping,
reduce-on-plateau, speed logging, TensorBoard and checkpoints. Task-agnostic: what the
outputs mean comes from the Task.

Early stopping follows the reference study: after every evaluation, a strictly lower
validation loss is the new best (saved to `best`); the trial stops once `patience`
evaluations in a row did not improve. The `latest` checkpoint is written after every
evaluation, with the data iterator's position, so a resumed trial replays nothing.

Every step's loss and gradient norm are checked before the next evaluation or save
(so a non-finite update never reaches a checkpoint): train.nonfinite="stop" ends the
trial with NonFiniteError naming the first such step, its learning rate and its
batch's statistics; "skip" (the step left the state as it was) logs and counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from medbench_jax import runtime
from medbench_jax.tasks import base as tasks_base
from medbench_jax.trainer import checkpoints as checkpoints_lib
from medbench_jax.trainer import optim
from medbench_jax.trainer import state as state_lib


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


def check_finite(fetched: list[dict], first_step: int, policy: str, progress: dict,
                 ckpt: checkpoints_lib.Checkpoints, label: str) -> None:
  """Stops at the first non-finite step of `fetched` (steps first_step, ...), or counts
  and logs the updates the step skipped (policy "skip")."""
  for i, m in enumerate(fetched):
    if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
      continue
    what = (f"loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])} at step "
            f"{first_step + i} (learning rate {float(m['lr']):.3g}); its batch: "
            f"{describe_batch(m['batch'])}")
    if policy == "skip":
      progress["skipped_updates"] += int(m["skipped"])
      logging.warning("[%s] non-finite update skipped (train.nonfinite=skip): %s", label,
                      what)
      continue
    saved = ckpt.latest.latest_step()
    raise NonFiniteError(
        f"[{label}] non-finite {what}. Stopped; "
        + (f"the latest checkpoint (step {saved}, {ckpt.latest.directory / str(saved)}) "
           "holds the state before it" if saved is not None else "no checkpoint was saved")
        + ". Check the data for bad values (labels, masks), lower optim.lr or set "
        "optim.grad_clip_norm; train.nonfinite=skip skips such updates instead.")


def fit(*, config: ml_collections.ConfigDict, task: tasks_base.Task,
        state: state_lib.TrainState, progress: dict, schedule: Schedule,
        step_fn: Callable, validate: Callable[[state_lib.TrainState, int], dict[str, float]],
        train_iter: Iterator, to_global: Callable, ckpt: checkpoints_lib.Checkpoints,
        writer: metric_writers.MetricWriter, label: str, tb_dir: str
        ) -> tuple[Any, dict, Speed]:
  """Trains from `progress["step"]` until the step budget or early stopping.

  `validate(state, step)` returns the validation metrics ("loss" among them);
  `to_global(local_batch)` turns this process's batch into global arrays; `tb_dir` is
  where a profiler trace (config.train.profile_steps) goes.
  Returns the final state, the progress record and the measured speed.
  """
  plateau = optim.ReduceLROnPlateau(**progress["plateau"])
  step = progress["step"]
  speed = Speed()
  logging.info("Training for %d steps (%d per epoch, batch %d), evaluating every %d",
               schedule.total_steps, schedule.steps_per_epoch, schedule.batch_size,
               schedule.eval_every)
  window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
  first_step_start = time.perf_counter()
  pending_metrics = []
  profile = [int(x) for x in config.train.profile_steps.split(":")] if (
      config.train.profile_steps) else None
  while step < schedule.total_steps and not progress["stopped_early"]:
    if profile and step == profile[0]:
      jax.profiler.start_trace(tb_dir)
    t = time.perf_counter()
    local = next(train_iter)
    wait_time += time.perf_counter() - t
    if step == 0:
      writer.write_images(0, task.input_images(local))
    if speed.first_step_s is None:
      runtime.freeze_heap()  # while the step is traced and compiled
    state, step_metrics = step_fn(state, to_global(local))
    pending_metrics.append(step_metrics)
    step += 1
    window_steps += 1
    if profile and step == profile[1]:
      jax.block_until_ready(step_metrics)
      jax.profiler.stop_trace()
      logging.info("[%s] profile of steps %d-%d written to %s", label, profile[0],
                   profile[1] - 1, tb_dir)
    if speed.first_step_s is None:
      # Compilation happens here: timed apart so it does not dilute the throughput.
      jax.block_until_ready(step_metrics)
      runtime.thaw_heap()
      speed.first_step_s = time.perf_counter() - first_step_start
      writer.write_scalars(step, {"perf/first_step_s": speed.first_step_s})
      logging.info("[%s] first step took %.1f s (compilation included)", label,
                   speed.first_step_s)
      window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0

    preempted = runtime.preemption_requested(step)
    evaluating = step % schedule.eval_every == 0 or step == schedule.total_steps
    # Every evaluation and save comes after a check of the steps since the last one, so
    # a non-finite update never reaches a checkpoint.
    if window_steps and (preempted or evaluating or step % schedule.log_every == 0):
      fetched = jax.device_get(pending_metrics)
      pending_metrics = []
      first = step - len(fetched) + 1
      check_finite(fetched, first, config.train.nonfinite, progress, ckpt, label)
      elapsed = time.perf_counter() - window_start
      for i, m in enumerate(fetched):
        writer.write_scalars(first + i, {f"train/{k}": float(v) for k, v in m.items()
                                         if k in LOGGED_METRICS})
      rate = window_steps * schedule.batch_size / elapsed
      speed.images += window_steps * schedule.batch_size
      speed.seconds += elapsed
      writer.write_scalars(step, {"perf/images_per_s": rate,
                                  "perf/step_time_s": elapsed / window_steps,
                                  "perf/input_wait_fraction": wait_time / elapsed})
      logging.info("[%s] step %d/%d (epoch %.1f) loss %.4f lr %.2e | %.1f img/s, "
                   "input wait %.0f%% | ETA %s", label, step, schedule.total_steps,
                   step / schedule.steps_per_epoch, fetched[-1]["loss"], fetched[-1]["lr"],
                   rate, 100 * wait_time / elapsed,
                   format_eta((schedule.total_steps - step) * elapsed / window_steps))
      window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0

    if evaluating:
      val = validate(state, step)
      writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
      improved = val["loss"] < progress["best_val_loss"]
      if improved:
        progress.update(best_val_loss=val["loss"], best_step=step, bad_evals=0)
        ckpt.save_best(step, state, val)
      else:
        progress["bad_evals"] += 1
      if config.optim.schedule == "plateau":
        lr = state_lib.learning_rate(state)
        new_lr = plateau.step(val["loss"], lr)
        if new_lr != lr:
          logging.info("Validation loss plateaued: learning rate %.2e -> %.2e", lr, new_lr)
          state = state_lib.set_learning_rate(state, new_lr)
      progress.update(step=step, plateau=plateau.state_dict(),
                      stopped_early=progress["bad_evals"] > config.train.patience)
      logging.info("[%s] step %d val loss %.4f %s%s", label, step, val["loss"],
                   task.describe(val), " (best)" if improved else "")
      ckpt.save_latest(step, state, train_iter, progress)
      if progress["stopped_early"]:
        logging.info("Early stopping at step %d: no lower val loss for %d evaluations",
                     step, progress["bad_evals"])
      window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
    if preempted:
      progress["step"] = step
      ckpt.save_latest(step, state, train_iter, progress)
      ckpt.wait_until_finished()
      writer.flush()
      logging.warning("[%s] preempted: state saved at step %d", label, step)
      raise runtime.Preempted(step)
  ckpt.wait_until_finished()
  return state, progress, speed
