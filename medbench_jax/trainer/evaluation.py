"""Running an evaluation step over a whole split, on every device and host."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
import numpy as np

from medbench_jax.data import pipeline
from medbench_jax.data import transforms
from medbench_jax.trainer import sharding


def predict(eval_step: Callable[[dict, dict], dict], variables: dict,
            dataset: grain.IterDataset, data_sharding: NamedSharding) -> dict[str, np.ndarray]:
  """The eval step's per-example outputs for the valid examples of a split, in order.

  Batches are padded to whole batches (`valid` marks real examples); every process
  returns the same complete arrays, gathered across hosts.
  """
  outputs = []
  for local_batch in pipeline.iterate(dataset):
    batch = sharding.to_global(local_batch, data_sharding)
    out = {**eval_step(variables, batch), "valid": batch["valid"]}
    outputs.append(multihost_utils.process_allgather(out, tiled=True))
  gathered = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  valid = gathered.pop("valid").astype(bool)
  return {k: v[valid] for k, v in gathered.items()}


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
