"""Pretrained checkpoints -> Flax variables of a registered model, loaded safely.

Reading never executes code from the file (.pth through a restricted unpickler, .safetensors,
.npz without pickles). Merging is by flattened parameter path into freshly initialised
variables, as big_vision does: every tensor must fit except the classifier, which is
re-initialised unless `keep_head`; anything else that does not fit is an error naming the
keys and shapes on both sides.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from flax import traverse_util

from medbench_jax import models
from medbench_jax.weights.torch_pickle import UnsafeCheckpointError  # noqa: F401  (re-export)
from medbench_jax.weights import torch_pickle

_TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
# Training scripts wrap the state dict in these keys (timm, DeiT/MAE/Swin, Lightning...).
_WRAPPER_KEYS = ("state_dict", "model")
_DDP_PREFIX = "module."
# Error messages list at most this many keys per category.
_MAX_LISTED = 30


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The flat {torch key: array} state dict stored in `path`, chosen by extension.

  Unwraps {'state_dict': ...} / {'model': ...} wrappers and strips DDP's 'module.' prefix.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext in _TORCH_EXTENSIONS:
    obj = torch_pickle.load(path)
  elif ext == ".safetensors":
    obj = safetensors.numpy.load_file(path)
  elif ext == ".npz":
    with np.load(path, allow_pickle=False) as npz:
      obj = dict(npz)
  else:
    raise ValueError(f"{path}: unknown checkpoint extension {ext!r}; expected one of "
                     f"{', '.join((*_TORCH_EXTENSIONS, '.safetensors', '.npz'))}")
  while isinstance(obj, Mapping):
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if wrapper is None:
      break
    obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  state_dict = {}
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                       "pass a checkpoint holding only the model's state dict.")
    key = key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key
    # bf16/fp8 arrive as ml_dtypes types (numpy kind 'V') numpy cannot compute with.
    state_dict[key] = value.astype(np.float32) if value.dtype.kind == "V" else value
  return state_dict


def _ordered(keys: list[str]) -> list[str]:
  """Parameters before batch statistics: they tell the architecture apart more readably."""
  return sorted(keys, key=lambda k: (not k.startswith("params/"), k))


def _describe(keys: list[str], shape_of: Mapping[str, Any]) -> str:
  lines = [f"    {k} {tuple(shape_of[k].shape)}" for k in _ordered(keys)[:_MAX_LISTED]]
  if len(keys) > _MAX_LISTED:
    lines.append(f"    ... and {len(keys) - _MAX_LISTED} more")
  return "\n".join(lines)


def load(name: str, path: str, num_classes: int, keep_head: bool = False, seed: int = 0,
         **model_kw: Any) -> dict[str, Any]:
  """Variables ({'params', ['batch_stats']}) of `models.create(name, num_classes, **model_kw)`
  initialised from the checkpoint at `path`.

  The classifier (the pretrained config's `classifier` path) is dropped from the checkpoint
  and keeps its fresh initialisation (normal std 0.01, zero bias; `seed` drives it) unless
  `keep_head`, in which case it is loaded and must match `num_classes`. Raises ValueError
  listing missing keys, unexpected keys and shape mismatches (with shapes) otherwise.
  """
  model = models.create(name, num_classes, **model_kw)
  cfg = models.pretrained_cfg(name)
  state_dict = read_state_dict(path)
  loaded = _flatten(models.converter(name)(state_dict, model_kw))

  # Models with a fixed input size (Swin) declare it; the others accept the default one.
  img_size = getattr(model, "img_size", cfg["input_size"][:2])
  img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  dummy = jnp.zeros((1, *img_size, cfg["input_size"][2]), jnp.float32)
  init = lambda rng: _flatten(model.init(rng, dummy))
  fresh = jax.eval_shape(init, jax.random.PRNGKey(seed))

  head = f"params/{cfg['classifier']}/"
  dropped = {} if keep_head else {
      k: loaded.pop(k).shape for k in sorted(loaded) if k.startswith(head)}
  missing = [k for k in fresh if k not in loaded and (keep_head or not k.startswith(head))]
  unexpected = [k for k in loaded if k not in fresh]
  mismatched = [k for k in loaded if k in fresh and loaded[k].shape != fresh[k].shape]
  if missing or unexpected or mismatched:
    parts = [f"Checkpoint {path} does not fit model {name} (num_classes={num_classes}, "
             f"keep_head={keep_head}, {model_kw or 'default architecture'}):"]
    if missing:
      parts.append(f"  missing in the checkpoint ({len(missing)}), model shapes:\n"
                   + _describe(missing, fresh))
    if unexpected:
      parts.append(f"  unexpected in the checkpoint ({len(unexpected)}), checkpoint shapes:\n"
                   + _describe(unexpected, loaded))
    if mismatched:
      parts.append(f"  shape mismatches ({len(mismatched)}), checkpoint vs model:\n" + "\n".join(
          f"    {k} {loaded[k].shape} vs {tuple(fresh[k].shape)}"
          for k in _ordered(mismatched)[:_MAX_LISTED]))
    parts.append("Check that the checkpoint is for this architecture; Flax paths mirror the "
                 "PyTorch keys ('layer1.0.conv1.weight' -> params/layer1_0/conv1/kernel).")
    raise ValueError("\n".join(parts))

  reinit = sorted(k for k in fresh if k not in loaded)
  # Only the re-initialised leaves leave the jitted init: XLA prunes the random draws of
  # all others, which on CPU would cost more than everything else here.
  variables = jax.jit(lambda rng: {k: v for k, v in init(rng).items() if k in reinit})(
      jax.random.PRNGKey(seed))
  variables.update((k, jnp.asarray(v, fresh[k].dtype)) for k, v in loaded.items())
  logging.info("Loaded %d tensors (%d values) of %s from %s.", len(loaded),
               sum(v.size for v in loaded.values()), name, path)
  if dropped:
    logging.info("Dropped from the checkpoint (classifier): %s",
                 ", ".join(f"{k} {shape}" for k, shape in dropped.items()))
  if reinit:
    logging.info("Re-initialised (normal std 0.01, zero bias, seed %d) for %d classes: %s",
                 seed, num_classes, ", ".join(f"{k} {fresh[k].shape}" for k in reinit))
  return traverse_util.unflatten_dict(variables, sep="/")


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(variables, sep="/")
