"""trainer/state.py: the update step in float32 and in bfloat16 (mixed precision)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from medbench_jax import config_lib
from medbench_jax import models
from medbench_jax.data import pipeline
from medbench_jax.tasks import classification
from medbench_jax.trainer import optim
from medbench_jax.trainer import state as state_lib

# bf16 keeps 8 bits of mantissa (relative precision 2^-8 = 0.4%): over 20 steps the losses
# of the two precisions stay within this relative distance of each other.
BF16_LOSS_RTOL = 0.02


def _run(dtype: str, steps: int = 20):
  config = config_lib.default_config()
  config.model.name = "swin_demo_patch4_window4_96"
  config.model.dtype = dtype
  config.optim.optimizer = "adamw"
  config.optim.lr = 3e-4
  info = type("Info", (), dict(task="multi-label", class_names=tuple("abcd"),
                               eval_class_names=tuple("abcd")))
  task = classification.Classification(config, info)
  model = state_lib.create_model(config, 4)
  variables = state_lib.init_variables(config, model, 4, 96, seed=0)
  state = state_lib.create_state(model, variables, optim.make_optimizer(config.optim, steps))
  step = jax.jit(functools.partial(
      state_lib.train_step, loss_fn=task.loss, dropout_rng=jax.random.key(1),
      normalize=functools.partial(pipeline.normalize, mean=(0.5,) * 3, std=(0.25,) * 3)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (steps, 8, 96, 96, 1)).astype(np.uint8)
  labels = (rng.random((steps, 8, 4)) < 0.3).astype(np.float32)
  images[..., :40, :40, :] //= 2  # a learnable signal: darker corner <-> label 0
  labels[..., 0] = (images[..., :40, :40, 0].mean(axis=(-1, -2)) < 64).astype(np.float32)
  losses = []
  for i in range(steps):
    state, metrics = step(state, {"image": images[i], "labels": labels[i]})
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


def test_bfloat16_tracks_float32_and_keeps_float32_state():
  state32, losses32 = _run("float32")
  state16, losses16 = _run("bfloat16")
  np.testing.assert_allclose(losses16, losses32, rtol=BF16_LOSS_RTOL)
  assert not np.allclose(losses16, losses32, rtol=1e-6)  # bf16 really computed in bf16
  assert np.ptp(losses32) > 1e-3  # the parameters moved: 20 different losses compared
  for tree in (state16.params, state16.opt_state):
    dtypes = {x.dtype for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes


def test_bfloat16_outputs_and_batch_norm_statistics_are_float32():
  model = models.create("resnet18", 3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert {v.dtype for v in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
