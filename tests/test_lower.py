"""benchmarks/lower.py and `bench lower`: the trainer's steps lowered per platform on this
CPU-only machine; models/ops.py's choice of kernels per platform, values and gradients."""

import functools
import json
import subprocess
import sys

import jax
from jax.experimental import io_callback
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medbench_jax.benchmarks import lower
from medbench_jax.models import ops
from tests import helpers

PLATFORMS = ("cpu", "cuda", "tpu")
# One block per stage: four depthwise convolutions, traced in seconds.
_CONVNEXT_KW = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def _tiny_config(model: str, **model_kw) -> ml_collections.ConfigDict:
  config = helpers.load_tiny(f"model={model}")
  config.model.kw = ml_collections.ConfigDict(model_kw)
  config.input.batch_size = config.input.eval_batch_size = 8  # one per simulated device
  return config


@pytest.fixture(scope="module")
def convnext_lines():
  """(step, platform) -> the record of a one-block-per-stage ConvNeXt-T's trainer steps."""
  lines = lower.bench_lower(_tiny_config("convnext_tiny", **_CONVNEXT_KW), PLATFORMS)
  return {(line["step"], line["platform"]): line for line in lines}


def test_gpu_and_tpu_get_grouped_convolutions_and_no_host_callbacks(convnext_lines):
  assert sorted(convnext_lines) == sorted((s, p) for s in ("train", "eval") for p in PLATFORMS)
  for platform in ("cuda", "tpu"):
    train, evaluate = convnext_lines["train", platform], convnext_lines["eval", platform]
    # Each block's depthwise conv: forward in both steps, its input gradient in training
    # (the kernel gradient is a batch-grouped convolution).
    assert evaluate["grouped_convolution"] == 4, evaluate
    assert train["grouped_convolution"] == 8, train
    # The 1x1 convs stay matrix products (ConvNeXt's are Dense layers); the stem and the
    # three downsampling layers are convolutions everywhere.
    assert train["host_callback"] == evaluate["host_callback"] == 0
    assert train["model"] == "convnext_tiny" and train["image_size"] == 64


def test_cpu_keeps_the_cpu_rewrites(convnext_lines):
  for step in ("train", "eval"):
    cpu, tpu = convnext_lines[step, "cpu"], convnext_lines[step, "tpu"]
    assert cpu["grouped_convolution"] == 0, cpu
    assert cpu["host_callback"] == 0
    # The stem and downsampling convs only, against those plus the depthwise ones.
    assert cpu["convolution"] < tpu["convolution"]
    # LayerNorm statistics by dots on the CPU only.
    assert cpu["dot_general"] > tpu["dot_general"]


def test_count_ops_sees_what_it_counts():
  """Grouped convolutions, dots and host callbacks in a lowered function are counted (so
  the zeros above could have been otherwise)."""
  def f(x, kernel):
    y = ops.depthwise_conv_native(x, kernel, jnp.zeros(x.shape[-1]))
    y = io_callback(lambda a: a, jax.ShapeDtypeStruct(y.shape, y.dtype), y)
    return jnp.dot(y.reshape(-1, 4), jnp.ones((4, 4)))

  args = (jax.ShapeDtypeStruct((1, 5, 5, 4), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 1, 4), jnp.float32))
  counts = lower.count_ops(jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text())
  assert counts == {"convolution": 1, "grouped_convolution": 1, "dot_general": 1,
                    "custom_call": 1, "host_callback": 1}


def _grad_check(cpu_form, native_form, args, tolerance):
  """jax.grad of a random projection through `cpu_form` (which chooses per platform; on
  this machine the CPU form) against the same through the native form computed here."""
  def loss(f, *args):
    y = f(*args)
    weights = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
    return jnp.sum(y * weights)

  argnums = tuple(range(len(args)))
  ours = jax.jit(jax.grad(functools.partial(loss, cpu_form), argnums))(*args)
  native = jax.jit(jax.grad(functools.partial(loss, native_form), argnums))(*args)
  for a, e in zip(ours, native):
    assert a.shape == e.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tolerance,
                               atol=tolerance * np.abs(np.asarray(e)).max())


def test_gradients_through_platform_dependent_ops_on_cpu():
  keys = iter(jax.random.split(jax.random.key(0), 8))
  x = jax.random.normal(next(keys), (2, 9, 11, 6))
  kernel = jax.random.normal(next(keys), (3, 3, 1, 6)) / 3
  bias = jax.random.normal(next(keys), (6,))

  def depthwise(x, kernel, bias):
    return ops.DepthwiseConv(3).apply({"params": {"kernel": kernel, "bias": bias}}, x)

  _grad_check(depthwise, ops.depthwise_conv_native, (x, kernel, bias), 1e-5)

  def layer_norm(x, scale, bias):
    return ops.LayerNorm().apply({"params": {"scale": scale, "bias": bias}}, x)

  native = functools.partial(ops.layer_norm_native, epsilon=1e-6, dtype=jnp.float32)
  _grad_check(layer_norm, native, (x + 5, bias + 1, bias), 1e-5)

  pointwise_kernel = jax.random.normal(next(keys), (1, 1, 6, 5))
  for stride in (1, 2):
    def pointwise(x, kernel, stride=stride):
      return ops.PointwiseConv(5, stride).apply({"params": {"kernel": kernel}}, x)
    _grad_check(pointwise, functools.partial(ops.pointwise_conv_native, stride=stride),
                (x, pointwise_kernel), 1e-5)

  from medbench_jax.models import decoders
  _grad_check(lambda x: decoders.resize_bilinear(x, (20, 15), align_corners=False),
              lambda x: ops.resample_native(ops.resample_native(
                  x, 1, decoders._linear_matrix(9, 20, False)), 2,
                  decoders._linear_matrix(11, 15, False)), (x,), 1e-5)


def test_bench_lower_command_line():
  """`python -m medbench_jax.bench lower` with --model: one JSON line per (step,
  platform); a 1x1 conv is a convolution only where lowered for an accelerator."""
  result = subprocess.run(
      [sys.executable, "-m", "medbench_jax.bench", "lower", f"--config={helpers.TINY}",
       "--model=resnet18", "--platforms=cpu,tpu"],
      cwd=helpers.REPO, env=helpers.subprocess_env(), capture_output=True, text=True,
      timeout=240, check=True)
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [(line["step"], line["platform"]) for line in lines] == [
      ("train", "cpu"), ("train", "tpu"), ("eval", "cpu"), ("eval", "tpu")]
  eval_cpu, eval_tpu = lines[2], lines[3]
  assert eval_cpu["model"] == "resnet18" and eval_cpu["config"] == helpers.TINY
  # resnet18's three 1x1 downsampling convs: matrix products on the CPU.
  assert eval_tpu["convolution"] - eval_cpu["convolution"] == 3
