"""The trainer's train and eval steps lowered for each platform, without its devices.

    python -m medbench_jax.bench lower --config=configs/convnext.py:data=chestxray14 \
        --platforms=cpu,cuda,tpu [--model=NAME] [--compile [--tpu_topologies=v4:1x1x1,...]]

JAX decides per platform what a step lowers to (`lax.platform_dependent`: models/ops.py
keeps its XLA:CPU rewrites to the CPU), so one trace of a step lowers to StableHLO for
`cpu`, `cuda`, `rocm` or `tpu` on any machine: `jax.jit(step).trace(*args)
.lower(lowering_platforms=(platform,))`. The steps are the trainer's (trainer/state.py's
train_step with the task's loss, the task's eval step, the config's model, optimizer,
normalization and on-device augmentation) on abstract arguments (jax.ShapeDtypeStruct,
jax.eval_shape): nothing the size of a model or a batch is allocated, and no data set needs
to be prepared. Batches are the config's global batch sizes on one device.

One JSON line per (step, platform): counts of StableHLO operations (`count_ops`).
--compile adds, per compile target, the per-device memory (compiled.memory_analysis: the
arguments, outputs and temporaries of one step) and XLA's FLOPs (cost_analysis): the
local backend compiles its own platform; TPUs compile ahead of time for the
`--tpu_topologies` (jax.experimental.topologies, which needs the `libtpu` wheel, not a
TPU) on one device of each. A target that cannot compile gets `compile_error`. On a machine
without TPUs: `pip install 'libtpu==0.0.42.*'` (the version jax[tpu] pins) and run with
JAX_PLATFORMS=cpu; compiling a paper model's train step for a TPU takes minutes of CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import re
import time
from typing import Any

from absl import logging
import jax
import ml_collections

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# One chip each: TPU v4 (two TensorCores, which JAX drives as one device) and v5e.
TPU_TOPOLOGIES = ("v4:1x1x1", "v5e:1x1")
_TOPOLOGY_CHIPS_PER_HOST = {"v4:1x1x1": (1, 1, 1), "v5e:1x1": (1, 1, 1)}

_CONVOLUTION = re.compile(r"stablehlo\.convolution\b[^\n]*")
_FEATURE_GROUPS = re.compile(r"feature_group_count = (\d+)")
_DOT = re.compile(r"stablehlo\.dot(_general)?\b")
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call\s*@([\w.$-]+)")
_HOST_TRANSFER = re.compile(r"stablehlo\.(send|recv)\b[^\n]*is_host_transfer = true")


def count_ops(stablehlo: str) -> dict[str, int]:
  """Operation counts of a StableHLO module's text: convolutions, the grouped ones among
  them (feature_group_count > 1: depthwise and grouped convolutions), dot products,
  custom calls, and host callbacks (custom calls into Python, host send/recv)."""
  convolutions = _CONVOLUTION.findall(stablehlo)
  groups = [int(m.group(1)) if (m := _FEATURE_GROUPS.search(c)) else 1 for c in convolutions]
  targets = _CUSTOM_CALL.findall(stablehlo)
  return {"convolution": len(convolutions), "grouped_convolution": sum(g > 1 for g in groups),
          "dot_general": len(_DOT.findall(stablehlo)), "custom_call": len(targets),
          "host_callback": (sum("callback" in t for t in targets)
                            + len(_HOST_TRANSFER.findall(stablehlo)))}


@dataclasses.dataclass(frozen=True)
class Step:
  """A jitted step of the trainer and the abstract arguments it is traced with."""
  name: str  # "train" | "eval"
  jitted: Callable
  args: tuple
  batch_size: int


def trainer_steps(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[list[Step], dict]:
  """The trainer's train and eval (validation) steps of `config` on abstract arguments,
  and what they were built for (model, input size, dtype). The data set need not be
  prepared: its builder states the example shapes."""
  from medbench_jax import config_checks
  from medbench_jax import tasks
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.trainer import optim
  from medbench_jax.trainer import state as state_lib
  from medbench_jax.trainer import trials

  config_checks.validate(config)
  builder = prepare.builder_for(config.dataset)
  info = sources.dataset_info(config.dataset, builder)
  task = tasks.for_dataset(config, info)
  size = trials.input_size(config, task, info.channels)
  model = state_lib.create_model(config, task.num_outputs)
  # The weights do not change what a step lowers to: random variables, as shapes only.
  random_init = config.copy_and_resolve_references()
  random_init.model.init = "random"
  total_steps = config.train.max_steps or 1000
  tx = optim.make_optimizer(config.optim, total_steps, steps_per_epoch=100)
  state = jax.eval_shape(lambda: state_lib.create_state(model, state_lib.init_variables(
      random_init, model, task.num_outputs, size, seed), tx))

  normalize = state_lib.normalizer(config)
  on_device = config.input.augment_on_device
  train_step = jax.jit(trials.train_step_fn(config, task, normalize, seed),
                       donate_argnums=(0,))
  eval_step = jax.jit(task.make_eval_step(model.apply, normalize))
  example = functools.partial(_example, config, builder, task.keys)
  train_batch = _batch(example("" if on_device else task.pp_train()),
                       config.input.batch_size)
  eval_batch = _batch(example(task.pp_eval(test=False)), config.input.eval_batch_size,
                      valid=True)
  steps = [Step("train", train_step, (state, train_batch), config.input.batch_size),
           Step("eval", eval_step, (state_lib.model_variables(state), eval_batch),
                config.input.eval_batch_size)]
  return steps, {"model": config.model.name, "image_size": size, "dtype": config.model.dtype,
                 "num_outputs": task.num_outputs, "task": task.name}


def _example(config: ml_collections.ConfigDict, builder: Any, keys: Sequence[str],
             pp_spec: str) -> dict[str, Any]:
  """One blank stored example (the builder's shapes, images at the configured size) after
  the preprocessing `pp_spec`: what a batch holds per example."""
  import numpy as np

  from medbench_jax.data import transforms

  features = builder.info.features
  blank = {key: np.zeros([config.dataset.image_size if d is None else d
                          for d in features[key].shape], features[key].np_dtype)
           for key in keys}
  return transforms.parse(pp_spec)(blank, np.random.default_rng(0))


def _batch(example: dict[str, Any], batch_size: int, valid: bool = False
           ) -> dict[str, jax.ShapeDtypeStruct]:
  batch = {key: jax.ShapeDtypeStruct((batch_size, *value.shape), value.dtype)
           for key, value in example.items()}
  if valid:  # evaluation batches mark their padding
    batch["valid"] = jax.ShapeDtypeStruct((batch_size,), bool)
  return batch


def _on_device(args: tuple, device: Any) -> tuple:
  """`args` (abstract) placed on one compile-only device."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      args)


def _compiled_figures(compiled: Any) -> dict[str, Any]:
  """Per-device memory of one step (MiB) and XLA's FLOPs of it, where the backend says."""
  from medbench_jax.benchmarks import train_speed

  memory = compiled.memory_analysis()
  figures = {"flops": train_speed._flops(compiled)}
  if memory is not None:
    mib = {name: getattr(memory, f"{name}_size_in_bytes") / 2**20
           for name in ("argument", "output", "temp", "alias", "generated_code")}
    figures.update({f"{name}_mb": round(value, 1) for name, value in mib.items()})
    # Donated arguments alias outputs: counted once.
    figures["total_mb"] = round(mib["argument"] + mib["output"] - mib["alias"] + mib["temp"], 1)
  return figures


def _tpu_devices(topologies: Sequence[str]) -> dict[str, Any]:
  """topology name -> its first compile-only device, or the error that prevented it."""
  from jax.experimental import topologies as topologies_lib

  devices = {}
  for name in topologies:
    try:
      kw = {}
      if name in _TOPOLOGY_CHIPS_PER_HOST:
        kw["chips_per_host_bounds"] = _TOPOLOGY_CHIPS_PER_HOST[name]
      devices[name] = topologies_lib.get_topology_desc(name, "tpu", **kw).devices[0]
    except Exception as e:  # reported per target, never fatal
      devices[name] = e
  return devices


def _compile(step: Step, platform: str, lowered: Any, tpu_devices: dict[str, Any]
             ) -> list[dict[str, Any]]:
  """Compile targets of `platform`: the local backend's own platform, TPU topologies."""
  local = jax.default_backend()
  local = "cuda" if local == "gpu" else local
  targets = []
  if platform == local:
    start = time.perf_counter()
    compiled = lowered.compile()
    targets.append({"target": jax.devices()[0].device_kind,
                    "compile_s": round(time.perf_counter() - start, 1),
                    **_compiled_figures(compiled)})
  elif platform == "tpu":
    for topology, device in tpu_devices.items():
      target = {"target": topology}
      if isinstance(device, Exception):
        target["compile_error"] = f"{type(device).__name__}: {device}"
      else:
        try:
          start = time.perf_counter()
          compiled = step.jitted.trace(*_on_device(step.args, device)).lower().compile()
          target.update({"target": f"{device.device_kind} ({topology})",
                         "compile_s": round(time.perf_counter() - start, 1),
                         **_compiled_figures(compiled)})
        except Exception as e:  # reported per target, never fatal
          target["compile_error"] = f"{type(e).__name__}: {e}"
      # Minutes each on a CPU: progress before the JSON lines, which come at the end.
      logging.info("%s step for %s: %s", step.name, topology, target)
      targets.append(target)
  else:
    targets.append({"target": platform, "compile_error": (
        f"no {platform} backend here (this one is {local}) and no ahead-of-time "
        "topology for it: compile on a machine that has one")})
  return targets


def bench_lower(config: ml_collections.ConfigDict, platforms: Sequence[str],
                compile_steps: bool = False,
                tpu_topologies: Sequence[str] = TPU_TOPOLOGIES) -> list[dict[str, Any]]:
  """One record per (step, platform) of the trainer's steps for `config` (module
  docstring)."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown:
    raise ValueError(f"--platforms: unknown {unknown}; allowed: {PLATFORMS}")
  steps, built = trainer_steps(config)
  tpu_devices = (_tpu_devices(tpu_topologies) if compile_steps and "tpu" in platforms
                 and jax.default_backend() != "tpu" else {})
  lines = []
  for step in steps:
    start = time.perf_counter()
    traced = step.jitted.trace(*step.args)
    trace_s = time.perf_counter() - start
    for platform in platforms:
      start = time.perf_counter()
      lowered = traced.lower(lowering_platforms=(platform,))
      line = {"bench": "lower", **built, "step": step.name, "platform": platform,
              "batch_size": step.batch_size, **count_ops(lowered.as_text()),
              "trace_s": round(trace_s, 1),
              "lower_s": round(time.perf_counter() - start, 1)}
      if compile_steps:
        line["compiled"] = _compile(step, platform, lowered, tpu_devices)
      lines.append(line)
  return lines
