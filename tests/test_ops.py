"""models/ops.py: each rewritten layer against PyTorch's, values and gradients, in both forms:
the XLA:CPU rewrite (what a program lowered for the CPU runs) and the native one (GPU, TPU)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medbench_jax.models import ops


def _torch_depthwise(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, dy: np.ndarray):
  """torch conv2d(groups=C) on NHWC `x`, a (K, K, 1, C) kernel and a bias: y, dx, dkernel,
  dbias in our layouts (y and dy as (N, C) tokens)."""
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
  kt = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).requires_grad_()
  bt = torch.from_numpy(bias.copy()).requires_grad_()
  y = torch.nn.functional.conv2d(xt, kt, bt, padding=kernel.shape[0] // 2, groups=x.shape[-1])
  y.backward(torch.from_numpy(dy.reshape(x.shape).transpose(0, 3, 1, 2).copy()))
  return (y.detach().numpy().transpose(0, 2, 3, 1).reshape(dy.shape),
          xt.grad.numpy().transpose(0, 2, 3, 1), kt.grad.numpy().transpose(2, 3, 1, 0),
          bt.grad.numpy())


def _inputs(rng: np.random.Generator, shape, size: int, dtype=np.float64):
  x = rng.normal(size=shape).astype(dtype)
  kernel = (rng.normal(size=(size, size, 1, shape[-1])) / size).astype(dtype)
  bias = rng.normal(size=shape[-1]).astype(dtype)
  dy = rng.normal(size=(int(np.prod(shape[:-1])), shape[-1])).astype(dtype)
  return x, kernel, bias, dy


_NAMES = ("y", "dx", "dkernel", "dbias")


# Sizes that are and are not multiples of the kernel (the kernel gradient works in tiles).
@pytest.mark.parametrize("size,height,width", [(7, 14, 14), (7, 9, 11), (3, 5, 8), (5, 4, 4)])
def test_depthwise_conv_matches_torch_in_float64(size, height, width):
  inputs = _inputs(np.random.default_rng(size + height), (2, height, width, 6), size)
  expected = _torch_depthwise(*inputs)
  with jax.enable_x64(True):
    y, vjp = jax.vjp(ops.depthwise_conv, *map(jnp.asarray, inputs[:3]))
    actual = (y, *vjp(jnp.asarray(inputs[3])))
  for name, a, e in zip(_NAMES, actual, expected):
    assert a.shape == e.shape, (name, a.shape, e.shape)
    np.testing.assert_allclose(np.asarray(a), e, rtol=1e-12, atol=1e-12, err_msg=name)


def test_depthwise_conv_float32_and_bfloat16():
  inputs = _inputs(np.random.default_rng(0), (4, 28, 28, 16), 7, np.float32)
  # The float64 result of the same float32 inputs: the exact answer to fp32 rounding.
  expected = _torch_depthwise(*(a.astype(np.float64) for a in inputs))
  y, vjp = jax.vjp(ops.depthwise_conv, *map(jnp.asarray, inputs[:3]))
  for name, a, e in zip(_NAMES, (y, *vjp(jnp.asarray(inputs[3]))), expected):
    assert a.dtype == jnp.float32
    # dbias sums 3136 terms of either sign in one matrix product: 3.5e-6 of the result off
    # here (torch's fp32: 4e-7); the others are within 4e-7, as torch's.
    assert np.abs(np.asarray(a) - e).max() <= 1e-5 * np.abs(e).max(), name

  # bf16 inputs accumulate in float32: only the inputs' and the output's rounding remain.
  y16 = ops.depthwise_conv(*(jnp.asarray(a, jnp.bfloat16) for a in inputs[:3]))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), expected[0],
                             atol=0.02 * np.abs(expected[0]).max())


def test_depthwise_conv_module_is_nn_conv():
  """Same parameter tree as the grouped nn.Conv it replaces, and the same outputs."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 10, 8))
  ours = ops.DepthwiseConv(7)
  reference = flax.linen.Conv(8, (7, 7), padding=3, feature_group_count=8)
  variables = reference.init(jax.random.PRNGKey(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # Non-zero bias.
  shapes = jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x))
  assert shapes == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                             atol=1e-5)
  no_bias = ops.DepthwiseConv(7, use_bias=False)
  assert "bias" not in no_bias.init(jax.random.PRNGKey(1), x)["params"]
  with pytest.raises(ValueError, match="odd kernel_size"):
    ops.DepthwiseConv(4).init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_matches_torch(dtype):
  """Values and gradients of torch.nn.functional.layer_norm, on tokens whose mean is large
  next to their spread (where a one-pass variance would fail)."""
  rng = np.random.default_rng(1)
  x = (30 + rng.normal(size=(2, 5, 7, 24))).astype(dtype)
  scale, bias = rng.normal(size=24).astype(dtype), rng.normal(size=24).astype(dtype)
  dy = rng.normal(size=x.shape).astype(dtype)
  tensors = [torch.from_numpy(a.copy()).requires_grad_() for a in (x, scale, bias)]
  y = torch.nn.functional.layer_norm(tensors[0], (24,), tensors[1], tensors[2], eps=1e-6)
  y.backward(torch.from_numpy(dy))
  expected = [y.detach().numpy()] + [t.grad.numpy() for t in tensors]

  module = ops.LayerNorm(1e-6, dtype=dtype, param_dtype=dtype)
  with jax.enable_x64(dtype == np.float64):
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, jnp.asarray(x))
    grads, dx = vjp(jnp.asarray(dy))
    actual = [y, dx, grads["params"]["scale"], grads["params"]["bias"]]
    shapes = jax.tree.map(jnp.shape, module.init(jax.random.PRNGKey(0), x))
  tolerance = 1e-12 if dtype == np.float64 else 2e-5
  for name, a, e in zip(("y", "dx", "dscale", "dbias"), actual, expected):
    assert a.dtype == dtype, name
    np.testing.assert_allclose(np.asarray(a), e, rtol=tolerance, atol=tolerance, err_msg=name)
  assert shapes == {"params": {"scale": (24,), "bias": (24,)}}


def test_pointwise_conv_is_nn_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
  for stride in (1, 2):
    ours = ops.PointwiseConv(16, stride)
    reference = flax.linen.Conv(16, (1, 1), (stride, stride), padding=0, use_bias=False)
    variables = reference.init(jax.random.PRNGKey(1), x)
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x))
            == jax.tree.map(jnp.shape, variables))
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                               atol=1e-5)



# --- the native forms (GPUs, TPUs), computed here on the CPU ----------------------------

@pytest.mark.parametrize("size,height,width", [(7, 9, 11), (3, 5, 8)])
def test_native_depthwise_conv_matches_torch_in_float64(size, height, width):
  inputs = _inputs(np.random.default_rng(size), (2, height, width, 6), size)
  expected = _torch_depthwise(*inputs)
  with jax.enable_x64(True):
    y, vjp = jax.vjp(ops.depthwise_conv_native, *map(jnp.asarray, inputs[:3]))
    actual = (y.reshape(-1, 6), *vjp(jnp.asarray(inputs[3]).reshape(y.shape)))
  for name, a, e in zip(_NAMES, actual, expected):
    np.testing.assert_allclose(np.asarray(a), e, rtol=1e-12, atol=1e-12, err_msg=name)


def test_native_layer_norm_matches_the_cpu_form():
  """Values and gradients, float64 (to rounding) and bf16 input with float32 statistics."""
  rng = np.random.default_rng(2)
  x = 30 + rng.normal(size=(2, 5, 7, 24))
  scale, bias = rng.normal(size=24), rng.normal(size=24)
  with jax.enable_x64(True):
    for dtype, tolerance in ((jnp.float64, 1e-12), (jnp.bfloat16, 1e-2)):
      args = (jnp.asarray(x, dtype), jnp.asarray(scale), jnp.asarray(bias))
      forms = [functools.partial(f, epsilon=1e-6, dtype=dtype)
               for f in (ops.layer_norm_cpu, ops.layer_norm_native)]
      (y_cpu, vjp_cpu), (y_native, vjp_native) = (jax.vjp(f, *args) for f in forms)
      assert y_cpu.dtype == y_native.dtype == dtype
      dy = jnp.asarray(rng.normal(size=x.shape), dtype)
      for a, e in zip((y_native, *vjp_native(dy)), (y_cpu, *vjp_cpu(dy))):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                                   rtol=tolerance, atol=tolerance)


def test_native_pointwise_conv_is_the_matrix_product():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 8, 16))
  for stride in (1, 2):
    native = ops.pointwise_conv_native(x, kernel, stride)
    assert native.shape == (2, -(-9 // stride), -(-9 // stride), 16)
    np.testing.assert_allclose(native, ops.pointwise_conv_cpu(x, kernel, stride), atol=1e-5)


# (in, out) along one axis: 2x and 3x nearest (repeats), nearest by other factors, bilinear
# up and down with and without aligned corners, and from a single pixel.
@pytest.mark.parametrize("nearest,in_size,out_size,align_corners", [
    (True, 4, 8, None), (True, 3, 9, None), (True, 5, 7, None), (True, 8, 3, None),
    (False, 4, 8, False), (False, 5, 7, True), (False, 9, 4, False), (False, 1, 6, False)])
def test_native_resample_matches_the_cpu_form(nearest, in_size, out_size, align_corners):
  from medbench_jax.models import decoders

  matrix = (np.eye(in_size)[decoders._nearest_indices(in_size, out_size)] if nearest
            else decoders._linear_matrix(in_size, out_size, align_corners))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, in_size, 3, 4))
  forms = [functools.partial(ops.resample_cpu, axis=1, matrix=matrix, nearest=nearest),
           functools.partial(ops.resample_native, axis=1, matrix=matrix)]
  (y_cpu, vjp_cpu), (y_native, vjp_native) = (jax.vjp(f, x) for f in forms)
  assert y_native.shape == (2, out_size, 3, 4)
  dy = jax.random.normal(jax.random.PRNGKey(1), y_cpu.shape)
  np.testing.assert_allclose(y_native, y_cpu, atol=1e-6)
  np.testing.assert_allclose(vjp_native(dy)[0], vjp_cpu(dy)[0], atol=1e-5)


def test_native_resample_takes_interpolation_matrices_only():
  with pytest.raises(ValueError, match="at most two"):
    ops.resample_native(jnp.ones((1, 3, 1, 1)), 1, np.ones((2, 3)))
