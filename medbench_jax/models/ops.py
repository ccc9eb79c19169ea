"""Layers whose plain XLA form is slow on CPU, rewritten in operations XLA:CPU runs well.

Each one computes what the layer it replaces computes (same parameters, same names, fp32
rounding apart) and keeps the autodiff structure explicit where XLA's own is the slow part.

Depthwise convolution (ConvNeXt's 7x7, `feature_group_count` = channels): XLA:CPU lowers it
through its grouped-convolution path, and its kernel gradient through a dense
channels x channels convolution of which only the diagonal is kept (C times the work).
At batch 16 on 56x56x96 that is ~0.6 s forward, ~0.6 s input gradient and ~2-3 s kernel
gradient per layer on two cores, where the arithmetic is 0.24 GMAC each. Written as 49
shifted multiply-adds the forward pass and the input gradient are one fused elementwise loop
each; the kernel gradient is one fused loop over 7x7 tiles plus a small matrix product.

These forms are for XLA:CPU only. GPUs and TPUs get XLA's native operations (a grouped
convolution, reductions, a 1x1 convolution, gathers), which their compilers map to their own
kernels and which the CPU forms would defeat (a multi-pass `Precision.HIGHEST` dot on a
TPU, 49 elementwise passes where cuDNN has one depthwise kernel). The choice is made per
platform when a program is lowered (`per_platform`), not when it is traced: one traced step
lowers to the CPU form for the CPU and to the native one for `cuda`, `rocm` and `tpu`, and
`python -m medbench_jax.bench lower` shows which operations each platform gets.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, TypeVar

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any
T = TypeVar("T")


def per_platform(cpu: Callable[..., T], native: Callable[..., T], *args: Any) -> T:
  """`cpu(*args)` in a program lowered for the CPU, `native(*args)` in one lowered for any
  other platform (GPU, TPU). Both are traced; lowering keeps only the platform's own
  (`lax.platform_dependent`), also in gradients."""
  return lax.platform_dependent(*args, cpu=cpu, default=native)


def _accumulation_dtype(dtype: Dtype) -> Dtype:
  """At least float32 (bf16 inputs accumulate in float32), float64 where inputs are."""
  return jnp.promote_types(dtype, jnp.float32)


def _tokens(x: jnp.ndarray) -> jnp.ndarray:
  """(..., C) -> (N, C). Computing in this 2-D shape matters to XLA:CPU: a dot consuming
  the result directly keeps it materialized once, where a 4-D result reached through a
  reshape gets recomputed inside each of its consumers."""
  return x.reshape(-1, x.shape[-1])


def _shifted_sum(x: jnp.ndarray, taps: jnp.ndarray, bias: jnp.ndarray | None = None
                 ) -> jnp.ndarray:
  """bias + sum over (i, j) of pad(x)[:, i:i+H, j:j+W] * taps[i, j]: a depthwise 'same'
  correlation of NHWC `x` with (K, K, C) `taps`, K odd, padded K // 2 on every side,
  accumulated in at least float32, as (N, C) tokens."""
  size = taps.shape[0]
  pad = size // 2
  _, h, w, _ = x.shape
  acc = _accumulation_dtype(x.dtype)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(acc)
  taps = taps.astype(acc)
  terms = [_tokens(padded[:, i:i + h, j:j + w]) * taps[i, j]
           for i in range(size) for j in range(size)]
  if bias is not None:
    terms.insert(0, bias.astype(acc))
  return functools.reduce(jnp.add, terms)


def _depthwise_kernel_grad(x: jnp.ndarray, dy: jnp.ndarray, size: int) -> jnp.ndarray:
  """dk[i, j, c] = sum over (b, h, w) of pad(x)[b, h+i, w+j, c] * dy[b, h, w, c].

  A reduction over the batch and spatial axes is slow in XLA:CPU's reduce loops (one pass
  over both tensors per tap), so the work is split: split the image into size x size tiles;
  q[b, h, w, c] = sum over the tile positions (a, d) of pad(x)[b, h+a, w+d, c] times dy at
  the tile's position (a, d), which for h % size = i, w % size = j is that tile's share of
  dk[i, j, c], one fused loop shaped like the forward pass. A (positions x 49) one-hot
  product then sums each (i, j) class over the tiles on the matrix unit.
  """
  pad = size // 2
  b, h, w, c = x.shape
  tiles_h, tiles_w = -(-h // size), -(-w // size)
  hp, wp = tiles_h * size, tiles_w * size
  acc = _accumulation_dtype(x.dtype)
  # Zero gradient past the image edge contributes nothing; it makes the tiles whole.
  dy = jnp.pad(dy, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))).astype(acc)
  padded = jnp.pad(x, ((0, 0), (pad, pad + hp - h), (pad, pad + wp - w), (0, 0))).astype(acc)
  q = 0
  for a in range(size):
    for d in range(size):
      at_position = dy[:, a::size, d::size][:, :, None, :, None, :]
      at_position = jnp.broadcast_to(at_position, (b, tiles_h, size, tiles_w, size, c))
      q = q + padded[:, a:a + hp, d:d + wp] * at_position.reshape(b, hp, wp, c)
  shape = (b, hp, wp, size * size)
  tap = (lax.broadcasted_iota(jnp.int32, shape, 1) % size * size
         + lax.broadcasted_iota(jnp.int32, shape, 2) % size)
  one_hot = (tap == lax.broadcasted_iota(jnp.int32, shape, 3)).astype(acc).reshape(-1, size * size)
  dk = jnp.dot(one_hot.T, q.reshape(-1, c), precision=lax.Precision.HIGHEST)
  return dk.reshape(size, size, c)


def _column_sum(tokens: jnp.ndarray) -> jnp.ndarray:
  """(N, C) -> (C,) sum over N as a matrix product: XLA:CPU's reduce loops are several
  times slower on a leading axis."""
  ones = jnp.ones((1, tokens.shape[0]), tokens.dtype)
  return jnp.dot(ones, tokens, precision=lax.Precision.HIGHEST)[0]


@jax.custom_vjp
def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """Stride-1 depthwise convolution of NHWC `x` with a (K, K, 1, C) kernel (K odd) plus a
  (C,) bias, padded K // 2 on every side: `lax.conv_general_dilated(...,
  feature_group_count=C) + bias`, accumulated in at least float32, with a gradient
  XLA:CPU also runs fast. Returns (N, C) tokens, N = B * H * W, in x's dtype."""
  return _shifted_sum(x, kernel[:, :, 0], bias).astype(x.dtype)


def _depthwise_conv_fwd(x, kernel, bias):
  return depthwise_conv(x, kernel, bias), (x, kernel, bias)


def _depthwise_conv_bwd(residuals, dy):
  x, kernel, bias = residuals
  dy = dy.reshape(x.shape)
  # The input gradient of a 'same' stride-1 correlation: the correlation of dy with the
  # kernel flipped in both spatial axes.
  dx = _shifted_sum(dy, kernel[::-1, ::-1, 0]).astype(x.dtype).reshape(x.shape)
  dk = _depthwise_kernel_grad(x, dy, kernel.shape[0])
  db = _column_sum(_tokens(dy).astype(_accumulation_dtype(dy.dtype)))
  return dx, dk[:, :, None, :].astype(kernel.dtype), db.astype(bias.dtype)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def depthwise_conv_native(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray
                          ) -> jnp.ndarray:
  """`depthwise_conv` as XLA's grouped convolution (`feature_group_count` = C), NHWC out:
  the form GPUs and TPUs have kernels for."""
  pad = kernel.shape[0] // 2
  y = lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=x.shape[-1])
  return y + bias


class DepthwiseConv(nn.Module):
  """`nn.Conv(C, (K, K), padding=K // 2, feature_group_count=C)` for stride 1 and odd K:
  same parameters (kernel (K, K, 1, C), bias (C,)), same names; computed by
  `depthwise_conv` on the CPU, `depthwise_conv_native` elsewhere."""
  kernel_size: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if self.kernel_size % 2 == 0:
      raise ValueError(f"DepthwiseConv needs an odd kernel_size, got {self.kernel_size}.")
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (channels,), self.param_dtype)
            if self.use_bias else jnp.zeros((channels,), self.param_dtype))
    return per_platform(lambda *a: depthwise_conv(*a).reshape(x.shape), depthwise_conv_native,
                        x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def layer_norm_cpu(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float,
                   dtype: Dtype) -> jnp.ndarray:
  """LayerNorm over the last axis, two-pass variance, statistics by matrix-vector products,
  computed in at least float32 (and x's precision) and returned in `dtype`.

  XLA:CPU hands a LayerNorm's reductions to a reduce kernel that pulls the elementwise
  producers of its input in with it; a 7x7 depthwise conv before it then gets its 49
  shifted inputs materialized one by one. A dot reads its input as it is.
  """
  features = x.shape[-1]
  acc = _accumulation_dtype(x.dtype)
  tokens = _tokens(x).astype(acc)
  # A (C, 1) matrix, not a vector: XLA:CPU inlines small matrix-vector products into
  # their producers' loops, which would recompute the input.
  average = jnp.full((features, 1), 1.0 / features, acc)
  mean = jnp.dot(tokens, average, precision=lax.Precision.HIGHEST)
  centred = tokens - mean
  var = jnp.dot(centred * centred, average, precision=lax.Precision.HIGHEST)
  y = centred * lax.rsqrt(var + epsilon) * scale.astype(acc) + bias.astype(acc)
  return y.astype(dtype).reshape(x.shape)


def layer_norm_native(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float,
                      dtype: Dtype) -> jnp.ndarray:
  """`layer_norm_cpu` with reductions, as nn.LayerNorm(use_fast_variance=False) computes."""
  acc = _accumulation_dtype(x.dtype)
  x32 = x.astype(acc)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  y = centred * lax.rsqrt(var + epsilon) * scale.astype(acc) + bias.astype(acc)
  return y.astype(dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis with two-pass variance, as common.layer_norm,
  whose parameters (scale, bias) it has: `layer_norm_cpu` on the CPU, `layer_norm_native`
  elsewhere."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    return per_platform(
        functools.partial(layer_norm_cpu, epsilon=self.epsilon, dtype=self.dtype),
        functools.partial(layer_norm_native, epsilon=self.epsilon, dtype=self.dtype),
        x, scale, bias)


def pointwise_conv_cpu(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """A 1x1 convolution (kernel (1, 1, C_in, C_out), no padding) with stride as a matrix
  product over the subsampled pixels. XLA:CPU computes a convolution's kernel gradient with
  transposed copies of both activations; as a matrix product all three are plain GEMMs
  (~4x faster forward and backward for ResNet-50's 1x1 layers)."""
  x = x[:, ::stride, ::stride]
  y = jnp.dot(_tokens(x), kernel.reshape(kernel.shape[-2:]))
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def pointwise_conv_native(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """`pointwise_conv_cpu` as XLA's convolution."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution with stride, as `nn.Conv(features, (1, 1), stride)` with
  no padding (same kernel (1, 1, C_in, C_out)): `pointwise_conv_cpu` on the CPU,
  `pointwise_conv_native` elsewhere."""
  features: int
  stride: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (1, 1, channels, self.features),
                        self.param_dtype)
    return per_platform(functools.partial(pointwise_conv_cpu, stride=self.stride),
                        functools.partial(pointwise_conv_native, stride=self.stride),
                        x.astype(self.dtype), kernel.astype(self.dtype))


def _repeat_factor(matrix: np.ndarray) -> int | None:
  """f where `matrix` (out, in) repeats each input f times (out = f * in), else None."""
  out_size, in_size = matrix.shape
  factor = out_size // in_size
  if out_size != factor * in_size:
    return None
  repeat = np.eye(in_size)[np.arange(out_size) // factor]
  return factor if np.array_equal(matrix, repeat) else None


def resample_cpu(x: jnp.ndarray, axis: int, matrix: np.ndarray, nearest: bool = False
                 ) -> jnp.ndarray:
  """out[..., o, ...] = sum_i matrix[o, i] x[..., i, ...] along `axis`: a repeat (broadcast
  and reshape) where a `nearest` matrix repeats pixels, else a matrix product. Not a gather: XLA
  differentiates gathers into scatters, slow on CPU (a train step's 2x bilinear upsampling
  runs 2.5x faster this way, 2x nearest as a repeat 40x)."""
  factor = _repeat_factor(matrix) if nearest else None
  if factor is not None:
    return jnp.repeat(x, factor, axis=axis)
  y = jnp.tensordot(x, jnp.asarray(matrix.T, x.dtype), axes=([axis], [0]))
  return jnp.moveaxis(y, -1, axis)


def resample_native(x: jnp.ndarray, axis: int, matrix: np.ndarray) -> jnp.ndarray:
  """`resample_cpu` as gathers of the (at most two) input pixels of each output pixel and
  their weighted sum, as nearest and linear resizing index them (one gather where every
  weight is 1)."""
  nonzero = matrix != 0
  if (nonzero.sum(axis=1) > 2).any():
    raise ValueError("resample_native takes interpolation matrices with at most two "
                     "non-zero weights per output.")
  first = nonzero.argmax(axis=1)
  last = matrix.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
  rows = np.arange(matrix.shape[0])
  shape = [1] * x.ndim
  shape[axis] = -1

  def weights(w: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(w.reshape(shape), x.dtype)

  y = jnp.take(x, first, axis=axis, mode="clip")
  if np.array_equal(first, last) and np.all(matrix[rows, first] == 1):
    return y  # nearest: one pixel each
  second = np.where(last != first, matrix[rows, last], 0.0)
  return (y * weights(matrix[rows, first])
          + jnp.take(x, last, axis=axis, mode="clip") * weights(second))


def resample(x: jnp.ndarray, axis: int, matrix: np.ndarray, nearest: bool = False
             ) -> jnp.ndarray:
  """out[..., o, ...] = sum_i matrix[o, i] x[..., i, ...] along `axis`, for a fixed (out,
  in) interpolation matrix with at most two non-zero weights per row (`nearest`: one-hot
  rows; else linear): `resample_cpu` on the CPU, `resample_native` elsewhere."""
  return per_platform(functools.partial(resample_cpu, axis=axis, matrix=matrix, nearest=nearest),
                      functools.partial(resample_native, axis=axis, matrix=matrix), x)
