"""Fine-tuning loop: trials x (train with early stopping -> best checkpoint -> test).

Reads top to bottom, one banner per stage. A run is resumable at every level: a
finished workdir prints its results, a finished trial is skipped, an unfinished
trial restores model, optimizer, schedule, early-stopping state and the exact
position of the data iterator from its latest checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from etils import epath
from flax.training import train_state

from medbench_jax import config_lib
from medbench_jax import evaluate
from medbench_jax import models
from medbench_jax import optim
from medbench_jax import sharding
from medbench_jax import weights
from medbench_jax.data import pipeline
from medbench_jax.data import prepare
from medbench_jax.data import sources
from medbench_jax.data import transforms


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  return models.create(config.model.name, num_classes,
                       dtype=jnp.dtype(config.model.dtype), **config.model.kw.to_dict())


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, num_classes: int,
                   input_size: int, seed: int) -> dict:
  if config.model.init == "random":
    rng = jax.random.key(seed)
    dummy = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(
        {"params": rng, "dropout": rng}, dummy)
  # Any weights.load source: a checkpoint file (format detected, or FORMAT:PATH), a
  # medbench_jax.convert directory, run:WORKDIR (domain-adaptive chaining), timm:NAME.TAG.
  logging.info("Initialising %s from %s", config.model.name, config.model.init)
  return weights.load(config.model.name, config.model.init, num_classes, seed=seed,
                      **config.model.kw.to_dict())


def train_step(state: TrainState, batch: dict, *, mean, std, dropout_rng) -> tuple:
  """One update on the global batch; BatchNorm statistics span all devices."""
  rng = jax.random.fold_in(dropout_rng, state.step)
  images = pipeline.normalize(batch["image"], mean, std)

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    logits, updates = state.apply_fn(variables, images, train=True,
                                     mutable=["batch_stats"], rngs={"dropout": rng})
    loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                              batch["labels"]).mean()
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if state.batch_stats:
    state = state.replace(batch_stats=updates["batch_stats"])
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "lr": optim.find_hyperparams(state.opt_state)["learning_rate"]}
  return state, metrics


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  hyperparams = optim.find_hyperparams(state.opt_state)
  hyperparams["learning_rate"] = jnp.asarray(
      lr, hyperparams["learning_rate"].dtype, device=hyperparams["learning_rate"].sharding)
  return state


def _image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """(N, H, W, 1) uint8 -> one (rows*H, columns*W, 1) uint8 mosaic for TensorBoard."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_trial(config: ml_collections.ConfigDict, workdir: epath.Path, trial: int,
              splits: sources.Splits, mesh: jax.sharding.Mesh) -> dict:
  seed = config.seed + trial
  trial_dir = workdir / f"trial_{trial}"
  result_path = trial_dir / "result.json"
  if result_path.exists():
    logging.info("Trial %d already finished: %s", trial, result_path)
    return json.loads(result_path.read_text())
  trial_dir.mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(
      workdir / "tb" / f"trial_{trial}", just_logging=jax.process_index() > 0)

  # ---------------------------------------------------------------- input
  num_classes = len(splits.info.class_names)
  keys = ("image", "labels")
  batch_size = config.input.batch_size
  sharding.check_batch_size(batch_size, "input.batch_size")
  sharding.check_batch_size(config.input.eval_batch_size, "input.eval_batch_size")
  local_batch = batch_size // jax.process_count()
  local_eval_batch = config.input.eval_batch_size // jax.process_count()
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_ds = pipeline.train_dataset(
      splits.train, pp_spec=config.input.pp_train, keys=keys, local_batch_size=local_batch,
      seed=seed, num_workers=config.input.num_workers, **process)
  train_iter = iter(train_ds)
  eval_ds = functools.partial(pipeline.eval_dataset, keys=keys,
                              local_batch_size=local_eval_batch,
                              num_workers=config.input.num_workers, **process)
  val_ds = eval_ds(splits.validation, pp_spec=config.input.pp_eval)
  test_ds = eval_ds(splits.test, pp_spec=config.input.pp_test
                    if config.train.test_tta else config.input.pp_eval)
  steps_per_epoch = len(splits.train) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.input.batch_size={batch_size} exceeds the {len(splits.train)} "
                     "training examples.")
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)
  eval_every = config.train.eval_every_steps or steps_per_epoch
  sample = transforms.parse(config.input.pp_eval)(
      {"image": np.zeros((config.dataset.image_size,) * 2 + (1,), np.uint8)},
      np.random.default_rng(0))
  input_size = sample["image"].shape[0]

  # ---------------------------------------------------------------- model
  model = create_model(config, num_classes)
  variables = init_variables(config, model, num_classes, input_size, seed)
  tx = optim.make_optimizer(config.optim, total_steps)
  replicated = sharding.replicated(mesh)
  data_sharding = sharding.batch_sharding(mesh)
  state = jax.device_put(TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), tx=tx), replicated)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model %s: %.2fM parameters, input %dpx, %d classes", config.model.name,
               num_params / 1e6, input_size, num_classes)

  # ---------------------------------------------------------------- update step
  mean, std = config_lib.NORMALIZATIONS[config.input.normalization]
  step_fn = jax.jit(
      functools.partial(train_step, mean=mean, std=std,
                        dropout_rng=jax.random.key(seed + 10_000)),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(evaluate.make_eval_step(model, mean, std),
                      in_shardings=(replicated, data_sharding), out_shardings=data_sharding)

  def model_variables(s: TrainState) -> dict:
    return {"params": s.params, **({"batch_stats": s.batch_stats} if s.batch_stats else {})}

  # ---------------------------------------------------------------- checkpoints
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  latest_mngr = ocp.CheckpointManager(trial_dir / "ckpt" / "latest", options=options)
  best_mngr = ocp.CheckpointManager(trial_dir / "ckpt" / "best", options=options)
  plateau = optim.ReduceLROnPlateau(factor=config.optim.plateau_factor,
                                    patience=config.train.patience // 2)
  progress = {"step": 0, "best_val_loss": float("inf"), "best_step": -1, "bad_evals": 0,
              "stopped_early": False, "plateau": plateau.state_dict()}
  if latest_mngr.latest_step() is not None:
    restored = latest_mngr.restore(latest_mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=grain.checkpoint.CheckpointRestore(train_iter),
        progress=ocp.args.JsonRestore()))
    state, progress = restored["state"], restored["progress"]
    plateau = optim.ReduceLROnPlateau(**progress["plateau"])
    logging.info("Resuming trial %d from step %d (checkpoint %s)", trial, progress["step"],
                 latest_mngr.directory)
  else:
    logging.info("Trial %d: starting from step 0 (seed %d)", trial, seed)

  # ---------------------------------------------------------------- loop
  step = progress["step"]
  logging.info("Training for %d steps (%d per epoch, batch %d), evaluating every %d",
               total_steps, steps_per_epoch, batch_size, eval_every)
  window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
  pending_metrics = []
  while step < total_steps and not progress["stopped_early"]:
    t = time.perf_counter()
    local = next(train_iter)
    wait_time += time.perf_counter() - t
    if step == 0:
      writer.write_images(0, {"train/augmented_inputs": _image_grid(local["image"][:32])[None]})
    state, step_metrics = step_fn(state, sharding.to_global(local, data_sharding))
    pending_metrics.append(step_metrics)
    step += 1
    window_steps += 1

    if step % config.train.log_every_steps == 0 or step % eval_every == 0:
      fetched = jax.device_get(pending_metrics)
      pending_metrics = []
      if not np.isfinite(fetched[-1]["loss"]):
        raise FloatingPointError(f"Training loss is {fetched[-1]['loss']} at step {step}; "
                                 "lower optim.lr or check the inputs.")
      elapsed = time.perf_counter() - window_start
      for i, m in enumerate(fetched):
        writer.write_scalars(step - len(fetched) + i + 1, {f"train/{k}": float(v)
                                                           for k, v in m.items()})
      writer.write_scalars(step, {
          "perf/images_per_s": window_steps * batch_size / elapsed,
          "perf/step_time_s": elapsed / window_steps,
          "perf/input_wait_fraction": wait_time / elapsed})
      logging.info("[trial %d] step %d/%d (epoch %.1f) loss %.4f lr %.2e | %.1f img/s, "
                   "input wait %.0f%% | ETA %s", trial, step, total_steps,
                   step / steps_per_epoch, fetched[-1]["loss"], fetched[-1]["lr"],
                   window_steps * batch_size / elapsed, 100 * wait_time / elapsed,
                   _format_eta((total_steps - step) * elapsed / window_steps))
      window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0

    if step % eval_every == 0 or step == total_steps:
      val = evaluate.classification_metrics(
          evaluate.predict(eval_step, model_variables(state), val_ds, data_sharding),
          splits.info.class_names)
      writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
      improved = val["loss"] < progress["best_val_loss"]
      if improved:
        progress.update(best_val_loss=val["loss"], best_step=step, bad_evals=0)
        # Re-saving after a resume replays a step that is already on disk.
        if step not in best_mngr.all_steps():
          best_mngr.save(step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(
                  {"step": step, "val": val})))
      else:
        progress["bad_evals"] += 1
      if config.optim.schedule == "plateau":
        lr = float(optim.find_hyperparams(state.opt_state)["learning_rate"])
        new_lr = plateau.step(val["loss"], lr)
        if new_lr != lr:
          logging.info("Validation loss plateaued: learning rate %.2e -> %.2e", lr, new_lr)
          state = set_learning_rate(state, new_lr)
      progress.update(step=step, plateau=plateau.state_dict(),
                      stopped_early=progress["bad_evals"] > config.train.patience)
      logging.info("[trial %d] step %d val loss %.4f mean AUC %.4f%s", trial, step,
                   val["loss"], val["mean_auc"], " (best)" if improved else "")
      latest_mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(train_iter),
          progress=ocp.args.JsonSave(progress)))
      if progress["stopped_early"]:
        logging.info("Early stopping at step %d: no lower val loss for %d evaluations",
                     step, progress["bad_evals"])
      window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
  latest_mngr.wait_until_finished()
  best_mngr.wait_until_finished()
  if hasattr(train_iter, "close"):
    train_iter.close()

  # ---------------------------------------------------------------- test
  best = best_mngr.restore(best_mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
  test = evaluate.classification_metrics(
      evaluate.predict(eval_step, model_variables(best["state"]), test_ds, data_sharding),
      splits.info.class_names)
  writer.write_scalars(step, {f"test/{k}": v for k, v in test.items()})
  writer.flush()
  logging.info("[trial %d] test (best step %d, %s): mean AUC %.4f | %s", trial,
               progress["best_step"], "ten-crop" if config.train.test_tta else "centre crop",
               test["mean_auc"], ", ".join(f"{k}={v:.4f}" for k, v in test.items()
                                           if k.startswith("auc/")))
  record = evaluate.trial_record(seed=seed, best_step=progress["best_step"],
                                 best_val_loss=progress["best_val_loss"], test_metrics=test)
  if jax.process_index() == 0:
    evaluate.write_json(result_path, record)
  latest_mngr.close()
  best_mngr.close()
  return record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs all trials of `config` in `workdir`; returns the results.json content."""
  config_lib.validate(config)
  # orbax's storage layer requires absolute paths; users type relative ones.
  workdir = epath.Path(os.path.abspath(workdir))
  results_path = workdir / "results.json"
  if results_path.exists():
    results = json.loads(results_path.read_text())
    logging.info("%s is finished; not retraining. Test %s: %s", workdir, results["metric"],
                 json.dumps(results["summary"]))
    return results
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  logging.info("Devices: %d (%s) over %d process(es)", jax.device_count(),
               jax.devices()[0].platform, jax.process_count())

  if jax.process_index() == 0:
    prepare.prepare_dataset(config.dataset)
  if jax.process_count() > 1:
    # A coordination-service barrier, not a device collective: preparing a data set takes
    # longer than the collectives' connection timeout (30 s with gloo).
    ocp.multihost.get_barrier_sync_fn()(key="medbench_dataset_prepared",
                                        timeout_ms=24 * 3600 * 1000)
  splits = sources.open_splits(config.dataset)
  mesh = sharding.make_mesh()
  trials = [run_trial(config, workdir, trial, splits, mesh)
            for trial in range(config.num_trials)]

  results = evaluate.assemble_results(
      config=json.loads(config.to_json_best_effort()), class_names=splits.info.class_names,
      trials=trials, subset=splits.subset, skipped_examples=splits.info.skipped_examples)
  if jax.process_index() == 0:
    evaluate.write_json(results_path, results)
  logging.info("Test %s over %d trial(s): %s", results["metric"], len(trials),
               json.dumps(results["summary"]))
  return results
