"""Training-step speed of a model, ours (JAX) and its PyTorch/timm reference, each measured
in a fresh process so neither sees the other's threads, memory or compilation caches.

    from medbench_jax.benchmarks import train_speed
    train_speed.measure("convnext_tiny", batch_size=16, image_size=224)               # ours
    train_speed.measure("convnext_tiny", batch_size=16, framework="torch")            # eager
    train_speed.measure("convnext_tiny", batch_size=16, framework="torch_compile")

Each returns a dict (one JSON line of `python -m medbench_jax.bench train`): the first step
(JAX: tracing and XLA compilation, separately and with the first run; torch.compile: its
compilation inside the first step), the median of `steps` timed steps (wall and process CPU
time, the latter less sensitive to other load on a shared machine), images/s and the peak
resident memory of the process.

The step is the fine-tuning step of the study on random data: train mode (BatchNorm batch
statistics updated, stochastic depth at the model's default rate), multi-label BCE on 14
random labels, Adam. JAX jits it with the state donated, as the trainer does; PyTorch runs
timm's model of the same name with os.cpu_count() threads, channels_last, optionally through
torch.compile. bfloat16 means bf16 compute on float32 parameters on both sides (autocast in
PyTorch). torch is imported only in the spawned process that measures it.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any, Callable

FRAMEWORKS = ("jax", "torch", "torch_compile")
DTYPES = ("float32", "bfloat16")
NUM_LABELS = 14  # ChestX-ray14's, as the study fine-tunes.


def _peak_rss_mb() -> float:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(run_step: Callable[[], Any], steps: int) -> dict[str, float]:
  """Median wall and process CPU seconds of `steps` calls; run_step must block."""
  walls, cpus = [], []
  for _ in range(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    run_step()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return {"step_s": statistics.median(walls), "step_cpu_s": statistics.median(cpus),
          "step_s_min": min(walls), "step_s_max": max(walls)}


def jax_train_speed(model: str, batch_size: int, image_size: int, dtype: str,
                    steps: int, seed: int = 0) -> dict[str, Any]:
  """Measures our model's jitted train step in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from medbench_jax import models  # pylint: disable=g-import-not-at-top

  net = models.create(model, NUM_LABELS, dtype=jnp.dtype(dtype))
  if hasattr(net, "img_size"):  # Swin and ViT fix windows / position table by input size.
    net = net.clone(img_size=image_size)
  rng, image_rng, label_rng = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(image_rng, (batch_size, image_size, image_size, 3), jnp.float32)
  labels = jax.random.bernoulli(label_rng, 0.5, (batch_size, NUM_LABELS)).astype(jnp.float32)
  variables = jax.jit(net.init)({"params": rng, "dropout": rng}, images[:1])
  params = variables.pop("params")
  tx = optax.adam(1e-4)
  state = (params, variables, tx.init(params))

  def train_step(state, images, labels, step_rng):
    params, variables, opt_state = state

    def loss_fn(params):
      logits, updates = net.apply({"params": params, **variables}, images, train=True,
                                  mutable=list(variables), rngs={"dropout": step_rng})
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, param_updates), updates, opt_state), loss

  jitted = jax.jit(train_step, donate_argnums=0)
  start = time.perf_counter()
  lowered = jitted.lower(state, images, labels, rng)
  traced = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  state, loss = compiled(state, images, labels, rng)
  loss.block_until_ready()
  first = time.perf_counter()

  def run_step():
    nonlocal state
    state, loss = compiled(state, images, labels, rng)
    loss.block_until_ready()

  return {"trace_s": traced - start, "compile_s": compiled_at - traced,
          "first_step_s": first - start, **_time_steps(run_step, steps),
          "device": jax.devices()[0].device_kind}


def torch_train_speed(model: str, batch_size: int, image_size: int, dtype: str, steps: int,
                      compile_model: bool, seed: int = 0) -> dict[str, Any]:
  """Measures timm's `model` train step in this process (imports torch)."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  kw = {"img_size": image_size} if "swin" in model or "vit" in model else {}
  net = timm.create_model(model, pretrained=False, num_classes=NUM_LABELS, **kw)
  net = net.train().to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
  images = torch.randn(batch_size, 3, image_size, image_size).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 2, (batch_size, NUM_LABELS)).float()
  forward = torch.compile(net) if compile_model else net

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = forward(images)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    optimizer.step()

  start = time.perf_counter()
  run_step()
  return {"first_step_s": time.perf_counter() - start, **_time_steps(run_step, steps),
          "device": f"cpu ({torch.get_num_threads()} threads)",
          "torch_version": torch.__version__}


def _measure_here(model: str, framework: str, batch_size: int, image_size: int, dtype: str,
                  steps: int) -> dict[str, Any]:
  if framework == "jax":
    result = jax_train_speed(model, batch_size, image_size, dtype, steps)
  else:
    result = torch_train_speed(model, batch_size, image_size, dtype, steps,
                               compile_model=framework == "torch_compile")
  return {"bench": "train", "model": model, "framework": framework, "batch_size": batch_size,
          "image_size": image_size, "dtype": dtype, "steps": steps, **result,
          "images_per_s": batch_size / result["step_s"], "peak_rss_mb": _peak_rss_mb()}


def measure(model: str, *, batch_size: int = 16, image_size: int = 224,
            dtype: str = "float32", steps: int = 5, framework: str = "jax") -> dict[str, Any]:
  """One measurement of `framework` (one of FRAMEWORKS) in a fresh spawned process."""
  if framework not in FRAMEWORKS:
    raise ValueError(f"framework={framework!r}; allowed: {FRAMEWORKS}")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {DTYPES}")
  if steps < 1:
    raise ValueError(f"steps={steps}; at least one timed step is needed.")
  # spawn, not fork: a fresh interpreter, and torch never shares a process with JAX.
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")) as pool:
    return pool.submit(_measure_here, model, framework, batch_size, image_size, dtype,
                       steps).result()
