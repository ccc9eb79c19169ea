"""Device mesh and the shardings of batches and training state.

Batches are split over the `data` axis; parameters and optimizer state are
replicated (fine-tuned models here fit one accelerator). Arrays are global
`jax.Array`s assembled from each process's local part of the batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  # Auto axes: XLA propagates the batch sharding through the model, so model code
  # stays free of sharding annotations.
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, name: str) -> None:
  if global_batch_size % jax.device_count():
    raise ValueError(
        f"config.{name}={global_batch_size} must be divisible by the number of devices "
        f"({jax.device_count()}).")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """Assembles this process's part of a batch into global arrays sharded on `data`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
