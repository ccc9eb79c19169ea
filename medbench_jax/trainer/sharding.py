"""Device mesh and the shardings of batches and training state.

The mesh has two axes: `data` and `fsdp` (config.mesh.fsdp devices per group; 1 by
default). Batches are split over both. Parameters and optimizer state are replicated,
except where the fully-sharded data-parallel rules (config.mesh.fsdp_rules: regexes over
the "/"-joined parameter path, first match wins) shard a tensor over `fsdp`; tensors
smaller than config.mesh.fsdp_min_size elements stay replicated, so a small model is
replicated whatever the rules say and ViT-L / Swin-L / ConvNeXt-L kernels are sharded.
XLA inserts the all-gathers and reduce-scatters. Arrays are global `jax.Array`s
assembled from each process's local part of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from medbench_jax import config_lib

DATA, FSDP, TRIAL = "data", "fsdp", "trial"
# Tactics a rule may name: shard the largest dimension divisible by the fsdp size, or not.
TACTICS = ("largest", "replicate")


def validate(config: ml_collections.ConfigDict) -> None:
  """config.mesh and the batch sizes, against the devices of this run."""
  fsdp = config.mesh.fsdp
  config_lib.check(isinstance(fsdp, int) and fsdp >= 1 and jax.device_count() % fsdp == 0,
                   "mesh.fsdp", fsdp, f"a divisor of the {jax.device_count()} devices")
  # Batches are split over every device (data x fsdp).
  check_batch_size(config.input.batch_size, "input.batch_size")
  check_batch_size(config.input.eval_batch_size, "input.eval_batch_size")
  for pattern, tactic in config.mesh.fsdp_rules:
    config_lib.check(tactic in TACTICS, "mesh.fsdp_rules", (pattern, tactic),
                     f"(regex, tactic) pairs with tactic in {TACTICS}")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.mesh.fsdp_rules: bad regex {pattern!r}: {e}") from None


def make_mesh(fsdp: int = 1, trials: int = 1) -> Mesh:
  """The (data, fsdp) mesh; with trials > 1 (packed trials, packed.py) a `trial` axis of
  that size sits between them, so each process's devices still hold every trial and a
  slice of the batch, as the input pipeline reads it."""
  # Auto axes: XLA propagates the shardings through the model, so model code stays free
  # of sharding annotations.
  if trials == 1:
    return jax.make_mesh((jax.device_count() // fsdp, fsdp), (DATA, FSDP),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return jax.make_mesh((jax.device_count() // (fsdp * trials), trials, fsdp),
                       (DATA, TRIAL, FSDP), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def trial_axis_size(trials: int, fsdp: int = 1) -> int:
  """The size of the mesh's trial axis for `trials` packed trials: the largest divisor
  of `trials` that divides the devices left per fsdp group."""
  groups = jax.device_count() // fsdp
  return max(d for d in range(1, trials + 1) if trials % d == 0 and groups % d == 0)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A batch split over the data and fsdp axes (the same on every trial's devices)."""
  return NamedSharding(mesh, P((DATA, FSDP)))


def stacked(sharding: NamedSharding) -> NamedSharding:
  """The sharding of a leading trial axis of packed trials in front of `sharding`."""
  trial = TRIAL if TRIAL in sharding.mesh.axis_names else None
  return NamedSharding(sharding.mesh, P(trial, *sharding.spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host arrays that every process holds the same (one seed, one weights file) as
  global arrays replicated over `mesh`, each process filling its own devices from its
  copy. jax.device_put of host arrays onto several processes' devices would compare each
  leaf across the processes first (a multihost assert_equal per leaf)."""
  sharding = replicated(mesh)

  def put(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

  return jax.tree.map(put, tree)


def _path(key_path) -> str:
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], fsdp: int,
             rules: Sequence[tuple[str, str]], min_size: int) -> P:
  """The PartitionSpec of one state tensor under the fsdp rules."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  tactic = next((t for pattern, t in rules if re.search(pattern, path)), "replicate")
  divisible = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if tactic == "replicate" or not divisible:
    return P()
  axis = max(divisible, key=lambda d: (shape[d], d))  # ties: the later (output) axis
  return P(*([None] * axis), FSDP)


def state_shardings(state: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> Any:
  """NamedShardings for every leaf of the train state (params, optimizer state, ...)."""
  fsdp = mesh.shape[FSDP]
  rules = [tuple(r) for r in config.mesh.fsdp_rules]

  def sharding_of(key_path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(_path(key_path), shape, fsdp, rules,
                                        config.mesh.fsdp_min_size))

  return jax.tree_util.tree_map_with_path(sharding_of, state)


def check_batch_size(global_batch_size: int, name: str) -> None:
  """A global batch splits evenly over all devices (of all processes)."""
  config_lib.check(global_batch_size % jax.device_count() == 0, name, global_batch_size,
                   f"a multiple of the number of devices ({jax.device_count()})")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """Assembles this process's part of a batch into global arrays sharded over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
