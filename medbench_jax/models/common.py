"""Pieces shared by the model files: classifier head and its initialisation, stochastic depth,
PyTorch-key conversion."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import re
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import ops

Dtype = Any


@dataclasses.dataclass(frozen=True)
class HeadInit:
  """How a fresh classifier is drawn: the kernel from a zero-mean normal with `std`, cut at
  +-`bound` (an absolute value, as timm's trunc_normal_(a, b) takes it; None: uncut), the
  bias zero. Each family registers its own (registry config `head_init`), and `str()` is
  what weights.load logs when it re-initialises a head."""
  std: float
  bound: float | None = None

  def kernel_init(self) -> Callable[..., jnp.ndarray]:
    if self.bound is None:
      return nn.initializers.normal(stddev=self.std)
    # Flax's bounds are in units of the (untruncated) std, timm's in absolute value.
    return nn.initializers.truncated_normal(self.std, lower=-self.bound / self.std,
                                            upper=self.bound / self.std)

  def __str__(self) -> str:
    if self.bound is None:
      return f"normal std {self.std:g}, zero bias"
    return f"truncated normal std {self.std:g} cut at +-{self.bound:g}, zero bias"


# ResNet and DenseNet heads as the reference study re-initialises them before fine-tuning
# (its models.py: weight.normal_(0, 0.01), bias.zero_()).
NORMAL_HEAD = HeadInit(std=0.01)
# timm's Linear init, trunc_normal_(std=.02) with its default bounds a=-2, b=2 (absolute, so
# 100 std: a normal in all but name), zero bias. The study's ConvNeXt heads start from it
# (timm.create_model), its Swin heads too (Microsoft's Swin, _init_weights), and ViT heads
# in timm, with which the lab's transformer benchmark (jlianglab/BenchmarkTransformers)
# builds its ViTs; the study's own code builds none.
TRUNC_NORMAL_HEAD = HeadInit(std=0.02, bound=2.0)


def classifier(num_classes: int, dtype: Dtype, name: str, head_init: HeadInit) -> nn.Dense:
  """The Dense head every model ends with, initialised as its family's `head_init`."""
  return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=head_init.kernel_init(), bias_init=nn.initializers.zeros,
                  name=name)


def pool_and_classify(x: jnp.ndarray, num_classes: int, dtype: Dtype, name: str,
                      head_init: HeadInit) -> jnp.ndarray:
  """Global average pool of NHWC features, then the head unless num_classes == 0 (timm's
  convention for feature extraction). Outputs float32 so losses never see bf16 logits."""
  x = jnp.mean(x, axis=(1, 2))
  if num_classes:
    x = classifier(num_classes, dtype, name, head_init)(x)
  return x.astype(jnp.float32)


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm2d, so fine-tuning a converted CNN behaves as in the reference.

  Differs from `nn.BatchNorm` where it matters for parity: the running variance is updated
  with the unbiased batch variance (torch does; Flax uses the biased one), statistics are
  computed in at least float32 with two passes, and `momentum` is torch's (weight of the
  new batch).
  Variable names (scale, bias; batch_stats mean, var) are Flax's, so converters stay generic.
  Under jit with a batch sharded over devices the statistics span the global batch.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      # At least float32 (bf16 compute), float64 where the model computes in it.
      xs = x.astype(jnp.promote_types(self.dtype, jnp.float32))
      mean = xs.mean(axes)
      var = jnp.square(xs - mean).mean(axes)
      if not self.is_initializing():
        n = x.size // features
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * var * (n / max(n - 1, 1)))
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x * multiplier.astype(self.dtype) + (bias - mean * multiplier).astype(self.dtype)
    return y.astype(self.dtype)


def torch_conv(features: int, kernel: int, stride: int, kernel_init: Callable, dtype: Dtype,
               name: str) -> nn.Module:
  """Bias-free square conv padded kernel // 2 on every side, as PyTorch CNNs pad: 'SAME'
  would pad (0, 1) at stride 2 where PyTorch pads (1, 1). 1x1 convs are matrix products
  (ops.PointwiseConv, same parameters)."""
  if kernel == 1:
    return ops.PointwiseConv(features, stride, kernel_init, dtype, name=name)
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                 name=name)


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


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """torch.nn.LayerNorm: two-pass variance as torch computes it. Flax's default one-pass
  E[x^2] - E[x]^2 loses the digits of tokens whose mean is large next to their spread, as in
  trained residual streams (fp32, mean 300, std 1: outputs off by 5e-2, two-pass 6e-5)."""
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens (timm's PatchEmbed): a conv with kernel = stride =
  patch size, NHWC out, then a LayerNorm named 'norm' where `norm_epsilon` is given (Swin)."""
  patch_size: int
  embed_dim: int
  norm_epsilon: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="proj")(x)
    if self.norm_epsilon is not None:
      x = layer_norm(self.norm_epsilon, self.dtype, "norm")(x)
    return x


class Mlp(nn.Module):
  """timm's transformer Mlp: fc1, exact GELU (torch's default), fc2 back to the input width,
  with timm's Linear init (trunc_normal std 0.02, zero bias); names match keys mlp.fc1/fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.truncated_normal(stddev=0.02), dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    tokens = x.reshape(-1, x.shape[-1])
    y = nn.gelu(dense(self.hidden, "fc1")(tokens), approximate=False)
    return dense(x.shape[-1], "fc2")(y).reshape(x.shape)


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
    # Top-level tensors (a ViT's cls_token, pos_embed) have no module part.
    path = (collection, *filter(None, torch_key_to_flax_path(module).split("/")), leaf)
    flat[path] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat)
