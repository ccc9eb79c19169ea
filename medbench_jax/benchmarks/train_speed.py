"""Training- and evaluation-step speed of a model, ours (JAX) and its PyTorch/timm
reference, each measured in a fresh process so neither sees the other's threads, memory or
compilation caches.

    from medbench_jax.benchmarks import train_speed
    train_speed.measure("convnext_tiny", batch_size=16, image_size=224)               # ours
    train_speed.measure("convnext_tiny", batch_size=16, framework="torch")            # eager
    train_speed.measure("convnext_tiny", batch_size=16, framework="torch_compile")
    train_speed.measure("resnet50", batch_size=8, step="eval", ten_crop=True)

Each returns a dict (one JSON line of `python -m medbench_jax.bench train|eval`): the first
step (JAX: tracing and XLA compilation, separately and with the first run; torch.compile:
its compilation inside the first step), the median of `steps` timed steps (wall and process
CPU time, the latter less sensitive to other load on a shared machine), images/s and the
peak resident memory of the process. JAX's also carries the FLOPs of one step by XLA's
cost analysis of the compiled step, the model FLOPs utilisation given the device's peak
(mfu), the device's peak memory where it reports one (GPU, TPU; null on CPU) and, fed
from a config's training pipeline, the fraction of the time waiting for input.

The train step is the fine-tuning step of the study on random data: train mode (BatchNorm
batch statistics updated, stochastic depth at the model's default rate), multi-label BCE on
random labels (ChestX-ray14's 14 unless told the head size), Adam; with `input_config` the
config's augmented uint8 batches instead, normalized in the step as the trainer does. JAX
jits it with the state donated, as the trainer does; PyTorch runs timm's model of the
same name with os.cpu_count() threads, channels_last, optionally through torch.compile.
The eval step is the forward pass in inference mode and the sigmoid, averaged over the
ten crops of each image with `ten_crop` (the study's test-time augmentation; images/s
then counts images, not crops). bfloat16 means bf16 compute on float32 parameters on
both sides (autocast in PyTorch). torch is imported only in the
spawned process that measures it. With `compilation_cache_dir`, JAX uses its persistent
compilation cache there (medbench_jax.runtime), so a second measurement of the same model
and shapes shows what the cache saves of the first step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
import concurrent.futures
import functools
import json
import multiprocessing
import os
import re
import resource
import statistics
import time
from typing import Any

FRAMEWORKS = ("jax", "torch", "torch_compile")
DTYPES = ("float32", "bfloat16")
STEPS = ("train", "eval")
TEN_CROPS = 10
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


def _jax_model(model: str, batch_size: int, image_size: int, dtype: str, seed: int,
               num_outputs: int, model_kw: dict[str, Any]):
  """Our model, its initial variables, a random (B, S, S, 3) batch and an rng."""
  import jax
  import jax.numpy as jnp

  from medbench_jax import models

  net = models.create(model, num_outputs, dtype=jnp.dtype(dtype), **model_kw)
  if getattr(net, "img_size", None) is not None:
    # Swin and ViT, also as segmentation encoders, fix windows / position table by input size.
    net = models.create(model, num_outputs, dtype=jnp.dtype(dtype),
                        **{**model_kw, "img_size": image_size})
  rng, image_rng = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(image_rng, (batch_size, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(net.init)({"params": rng, "dropout": rng}, images[:1])
  return net, variables, images, rng


def _flops(compiled) -> float | None:
  """FLOPs of one run of a compiled computation by XLA's cost analysis (None where the
  backend has none). Older JAX returns a list with one dict per computation."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None else None


def _peak_device_memory_mb() -> float | None:
  """Peak memory in use on the first device, where it reports it (GPU, TPU; not CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  peak = (stats or {}).get("peak_bytes_in_use")
  return peak / 2**20 if peak is not None else None


def _time_input_window(run_step: Callable[[Any], Any], batches: Iterator,
                       steps: int) -> dict[str, float]:
  """The trainer's measure (trainer/loop.py): `steps` steps dispatched without blocking,
  each after waiting for its batch; mean wall and CPU seconds per step and the fraction
  of the wall time spent waiting for batches."""
  import jax

  wait, outputs = 0.0, None
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    fetch = time.perf_counter()
    batch = next(batches)
    wait += time.perf_counter() - fetch
    outputs = run_step(batch)
  jax.block_until_ready(outputs)
  elapsed = time.perf_counter() - start
  return {"step_s": elapsed / steps, "step_cpu_s": (time.process_time() - cpu) / steps,
          "input_wait": wait / elapsed}


def _first_and_steady(jitted: Callable, args: tuple, steps: int, carry: bool,
                      batches: Iterator | None = None) -> dict[str, Any]:
  """Times lowering, compilation and the first run of `jitted(*args)`, then `steps` runs.
  carry: the output's first element replaces the first argument (a donated train state).
  batches: where given, each step after the first takes the next one as its second
  argument, timed as the trainer times it (_time_input_window)."""
  import jax

  from medbench_jax import runtime

  runtime.freeze_heap()  # as the trainer does for its first step
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  traced = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*args))
  first = time.perf_counter()
  runtime.thaw_heap()
  if carry:
    args = (outputs[0],) + args[1:]

  def run_step(batch=None):
    nonlocal args
    if batch is not None:
      args = (args[0], batch) + args[2:]
    outputs = compiled(*args)
    if carry:
      args = (outputs[0],) + args[1:]
    return outputs

  if batches is None:
    timed = {**_time_steps(lambda: jax.block_until_ready(run_step()), steps),
             "input_wait": None}
  else:
    timed = _time_input_window(run_step, batches, steps)
  return {"trace_s": traced - start, "compile_s": compiled_at - traced,
          "first_step_s": first - start, **timed, "flops_per_step": _flops(compiled),
          "peak_device_memory_mb": _peak_device_memory_mb(),
          "device": jax.devices()[0].device_kind}


def _real_batches(config, batch_size: int) -> tuple[Iterator, Callable[[Any], Any]]:
  """The config's training input pipeline over its prepared data set (prepared here on
  first use, as the trainer's lead process does) and the normalization the trainer's
  step applies to its uint8 images."""
  import contextlib
  import sys

  from medbench_jax import config_lib
  from medbench_jax import tasks
  from medbench_jax.data import pipeline
  from medbench_jax.data import prepare
  from medbench_jax.data import sources

  # TFDS reports preparation progress on stdout, which carries the bench's JSON lines.
  with contextlib.redirect_stdout(sys.stderr):
    prepare.prepare_dataset(config.dataset)
    splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  batches = iter(pipeline.train_dataset(
      splits.train, pp_spec=task.pp_train(), keys=task.keys, local_batch_size=batch_size,
      seed=config.seed, num_workers=config.input.num_workers))
  return batches, functools.partial(pipeline.normalize, **config_lib.normalization(config))


def jax_train_speed(model: str, batch_size: int, image_size: int, dtype: str,
                    steps: int, num_outputs: int = NUM_LABELS,
                    model_kw: dict[str, Any] | None = None, input_config=None,
                    seed: int = 0) -> dict[str, Any]:
  """Measures our model's jitted train step in this process; on the batches of the
  training pipeline of `input_config` (a config) where given, else on random ones."""
  import jax
  import jax.numpy as jnp
  import optax

  batches, preprocess, close = None, lambda images: images, lambda: None
  if input_config is not None:
    batches, preprocess = _real_batches(input_config, batch_size)
    close = getattr(batches, "close", close)
    batch = next(batches)
    image_size = batch["image"].shape[1]
  net, variables, images, rng = _jax_model(model, batch_size, image_size, dtype, seed,
                                           num_outputs, model_kw or {})
  if batches is None:
    # Random 0/1 targets the shape of the outputs: labels (B, K), or masks (B, H, W, K).
    outputs = jax.eval_shape(functools.partial(net.apply, train=False), variables, images)
    batch = {"image": images,
             "labels": jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5,
                                            outputs.shape).astype(jnp.float32)}
  target_key = "labels" if "labels" in batch else "mask"
  params = variables.pop("params")
  tx = optax.adam(1e-4)
  state = (params, variables, tx.init(params))

  def train_step(state, batch, step_rng):
    params, variables, opt_state = state
    images, labels = preprocess(batch["image"]), batch[target_key].astype(jnp.float32)

    def loss_fn(params):
      logits, updates = net.apply({"params": params, **variables}, images, train=True,
                                  mutable=list(variables), rngs={"dropout": step_rng})
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, param_updates), updates, opt_state), loss

  try:
    result = _first_and_steady(jax.jit(train_step, donate_argnums=0),
                               (state, batch, rng), steps, carry=True, batches=batches)
  finally:
    close()
  return {**result, "image_size": image_size}


def jax_eval_speed(model: str, batch_size: int, image_size: int, dtype: str, steps: int,
                   ten_crop: bool, num_outputs: int = NUM_LABELS,
                   model_kw: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
  """Measures our model's jitted eval step (inference forward, sigmoid, crop mean)."""
  import jax

  from medbench_jax.tasks import base

  crops = TEN_CROPS if ten_crop else 1
  net, variables, images, _ = _jax_model(model, batch_size * crops, image_size, dtype, seed,
                                         num_outputs, model_kw or {})
  if ten_crop:
    images = images.reshape(batch_size, crops, *images.shape[1:])

  def eval_step(variables, images):
    flat, crops = base.flatten_crops(images)
    probs = jax.nn.sigmoid(net.apply(variables, flat, train=False))
    return base.mean_over_crops(probs, batch_size, crops)

  return _first_and_steady(jax.jit(eval_step), (variables, images), steps, carry=False)


def _timm_model(model: str, image_size: int, num_outputs: int, seed: int):
  """timm's `model` with our head size, channels_last, torch threads = CPUs."""
  import timm
  import torch

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  kw = {"img_size": image_size} if "swin" in model or "vit" in model else {}
  net = timm.create_model(model, pretrained=False, num_classes=num_outputs, **kw)
  return net.to(memory_format=torch.channels_last)


def _torch_first_and_steady(run_step: Callable[[], Any], steps: int) -> dict[str, Any]:
  import torch

  start = time.perf_counter()
  run_step()
  return {"first_step_s": time.perf_counter() - start, **_time_steps(run_step, steps),
          "device": f"cpu ({torch.get_num_threads()} threads)",
          "torch_version": torch.__version__}


def torch_train_speed(model: str, batch_size: int, image_size: int, dtype: str, steps: int,
                      compile_model: bool, num_outputs: int = NUM_LABELS,
                      seed: int = 0) -> dict[str, Any]:
  """Measures timm's `model` train step in this process (imports torch)."""
  import torch

  net = _timm_model(model, image_size, num_outputs, seed).train()
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
  images = torch.randn(batch_size, 3, image_size, image_size).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 2, (batch_size, num_outputs)).float()
  forward = torch.compile(net) if compile_model else net

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = forward(images)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    optimizer.step()

  return _torch_first_and_steady(run_step, steps)


def torch_eval_speed(model: str, batch_size: int, image_size: int, dtype: str, steps: int,
                     compile_model: bool, ten_crop: bool, num_outputs: int = NUM_LABELS,
                     seed: int = 0) -> dict[str, Any]:
  """Measures timm's `model` eval step in this process (imports torch)."""
  import torch

  net = _timm_model(model, image_size, num_outputs, seed).eval()
  crops = TEN_CROPS if ten_crop else 1
  images = torch.randn(batch_size * crops, 3, image_size, image_size).contiguous(
      memory_format=torch.channels_last)
  forward = torch.compile(net) if compile_model else net

  def run_step():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                enabled=dtype == "bfloat16"):
      probs = torch.sigmoid(forward(images).float())
      return probs.view(batch_size, crops, -1).mean(1)

  return _torch_first_and_steady(run_step, steps)


def _measure_here(model: str, framework: str, step: str, batch_size: int, image_size: int,
                  dtype: str, steps: int, ten_crop: bool, compilation_cache_dir: str,
                  num_outputs: int, model_kw: dict[str, Any], input_config,
                  peak_tflops: float | None) -> dict[str, Any]:
  compile_model = framework == "torch_compile"
  if framework == "jax":
    from medbench_jax import runtime
    runtime.use_compilation_cache(compilation_cache_dir)
    model_args = dict(num_outputs=num_outputs, model_kw=model_kw)
    result = (jax_train_speed(model, batch_size, image_size, dtype, steps,
                              input_config=input_config, **model_args) if step == "train"
              else jax_eval_speed(model, batch_size, image_size, dtype, steps, ten_crop,
                                  **model_args))
    flops = result["flops_per_step"]
    result["mfu"] = (flops / result["step_s"] / (peak_tflops * 1e12)
                     if flops and peak_tflops else None)
  elif step == "train":
    result = torch_train_speed(model, batch_size, image_size, dtype, steps, compile_model,
                               num_outputs)
  else:
    result = torch_eval_speed(model, batch_size, image_size, dtype, steps, compile_model,
                              ten_crop, num_outputs)
  extra = {"ten_crop": ten_crop} if step == "eval" else {}
  if framework == "jax":
    extra["compilation_cache"] = compilation_cache_dir
  return {"bench": step, "model": model, "framework": framework, "batch_size": batch_size,
          "image_size": image_size, "dtype": dtype, "num_outputs": num_outputs,
          "steps": steps, **extra, **result, "images_per_s": batch_size / result["step_s"],
          "peak_rss_mb": _peak_rss_mb()}


def measure(model: str, *, step: str = "train", batch_size: int = 16, image_size: int = 224,
            dtype: str = "float32", steps: int = 5, framework: str = "jax",
            ten_crop: bool = False, compilation_cache_dir: str = "",
            num_outputs: int = NUM_LABELS, model_kw: dict[str, Any] | None = None,
            input_config=None, peak_tflops: float | None = None) -> dict[str, Any]:
  """One measurement of `framework` (one of FRAMEWORKS) running `step` (one of STEPS) in a
  fresh spawned process. compilation_cache_dir: JAX's persistent cache ("" = off).
  model_kw: keyword arguments of our model (JAX only). input_config: a config whose
  training pipeline feeds the JAX train step (its crop size then replaces image_size).
  peak_tflops: the device's peak TFLOP/s, for the model FLOPs utilisation (mfu)."""
  if framework not in FRAMEWORKS:
    raise ValueError(f"framework={framework!r}; allowed: {FRAMEWORKS}")
  if step not in STEPS:
    raise ValueError(f"step={step!r}; allowed: {STEPS}")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {DTYPES}")
  if steps < 1:
    raise ValueError(f"steps={steps}; at least one timed step is needed.")
  if ten_crop and step != "eval":
    raise ValueError("ten_crop applies to the eval step only.")
  if input_config is not None and (step != "train" or framework != "jax"):
    raise ValueError("input_config feeds our (framework='jax') train step only.")
  if model_kw and framework != "jax":
    raise ValueError(f"model_kw={model_kw} changes our model only; timm's {model!r} would "
                     "not be the same architecture.")
  if peak_tflops is not None and peak_tflops <= 0:
    raise ValueError(f"peak_tflops={peak_tflops}; a device's peak is positive.")
  # spawn, not fork: a fresh interpreter, and torch never shares a process with JAX.
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")) as pool:
    return pool.submit(_measure_here, model, framework, step, batch_size, image_size, dtype,
                       steps, ten_crop, compilation_cache_dir, num_outputs, model_kw or {},
                       input_config, peak_tflops).result()


def step_settings(config, step: str) -> dict[str, Any]:
  """What the trainer would run for `config`: model name, batch size (eval: the eval batch
  size), input size (what the eval preprocessing makes, as the trainer sizes the model),
  dtype, head size and model keyword arguments. The data set need not be prepared."""
  from medbench_jax import config_checks
  from medbench_jax import tasks
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.trainer import trials

  config_checks.validate(config)
  info = sources.dataset_info(config.dataset, prepare.builder_for(config.dataset))
  task = tasks.for_dataset(config, info)
  return {"model": config.model.name,
          "batch_size": config.input.batch_size if step == "train" else (
              config.input.eval_batch_size),
          "image_size": trials.input_size(config, task, info.channels),
          "dtype": config.model.dtype, "num_outputs": task.num_outputs,
          "model_kw": config.model.kw.to_dict()}


def bench_step(step: str, model: str, *, batch_size: int, image_size: int, dtype: str,
               steps: int, compare_torch: bool, torch_compile: bool = False,
               ten_crop: bool = False, compilation_cache: str = "",
               num_outputs: int = NUM_LABELS, model_kw: dict[str, Any] | None = None,
               input_config=None, peak_tflops: float | None = None
               ) -> list[dict[str, Any]]:
  """`train` or `eval` (`step`) of `model`: ours, then PyTorch's if asked, each measured in
  a fresh process; ours gets speed_vs_<framework> (their step time / ours). input_config:
  a config whose training pipeline feeds our train step (train_speed.measure)."""
  frameworks = ["jax"]
  if compare_torch:
    frameworks += ["torch", "torch_compile"] if torch_compile else ["torch"]
  if compare_torch and model_kw:
    # Refused before measuring ours: timm would build another architecture.
    raise ValueError(f"--compare_torch: the model keyword arguments {model_kw} (the "
                     f"config's model.kw) have no timm counterpart for {model!r}.")
  results = [measure(
      model, step=step, batch_size=batch_size, image_size=image_size, dtype=dtype,
      steps=steps, framework=framework, ten_crop=ten_crop, num_outputs=num_outputs,
      **(dict(compilation_cache_dir=compilation_cache, model_kw=model_kw,
              input_config=input_config, peak_tflops=peak_tflops)
         if framework == "jax" else {}))
             for framework in frameworks]
  for theirs in results[1:]:
    results[0][f"speed_vs_{theirs['framework']}"] = theirs["step_s"] / results[0]["step_s"]
  return results


def cache_file(device_kind: str, cache_dir: str | None = None) -> str:
  """Where `bench train|eval` results on `device_kind` accumulate (one JSON line each):
  CACHE_DIR/bench/<device kind>.jsonl, read by the sweep planner (study/planner.py)."""
  from medbench_jax import paths

  name = re.sub(r"[^A-Za-z0-9._-]+", "_", device_kind).strip("_") or "unknown"
  return os.path.join(cache_dir or os.path.join(paths.CACHE_DIR, "bench"), f"{name}.jsonl")


def record(line: dict[str, Any], cache_dir: str | None = None) -> str | None:
  """Appends one of our (JAX) measurements to its device kind's cache file, stamped with
  the time; returns the file (None for PyTorch's lines, which the planner does not use)."""
  if line.get("framework") != "jax" or not line.get("device"):
    return None
  path = cache_file(line["device"], cache_dir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  stamped = {**line, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  with open(path, "a") as f:  # one short write per line: appends from two runs interleave whole
    f.write(json.dumps(stamped) + "\n")
  return path
