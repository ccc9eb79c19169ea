"""Evaluating a model over whole splits, on every device and host.

`Evaluator` is the one way a split is predicted: the trainer's validation and test, and
`medbench_jax.evaluate`'s re-tests of finished runs, all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from medbench_jax.data import pipeline
from medbench_jax.data import transforms
from medbench_jax.tasks import base as tasks_base
from medbench_jax.trainer import sharding


def predict(eval_step: Callable[[dict, dict], dict], variables: dict,
            dataset: grain.IterDataset, data_sharding: NamedSharding) -> dict[str, np.ndarray]:
  """The eval step's per-example outputs for the valid examples of a split, in order.

  Batches are padded to whole batches (`valid` marks real examples). The outputs stay on
  the devices until the split is done, then cross to the hosts at once: every process
  returns the same complete arrays.
  """
  outputs = []
  for local_batch in pipeline.iterate(dataset):
    batch = sharding.to_global(local_batch, data_sharding)
    outputs.append({**eval_step(variables, batch), "valid": batch["valid"]})
  gathered = multihost_utils.process_allgather(_stack(data_sharding)(outputs), tiled=True)
  gathered = {k: v.reshape(-1, *v.shape[2:]) for k, v in gathered.items()}
  valid = gathered.pop("valid").astype(bool)
  return {k: v[valid] for k, v in gathered.items()}


@functools.cache
def _stack(data_sharding: NamedSharding) -> Callable[[list[dict]], dict]:
  """[per-batch outputs] -> {key: (batches, batch, ...)}, each device keeping its part of
  every batch (no communication)."""
  stacked = NamedSharding(data_sharding.mesh, P(None, *data_sharding.spec))
  return jax.jit(lambda outputs: {k: jnp.stack([o[k] for o in outputs]) for k in outputs[0]},
                 out_shardings=stacked)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A task's jitted evaluation step and the input pipeline that feeds it whole splits."""
  task: tasks_base.Task
  eval_step: tasks_base.EvalStep
  # (source, pp_spec=, seed=) -> this process's padded batches of the split.
  dataset: Callable[..., grain.IterDataset]
  data_sharding: NamedSharding

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, task: tasks_base.Task,
             apply_fn: Callable, normalize: tasks_base.Normalize,
             data_sharding: NamedSharding, packed: bool = False, test: bool = False
             ) -> Evaluator:
    """`apply_fn(variables, images, train=)` is the model; the variables keep their own
    shardings and batches come sharded over the mesh (`data_sharding`).

    test: the task's test step (Task.make_test_step: what post_hoc needs besides the
    metrics' inputs, e.g. segmentation masks) instead of its validation step.

    packed: the variables are packed trials' (a leading trial axis, packed.py); each batch
    is read once and scored by all of them, and every output gets a trial axis second:
    (examples, trials, ...); `unpack` takes one trial's outputs out.
    """
    eval_step = (task.make_test_step if test else task.make_eval_step)(apply_fn, normalize)
    if packed:
      eval_step = _trials_second(jax.vmap(eval_step, in_axes=(0, None)))
    eval_step = jax.jit(eval_step, out_shardings=data_sharding)
    dataset = functools.partial(
        pipeline.eval_dataset, keys=task.keys, num_threads=config.input.num_workers,
        local_batch_size=config.input.eval_batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
    return cls(task, eval_step, dataset, data_sharding)

  def predict(self, variables: dict, source: Sequence[dict], test: bool, seed: int = 0
              ) -> dict[str, np.ndarray]:
    """The per-example outputs for `source`, preprocessed as validation (test=False) or
    test examples (test-time augmentation); `seed` draws labels that are drawn per read."""
    dataset = self.dataset(source, pp_spec=self.task.pp_eval(test), seed=seed)
    return predict(self.eval_step, variables, dataset, self.data_sharding)


def _trials_second(packed_step: Callable[[dict, dict], dict]) -> Callable[[dict, dict], dict]:
  """(trials, batch, ...) outputs -> (batch, trials, ...), so they gather as a batch."""
  return lambda variables, batch: jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1),
                                               packed_step(variables, batch))


def unpack(predictions: dict[str, np.ndarray], trial: int) -> dict[str, np.ndarray]:
  """Trial `trial`'s outputs of a packed Evaluator.predict."""
  return {k: v[:, trial] for k, v in predictions.items()}


def first_examples(source: Sequence[dict], pp_spec: str, keys: Sequence[str], count: int
                   ) -> dict[str, np.ndarray] | None:
  """The first `count` examples of a split, preprocessed and stacked (None for count 0):
  the same handful every evaluation, for TensorBoard images."""
  count = min(count, len(source))
  if not count:
    return None
  op = transforms.parse(pp_spec)
  # Evaluation ops are deterministic; the generator only satisfies the op signature.
  examples = [op(source[i], np.random.default_rng(0)) for i in range(count)]
  return {k: np.stack([e[k] for e in examples]) for k in keys}
