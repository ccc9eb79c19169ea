"""A trial: train with early stopping -> best checkpoint -> test -> trial_K/, and the
pieces packed trials (packed.py) share with it.

`run_trial` reads top to bottom, one banner per stage. A trial is resumable: a finished
one is skipped, an unfinished one restores model, optimizer, schedule, early-stopping
state and the exact position of the data iterator from its latest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import io
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tasks
from medbench_jax.data import device_transforms
from medbench_jax.data import pipeline
from medbench_jax.data import sources
from medbench_jax.data import transforms
from medbench_jax.models import cam
from medbench_jax.tasks import base as tasks_base
from medbench_jax.trainer import checkpoints as checkpoints_lib
from medbench_jax.trainer import evaluation
from medbench_jax.trainer import loop
from medbench_jax.trainer import optim
from medbench_jax.trainer import results as results_lib
from medbench_jax.trainer import sharding
from medbench_jax.trainer import state as state_lib
from medbench_jax.trainer import tensorboard


def input_size(config: ml_collections.ConfigDict, task: tasks.Task, channels: int) -> int:
  """The side of the images the model sees: what the eval preprocessing makes."""
  blank = {"image": np.zeros((config.dataset.image_size,) * 2 + (channels,), np.uint8)}
  return transforms.parse(task.pp_eval(test=False))(blank, np.random.default_rng(0))[
      "image"].shape[0]


def check_splits(config: ml_collections.ConfigDict, splits: sources.Splits) -> None:
  """Fails before any model is built when the configured subset of the data set cannot
  train: an empty split, or fewer training examples than one batch."""
  d = config.dataset
  cause = (f"config.dataset.label_fraction={d.label_fraction}"
           + (", config.dataset.frontal_only=True" if d.frontal_only else ""))
  for name in ("train", "validation", "test"):
    if not len(getattr(splits, name)):
      raise ValueError(f"{cause} leaves no examples in the {name} split of {d.name}.")
  batch_size = config.input.batch_size
  if len(splits.train) < batch_size:
    total = splits.subset["num_examples"]
    raise ValueError(
        f"{cause} leaves {len(splits.train)} of the {total} training examples of {d.name}, "
        f"fewer than one batch (config.input.batch_size={batch_size}): raise "
        f"config.dataset.label_fraction to at least {batch_size / total:.4g} or lower "
        "config.input.batch_size.")


def make_schedule(config: ml_collections.ConfigDict, num_train: int) -> loop.Schedule:
  """num_epochs of whole batches (at most train.max_steps), evaluated once per epoch
  unless train.eval_every_steps says otherwise."""
  batch_size = config.input.batch_size
  steps_per_epoch = num_train // batch_size
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  return loop.Schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                       eval_every=config.train.eval_every_steps or steps_per_epoch,
                       log_every=config.train.log_every_steps, batch_size=batch_size)


def create_model(config: ml_collections.ConfigDict, task: tasks.Task, splits: sources.Splits
           ) -> tuple[nn.Module, int]:
  """The model and the side of its input images."""
  size = input_size(config, task, splits.info.channels)
  return state_lib.create_model(config, task.num_outputs), size


def initial_state(config: ml_collections.ConfigDict, task: tasks.Task, model: nn.Module,
                   size: int, tx: Any, mesh: jax.sharding.Mesh, seed: int
                   ) -> tuple[state_lib.TrainState, Any]:
  """The trial's initial train state placed on the mesh, and the state's shardings."""
  variables = state_lib.init_variables(config, model, task.num_outputs, size, seed)
  return state_lib.create_sharded_state(
      model, variables, tx, mesh, lambda abstract: sharding.state_shardings(abstract, mesh,
                                                                            config))


def log_model(config: ml_collections.ConfigDict, task: tasks.Task, mesh: jax.sharding.Mesh,
               state: state_lib.TrainState, state_sharding: Any, size: int) -> None:
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if mesh.shape[sharding.FSDP] > 1:
    specs = [s.spec for s in jax.tree.leaves(state_sharding.params)]
    logging.info("FSDP over groups of %d devices: %d of %d parameter tensors sharded",
                 mesh.shape[sharding.FSDP], sum(spec != sharding.P() for spec in specs),
                 len(specs))
  logging.info("Model %s: %.2fM parameters, input %dpx, %d outputs (%s)", config.model.name,
               num_params / 1e6, size, task.num_outputs, task.name)


def make_optimizer(config: ml_collections.ConfigDict, schedule: loop.Schedule) -> Any:
  return optim.make_optimizer(config.optim, schedule.total_steps, schedule.steps_per_epoch)


def train_iterator(config: ml_collections.ConfigDict, task: tasks.Task,
                    splits: sources.Splits, seed: int) -> Any:
  """The trial's training batches (this process's part), in the order its seed draws."""
  # On-device augmentation: the host ships the stored images, the train step augments.
  on_device = config.input.augment_on_device
  return iter(pipeline.train_dataset(
      splits.train, pp_spec="" if on_device else task.pp_train(), keys=task.keys,
      local_batch_size=config.input.batch_size // jax.process_count(), seed=seed,
      num_workers=config.input.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count()))


def restore_or_start(config: ml_collections.ConfigDict, ckpt: checkpoints_lib.Checkpoints,
                      state: state_lib.TrainState, train_iter: Any, trial: int, seed: int
                      ) -> tuple[state_lib.TrainState, loop.Progress]:
  """The state and progress of the trial's latest checkpoint (`train_iter` moved to its
  position), or `state` and the progress of step 0 when it has none."""
  restored = ckpt.restore_latest(state, train_iter)
  if restored:
    state, stored = restored
    progress = loop.Progress.from_json(stored)
    logging.info("Resuming trial %d from step %d (checkpoint %s)", trial, progress.step,
                 ckpt.latest.directory)
    return state, progress
  logging.info("Trial %d: starting from step 0 (seed %d)", trial, seed)
  # The plateau schedule's patience is half the early-stopping one (the study's rule).
  return state, loop.Progress(plateau=optim.ReduceLROnPlateau(
      factor=config.optim.plateau_factor, patience=config.train.patience // 2))


def gradcam_images(config: ml_collections.ConfigDict, task: tasks.Task, model: nn.Module,
                   normalize: Any, splits: sources.Splits
                   ) -> Callable[[dict, int, Any], None] | None:
  """`show(variables, step, writer)`: Grad-CAM overlays of the first
  train.gradcam_images validation images (each for its most probable class) in
  TensorBoard's val/gradcam; None where off or not a classification model."""
  count = config.train.gradcam_images
  if not count or task.name != "classification":
    return None
  shown = evaluation.first_examples(splits.validation, task.pp_eval(test=False), ("image",),
                                    count)
  cam_fn = cam.make_cam_fn(model, normalize, "gradcam")

  def show(variables: dict, step: int, writer: Any) -> None:
    maps = np.asarray(cam_fn(variables, shown["image"]))
    writer.write_images(step, {"val/gradcam": tasks_base.image_grid(
        cam.overlay(shown["image"], maps), columns=4)[None]})

  return show


class AheadOfTime:
  """A jitted step compiled ahead of time at its first call, so that XLA's cost analysis
  of the program that runs (its FLOPs, for MFU) is known without compiling it twice."""

  def __init__(self, jitted: Any):
    self.jitted, self.compiled = jitted, None

  def __call__(self, *args: Any) -> Any:
    if self.compiled is None:
      self.compiled = self.jitted.lower(*args).compile()
    return self.compiled(*args)

  @property
  def flops(self) -> float | None:
    """FLOPs of one step (per device where partitioned); None before the first call."""
    return results_lib.flops_of(self.compiled) if self.compiled is not None else None


def training_cost(speed: loop.Speed, batch_size: int, flops_per_step: float | None
                  ) -> dict[str, Any]:
  """A trial's training figures for its record (and the run's efficiency): the timed
  steps (the compiling first step and evaluations left out), their seconds, throughput
  and XLA's FLOPs per step."""
  return {"first_step_s": speed.first_step_s, "train_images_per_s": speed.images_per_s(),
          "train_steps": speed.images // batch_size, "train_seconds": round(speed.seconds, 3),
          "flops_per_step": flops_per_step}


def train_step_fn(config: ml_collections.ConfigDict, task: tasks.Task,
                  normalize: Any, seed: int) -> Any:
  """The trial's update step, unjitted: `(state, batch) -> (state, metrics)`, with the
  task's loss, on-device augmentation where configured and the trial's dropout key.
  `bench lower` lowers this same function."""
  augment = (device_transforms.BatchAugment(task.pp_train(), seed)
             if config.input.augment_on_device else None)
  return functools.partial(state_lib.train_step, loss_fn=task.loss, normalize=normalize,
                           dropout_rng=jax.random.key(seed + 10_000), augment=augment,
                           skip_nonfinite=config.train.nonfinite == "skip")


# The best checkpoint's predictions, per split (with the examples' ids).
PREDICTION_FILES = {"validation": "val_predictions.npz", "test": "test_predictions.npz"}


def example_ids(source: Any) -> np.ndarray:
  """The names of a split's examples, in order: the ids prediction files carry."""
  names = [source[i]["name"] for i in range(len(source))]
  return np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names])


@dataclasses.dataclass
class TrialFiles:
  """Where trial K of a run keeps its outputs."""
  trial: int
  directory: epath.Path  # WORKDIR/trial_K
  tb_dir: epath.Path  # WORKDIR/tb/trial_K

  @classmethod
  def of(cls, workdir: epath.Path, trial: int) -> TrialFiles:
    return cls(trial, workdir / f"trial_{trial}", workdir / "tb" / f"trial_{trial}")

  @property
  def result(self) -> epath.Path:
    return self.directory / "result.json"


def best_predictions(tester: evaluation.Evaluator, variables: dict, splits: sources.Splits
                     ) -> dict[str, dict[str, np.ndarray]]:
  """The best checkpoint's predictions of the validation and test splits, both with the
  test preprocessing (test-time augmentation where configured), so that thresholds and a
  temperature fitted on validation apply to test predictions made the same way."""
  return {name: tester.predict(variables, getattr(splits, name), test=True)
          for name in ("validation", "test")}


def finish_trial(files: TrialFiles, task: tasks.Task, seed: int, progress: loop.Progress,
                 validation: dict[str, np.ndarray], test: dict[str, np.ndarray],
                 ids: dict[str, np.ndarray], writer: Any, cost: dict[str, Any]) -> dict:
  """Scores the best checkpoint's `test` predictions, writes trial_K's prediction files
  (validation and test, with the examples' ids) and result.json, which marks the trial
  finished. Returns the trial's record."""
  test_metrics = task.metrics(test)
  writer.write_scalars(progress.step, {f"test/{k}": v for k, v in test_metrics.items()})
  writer.close()
  logging.info("[trial %d] test (best step %d, %s): %s", files.trial, progress.best_step,
               task.pp_eval(test=True), task.describe(test_metrics, per_class=True))
  record = results_lib.trial_record(
      seed=seed, best_step=progress.best_step, best_val_loss=progress.best_val_loss,
      skipped_updates=progress.skipped_updates, test_metrics=test_metrics, cost=cost)
  record.update(task.post_hoc(validation, test))
  if runtime.is_lead():
    for name, predictions in (("validation", validation), ("test", test)):
      # Built in memory because zip archives seek back, which a bucket object being
      # uploaded cannot.
      npz = io.BytesIO()
      np.savez_compressed(npz, ids=ids[name], **task.test_predictions(predictions))
      paths.write_atomic(files.directory / PREDICTION_FILES[name], npz.getvalue())
    paths.write_json(files.result, record)
  return record


def run_trial(config: ml_collections.ConfigDict, workdir: epath.Path, trial: int,
              splits: sources.Splits, task: tasks.Task, mesh: jax.sharding.Mesh) -> dict:
  """Trial `trial` of the run in `workdir` (seed config.seed + trial): trains it, resuming
  from its latest checkpoint, tests its best checkpoint and writes WORKDIR/trial_K.
  Returns its record (result.json); a finished trial's is read back, not recomputed."""
  seed = config.seed + trial
  files = TrialFiles.of(workdir, trial)
  if files.result.exists():
    logging.info("Trial %d already finished: %s", trial, files.result)
    return paths.read_json(files.result)
  start = time.perf_counter()
  files.directory.mkdir(parents=True, exist_ok=True)
  writer = tensorboard.create_writer(files.tb_dir, just_logging=not runtime.is_lead())

  # ---------------------------------------------------------------- input
  schedule = make_schedule(config, len(splits.train))
  train_iter = train_iterator(config, task, splits, seed)

  # ---------------------------------------------------------------- model
  model, size = create_model(config, task, splits)
  state, state_sharding = initial_state(config, task, model, size,
                                         make_optimizer(config, schedule), mesh, seed)
  log_model(config, task, mesh, state, state_sharding, size)

  # ---------------------------------------------------------------- steps
  normalize = state_lib.normalizer(config)
  data_sharding = sharding.batch_sharding(mesh)
  train_step = AheadOfTime(jax.jit(
      train_step_fn(config, task, normalize, seed),
      in_shardings=(state_sharding, data_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,)))
  evaluator = evaluation.Evaluator.create(config, task, model.apply, normalize, data_sharding)
  shown = evaluation.first_examples(splits.validation, task.pp_eval(test=False), task.keys,
                                    task.num_eval_images)
  predict_shown = jax.jit(task.make_predict(model.apply, normalize)) if shown else None
  show_gradcam = gradcam_images(config, task, model, normalize, splits)

  def validate(state: state_lib.TrainState, step: int) -> dict[str, float]:
    if shown:
      _, predicted = predict_shown(state_lib.model_variables(state), shown)
      writer.write_images(step, task.eval_images(shown, np.asarray(predicted)))
    if show_gradcam:
      show_gradcam(state_lib.model_variables(state), step, writer)
    # Validation labels drawn per read (the study's LSR on validation) change with
    # every validation, reproducibly: the step seeds them.
    return task.metrics(evaluator.predict(state_lib.model_variables(state), splits.validation,
                                          test=False, seed=step))

  # ---------------------------------------------------------------- resume
  ckpt = checkpoints_lib.Checkpoints(files.directory / "ckpt")
  state, progress = restore_or_start(config, ckpt, state, train_iter, trial, seed)

  # ---------------------------------------------------------------- train
  state, speed = loop.Loop(
      config=config, task=task, schedule=schedule,
      step_fn=lambda state, local: train_step(state, sharding.to_global(local, data_sharding)),
      validate=validate, train_iter=train_iter, ckpt=ckpt, writer=writer,
      log_prefix=f"trial {trial}", tb_dir=os.fspath(files.tb_dir)).fit(state, progress)
  if hasattr(train_iter, "close"):
    train_iter.close()

  # ---------------------------------------------------------------- test
  tester = evaluation.Evaluator.create(config, task, model.apply, normalize, data_sharding,
                                      test=True)
  predictions = best_predictions(tester, state_lib.model_variables(ckpt.restore_best(state)),
                                 splits)
  record = finish_trial(
      files, task, seed, progress, predictions["validation"], predictions["test"],
      {name: example_ids(getattr(splits, name)) for name in predictions}, writer,
      cost={"wall_s": round(time.perf_counter() - start, 1),
            **training_cost(speed, schedule.batch_size, train_step.flops)})
  ckpt.close()
  return record
