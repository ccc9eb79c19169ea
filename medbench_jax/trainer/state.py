"""Training state: the model, its initial variables, the optimizer and the update step.

`TrainState` carries BatchNorm statistics beside the parameters, as the Flax ImageNet
example does; the learning rate lives in the optimizer state (optim.py).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medbench_jax import config_lib
from medbench_jax import models
from medbench_jax import weights
from medbench_jax.data import pipeline
from medbench_jax.trainer import optim


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def normalizer(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """uint8 images -> the model's input (config.input.normalization), on the device: the
  train step and every evaluation apply it."""
  return functools.partial(pipeline.normalize, **config_lib.normalization(config))


def create_model(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
  return models.create(config.model.name, num_outputs,
                       dtype=jnp.dtype(config.model.dtype), **config.model.kw.to_dict())


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, num_outputs: int,
                   input_size: int, seed: int) -> dict:
  """Random variables, or any weights.load source with a fresh head (seeded by `seed`)."""
  if config.model.init == "random":
    rng = jax.random.key(seed)
    dummy = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(
        {"params": rng, "dropout": rng}, dummy)
  # A checkpoint file (format detected, or FORMAT:PATH), a medbench_jax.convert directory,
  # run:WORKDIR (domain-adaptive chaining) or timm:NAME.TAG.
  logging.info("Initialising %s from %s", config.model.name, config.model.init)
  return weights.load(config.model.name, config.model.init, num_outputs, seed=seed,
                      **config.model.kw.to_dict())


def create_state(model: nn.Module, variables: dict, tx: optax.GradientTransformation
                 ) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def create_sharded_state(model: nn.Module, variables: dict, tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh, shardings_of: Callable[[Any], Any]
                         ) -> tuple[TrainState, Any]:
  """The initial train state, created on the mesh already sharded, and its shardings.

  `shardings_of(abstract_state)` gives the shardings of each leaf from its shape.
  `variables` are the same in every process (one seed, one weights file): each passes its
  copy to a jitted create_state whose outputs are laid out by the shardings, so the
  optimizer state is born sharded and no process compares its arrays with the others'
  (jax.device_put of host arrays onto several hosts' devices does, leaf by leaf).
  """
  variables = jax.tree.map(np.asarray, variables)
  create = functools.partial(create_state, model, tx=tx)
  shardings = shardings_of(jax.eval_shape(create, variables))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.jit(create, in_shardings=replicated, out_shardings=shardings)(variables)
  return state, shardings


def model_variables(state: TrainState) -> dict:
  """What `model.apply` takes in evaluation mode."""
  return {"params": state.params, **({"batch_stats": state.batch_stats}
                                     if state.batch_stats else {})}


def batch_statistics(images: jnp.ndarray, batch: dict) -> dict[str, jnp.ndarray]:
  """min, max, mean and the count of non-finite values of the normalized images and of
  every other array of a batch: what a non-finite step reports about its input."""
  arrays = {"image": images, **{k: v for k, v in batch.items() if k != "image"}}
  stats = {}
  for key, value in arrays.items():
    value = value.astype(jnp.float32)
    stats.update({f"{key}_min": value.min(), f"{key}_max": value.max(),
                  f"{key}_mean": value.mean(),
                  f"{key}_nonfinite": jnp.sum(~jnp.isfinite(value))})
  return stats


def train_step(state: TrainState, batch: dict, *, loss_fn: Callable, normalize: Callable,
               dropout_rng: jax.Array, augment: Callable | None = None,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
  """One update on the global batch; BatchNorm statistics span all devices.

  `loss_fn(outputs, batch)` is the task's loss of the train-mode model outputs;
  `augment(batch, step)`, where given, augments the stored images first
  (input.augment_on_device).
  skip_nonfinite: a step whose loss or gradients are not finite leaves parameters,
  optimizer state and BatchNorm statistics as they were (the step counter advances);
  metrics["skipped"] is 1 for it. Metrics["batch"] holds `batch_statistics`.
  """
  if augment is not None:
    batch = augment(batch, state.step)
  rng = jax.random.fold_in(dropout_rng, state.step)
  images = normalize(batch["image"])

  def objective(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    outputs, updates = state.apply_fn(variables, images, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
    return loss_fn(outputs, batch), updates

  (loss, updates), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  new_state = state.apply_gradients(grads=grads)
  if state.batch_stats:
    new_state = new_state.replace(batch_stats=updates["batch_stats"])
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state).replace(step=new_state.step)
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "lr": optim.find_hyperparams(new_state.opt_state)["learning_rate"],
             "skipped": (~finite & skip_nonfinite).astype(jnp.int32),
             "batch": batch_statistics(images, batch)}
  return new_state, metrics


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  """Changes the injected learning rate in place (reduce-on-plateau), no recompilation."""
  hyperparams = optim.find_hyperparams(state.opt_state)
  hyperparams["learning_rate"] = jnp.asarray(
      lr, hyperparams["learning_rate"].dtype, device=hyperparams["learning_rate"].sharding)
  return state


def learning_rate(state: TrainState) -> float:
  return float(optim.find_hyperparams(state.opt_state)["learning_rate"])
