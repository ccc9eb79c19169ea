"""models/ops.py: each rewritten layer against PyTorch's, values and gradients."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medbench_jax.models import ops


def _torch_depthwise(x: np.ndarray, kernel: np.ndarray, dy: np.ndarray):
  """torch conv2d(groups=C) on NHWC `x` and a (K, K, 1, C) kernel: y, dx, dk in our layouts."""
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
  kt = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).requires_grad_()
  y = torch.nn.functional.conv2d(xt, kt, padding=kernel.shape[0] // 2, groups=x.shape[-1])
  y.backward(torch.from_numpy(dy.transpose(0, 3, 1, 2).copy()))
  return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
          kt.grad.numpy().transpose(2, 3, 1, 0))


# Sizes that are and are not multiples of the kernel (the kernel gradient works in tiles).
@pytest.mark.parametrize("size,height,width", [(7, 14, 14), (7, 9, 11), (3, 5, 8), (5, 4, 4)])
def test_depthwise_conv_matches_torch_in_float64(size, height, width):
  rng = np.random.default_rng(size + height)
  x = rng.normal(size=(2, height, width, 6))
  kernel = rng.normal(size=(size, size, 1, 6))
  dy = rng.normal(size=(2, height, width, 6))
  expected = _torch_depthwise(x, kernel, dy)
  with jax.enable_x64(True):
    y, vjp = jax.vjp(ops.depthwise_conv, jnp.asarray(x), jnp.asarray(kernel))
    actual = (y, *vjp(jnp.asarray(dy)))
  for name, a, e in zip(("y", "dx", "dkernel"), actual, expected):
    assert a.shape == e.shape, (name, a.shape, e.shape)
    np.testing.assert_allclose(np.asarray(a), e, rtol=1e-12, atol=1e-12, err_msg=name)


def test_depthwise_conv_float32_and_bfloat16():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 28, 28, 16)).astype(np.float32)
  kernel = (0.1 * rng.normal(size=(7, 7, 1, 16))).astype(np.float32)
  dy = rng.normal(size=(4, 28, 28, 16)).astype(np.float32)
  expected = _torch_depthwise(x, kernel, dy)
  y, vjp = jax.vjp(ops.depthwise_conv, jnp.asarray(x), jnp.asarray(kernel))
  for name, a, e in zip(("y", "dx", "dkernel"), (y, *vjp(jnp.asarray(dy))), expected):
    assert a.dtype == jnp.float32
    scale = np.abs(e).max()
    assert np.abs(np.asarray(a) - e).max() <= 1e-6 * scale, name

  # bf16 inputs accumulate in float32: only the inputs' and the output's rounding remain.
  y16 = ops.depthwise_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16))
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
  with pytest.raises(ValueError, match="odd kernel_size"):
    ops.DepthwiseConv(4).init(jax.random.PRNGKey(1), x)
