"""A run: `config.num_trials` trials of (train with early stopping -> best checkpoint ->
test), then results.json.

Reads top to bottom, one banner per stage. A run is resumable at every level: a
finished workdir prints its results, a finished trial is skipped, an unfinished trial
restores model, optimizer, schedule, early-stopping state and the exact position of
the data iterator from its latest checkpoint.
"""

from __future__ import annotations

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

from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tasks
from medbench_jax.data import device_transforms
from medbench_jax.data import pipeline
from medbench_jax.data import sources
from medbench_jax.data import transforms
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


def _schedule(config: ml_collections.ConfigDict, num_train: int) -> loop.Schedule:
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


def _model_and_state(config: ml_collections.ConfigDict, task: tasks.Task,
                     splits: sources.Splits, mesh: jax.sharding.Mesh, schedule: loop.Schedule,
                     seed: int) -> tuple[nn.Module, state_lib.TrainState, Any]:
  """The model, its train state placed on the mesh, and the state's shardings."""
  size = input_size(config, task, splits.info.channels)
  model = state_lib.create_model(config, task.num_outputs)
  variables = state_lib.init_variables(config, model, task.num_outputs, size, seed)
  state, state_sharding = state_lib.create_sharded_state(
      model, variables, optim.make_optimizer(config.optim, schedule.total_steps,
                                             schedule.steps_per_epoch), mesh,
      lambda abstract: sharding.state_shardings(abstract, mesh, config))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if mesh.shape[sharding.FSDP] > 1:
    specs = [s.spec for s in jax.tree.leaves(state_sharding.params)]
    logging.info("FSDP over groups of %d devices: %d of %d parameter tensors sharded",
                 mesh.shape[sharding.FSDP], sum(spec != sharding.P() for spec in specs),
                 len(specs))
  logging.info("Model %s: %.2fM parameters, input %dpx, %d outputs (%s)", config.model.name,
               num_params / 1e6, size, task.num_outputs, task.name)
  return model, state, state_sharding


def _restore_or_start(config: ml_collections.ConfigDict, ckpt: checkpoints_lib.Checkpoints,
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


def run_trial(config: ml_collections.ConfigDict, workdir: epath.Path, trial: int,
              splits: sources.Splits, task: tasks.Task, mesh: jax.sharding.Mesh) -> dict:
  """Trial `trial` of the run in `workdir` (seed config.seed + trial): trains it, resuming
  from its latest checkpoint, tests its best checkpoint and writes WORKDIR/trial_K.
  Returns its record (result.json); a finished trial's is read back, not recomputed."""
  seed = config.seed + trial
  trial_dir = workdir / f"trial_{trial}"
  result_path = trial_dir / "result.json"
  if result_path.exists():
    logging.info("Trial %d already finished: %s", trial, result_path)
    return paths.read_json(result_path)
  start = time.perf_counter()
  trial_dir.mkdir(parents=True, exist_ok=True)
  tb_dir = workdir / "tb" / f"trial_{trial}"
  writer = tensorboard.create_writer(tb_dir, just_logging=not runtime.is_lead())

  # ---------------------------------------------------------------- input
  schedule = _schedule(config, len(splits.train))
  # On-device augmentation: the host ships the stored images, the train step augments.
  on_device = config.input.augment_on_device
  train_iter = iter(pipeline.train_dataset(
      splits.train, pp_spec="" if on_device else task.pp_train(), keys=task.keys,
      local_batch_size=config.input.batch_size // jax.process_count(), seed=seed,
      num_workers=config.input.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count()))

  # ---------------------------------------------------------------- model
  model, state, state_sharding = _model_and_state(config, task, splits, mesh, schedule, seed)

  # ---------------------------------------------------------------- steps
  normalize = state_lib.normalizer(config)
  data_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      train_step_fn(config, task, normalize, seed),
      in_shardings=(state_sharding, data_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  evaluator = evaluation.Evaluator.create(config, task, model.apply, normalize, data_sharding)
  shown = evaluation.first_examples(splits.validation, task.pp_eval(test=False), task.keys,
                                    task.num_eval_images)
  predict_shown = jax.jit(task.make_predict(model.apply, normalize)) if shown else None

  def validate(state: state_lib.TrainState, step: int) -> dict[str, float]:
    if shown:
      _, predicted = predict_shown(state_lib.model_variables(state), shown)
      writer.write_images(step, task.eval_images(shown, np.asarray(predicted)))
    # Validation labels drawn per read (the study's LSR on validation) change with
    # every validation, reproducibly: the step seeds them.
    return task.metrics(evaluator.predict(state_lib.model_variables(state), splits.validation,
                                          test=False, seed=step))

  # ---------------------------------------------------------------- resume
  ckpt = checkpoints_lib.Checkpoints(trial_dir / "ckpt")
  state, progress = _restore_or_start(config, ckpt, state, train_iter, trial, seed)

  # ---------------------------------------------------------------- train
  state, speed = loop.Loop(
      config=config, task=task, schedule=schedule,
      step_fn=lambda state, local: train_step(state, sharding.to_global(local, data_sharding)),
      validate=validate, train_iter=train_iter, ckpt=ckpt, writer=writer,
      log_prefix=f"trial {trial}", tb_dir=os.fspath(tb_dir)).fit(state, progress)
  if hasattr(train_iter, "close"):
    train_iter.close()

  # ---------------------------------------------------------------- test
  predictions = evaluator.predict(state_lib.model_variables(ckpt.restore_best(state)),
                                  splits.test, test=True)
  test = task.metrics(predictions)
  writer.write_scalars(progress.step, {f"test/{k}": v for k, v in test.items()})
  writer.close()
  logging.info("[trial %d] test (best step %d, %s): %s", trial, progress.best_step,
               task.pp_eval(test=True), task.describe(test, per_class=True))
  record = results_lib.trial_record(
      seed=seed, best_step=progress.best_step, best_val_loss=progress.best_val_loss,
      skipped_updates=progress.skipped_updates, test_metrics=test,
      cost={"wall_s": round(time.perf_counter() - start, 1),
            "first_step_s": speed.first_step_s, "train_images_per_s": speed.images_per_s()})
  if runtime.is_lead():
    # Written before result.json, which marks the trial finished; built in memory because
    # zip archives seek back, which a bucket object being uploaded cannot.
    npz = io.BytesIO()
    np.savez_compressed(npz, **task.test_predictions(predictions))
    paths.write_atomic(trial_dir / "test_predictions.npz", npz.getvalue())
    paths.write_json(result_path, record)
  ckpt.close()
  return record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs all trials of `config` in `workdir` (data already prepared); returns results.json."""
  start = time.perf_counter()
  workdir = paths.as_path(workdir)  # local (made absolute) or a bucket URL
  results_path = workdir / "results.json"
  if results_path.exists():
    results = paths.read_json(results_path)
    logging.info("%s is finished; not retraining. Test %s: %s", workdir, results["metric"],
                 results["summary"])
    return results
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = config_lib.to_dict(config)
  if runtime.is_lead():
    paths.write_json(workdir / "config.json", resolved)
  logging.info("Devices: %d (%s) over %d process(es)", jax.device_count(),
               jax.devices()[0].platform, jax.process_count())

  splits = sources.open_splits(config.dataset)
  check_splits(config, splits)
  task = tasks.for_dataset(config, splits.info)
  mesh = sharding.make_mesh(config.mesh.fsdp)
  trials = [run_trial(config, workdir, trial, splits, task, mesh)
            for trial in range(config.num_trials)]

  results = results_lib.assemble(
      task_fields=task.results_fields(), config=resolved, trials=trials, subset=splits.subset,
      skipped_examples=splits.info.skipped_examples,
      provenance=results_lib.provenance(resolved, splits.info.split_hashes),
      wall_s=time.perf_counter() - start)
  if runtime.is_lead():
    paths.write_json(results_path, results)
  logging.info("Test %s over %d trial(s): %s", results["metric"], len(trials),
               results["summary"])
  return results
