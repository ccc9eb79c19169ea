"""Pieces shared by the model files: classifier head, stochastic depth, PyTorch-key conversion."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The reference study re-initialises the classifier this way before fine-tuning.
head_kernel_init = nn.initializers.normal(stddev=0.01)
head_bias_init = nn.initializers.zeros

Dtype = Any


def classifier(num_classes: int, dtype: Dtype, name: str) -> nn.Dense:
  """The Dense head every model ends with, so head init lives in one place."""
  return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=head_kernel_init, bias_init=head_bias_init, name=name)


def pool_and_classify(x: jnp.ndarray, num_classes: int, dtype: Dtype,
                      name: str) -> jnp.ndarray:
  """Global average pool of NHWC features, then the head unless num_classes == 0 (timm's
  convention for feature extraction). Outputs float32 so losses never see bf16 logits."""
  x = jnp.mean(x, axis=(1, 2))
  if num_classes:
    x = classifier(num_classes, dtype, name)(x)
  return x.astype(jnp.float32)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (timm's DropPath).

  A Dropout whose mask is shared over all non-batch axes is exactly that; it draws from
  the 'dropout' rng, which `apply(..., train=True, rngs={'dropout': key})` must provide.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if self.rate == 0.0:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(
        x, deterministic=deterministic)


# --- PyTorch state dict -> Flax variables -------------------------------------------------

def torch_key_to_flax_path(key: str) -> str:
  """'layers.0.blocks.1.attn' -> 'layers_0/blocks_1/attn': Flax names list members NAME_i."""
  return re.sub(r"\.(\d+)", r"_\1", key).replace(".", "/")


def convert_torch_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    rename: Callable[[str], str] = lambda k: k,
    drop: Iterable[str] = (),
) -> dict[str, dict]:
  """Maps PyTorch parameter layouts onto Flax's, module paths unchanged otherwise.

  conv weight OIHW -> kernel HWIO; linear weight (out, in) -> kernel (in, out); norm weight
  -> scale; BatchNorm running_mean/var -> batch_stats mean/var; num_batches_tracked and the
  leaf names in `drop` (buffers the model recomputes) are discarded. Any other leaf (e.g.
  relative_position_bias_table) is kept under its own name, so keys the model does not know
  surface as 'unexpected' when merged instead of vanishing. `rename` edits torch keys first.
  """
  drop = {"num_batches_tracked", *drop}
  flat = {}
  for key, value in state_dict.items():
    module, _, leaf = rename(key).rpartition(".")
    if leaf in drop:
      continue
    value = np.asarray(value)
    collection = "params"
    if leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    elif leaf == "weight" and value.ndim == 1:
      leaf = "scale"
    elif leaf in ("running_mean", "running_var"):
      collection, leaf = "batch_stats", leaf[len("running_"):]
    path = (collection, *torch_key_to_flax_path(module).split("/"), leaf)
    flat[path] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat)
