r"""Benchmarks that print figures (JSON lines, and a table on stderr), never pass/fail.

  python -m medbench_jax.bench input --config=configs/swin.py [--steps=N]
  python -m medbench_jax.bench train --config=configs/swin.py[:ARGS] [--real_input] \
      [--peak_tflops=T] [--steps=N] [--compare_torch [--torch_compile]] \
      [--compilation_cache=DIR]
  python -m medbench_jax.bench train --model=resnet50 --batch=16 --image_size=224 \
      [--dtype=bfloat16] [...]
  python -m medbench_jax.bench eval --config=FILE [--ten_crop] [...]
  python -m medbench_jax.bench soak --config=configs/swin.py --workdir=DIR \
      [--steps=5000] [--eval_every=50] [--sample_every=5] [--warmup_steps=N]
  python -m medbench_jax.bench lower --config=FILE[:ARG] --platforms=cpu,cuda,tpu \
      [--model=NAME] [--compile [--tpu_topologies=v4:1x1x1,v5e:1x1]]

`input`: images/s of the training input pipeline (pipeline.train_dataset over the
prepared data set of the config: for the default config the phantom set, generated
and prepared on first use), batch size and grain workers from the config. Beside it,
unless --notorch_reference, the same figure for the reference code's pipeline: a
PyTorch DataLoader decoding the original PNGs every step (PIL, RGB,
RandomResizedCrop, flip, rotation 7, ToTensor, Normalize), same batch size, worker
count and output size (data sets whose examples are image files; not MedMNIST's
arrays). Ours ships uint8 one-channel crops (normalization and the
RGB broadcast run on the accelerator); the reference ships float32 RGB tensors:
each is measured as the training loop consumes it.

`train`: our model's jitted fine-tuning step on random data (train mode, BCE, Adam):
the first step (tracing + compilation + run), the median step time over --steps,
images/s, the step's FLOPs by XLA's cost analysis (flops_per_step) and, given the
device's --peak_tflops, the model FLOPs utilisation (mfu = flops_per_step / step_s /
peak), peak host memory and, where the device reports it (GPU, TPU), peak device memory.
`eval`: the same for the evaluation step (inference forward and sigmoid; with
--ten_crop ten crops per image, probabilities averaged).
With --config the model, batch size (eval: the eval batch size), input size (what the
config's eval preprocessing makes, as the trainer sizes the model), dtype, head size and
model keyword arguments are the config's; --model, --batch, --image_size and --dtype
given on the command line override them (another model than the config's is built
with its defaults). Without --config: ChestX-ray14's 14 labels and the flags' values.
--real_input (train, with --config) feeds the step from the config's training
pipeline over its prepared data set (prepared on first use), timed as the trainer
times it: steps dispatched without waiting for the previous one, step_s the mean, and
input_wait the fraction of the wall time spent waiting for the next batch (null on
random data).
--compare_torch measures timm's model of the same name in a fresh process (eager, and
with --torch_compile also through torch.compile). --compilation_cache=DIR uses JAX's
persistent compilation cache there: run twice to see the first step of a cached run.
See medbench_jax.benchmarks.train_speed. Our lines are also appended to
CACHE_DIR/bench/<device kind>.jsonl, where `sweep --dry_run` finds step times.
`lower`: the trainer's train and eval steps of the config (--model: another model, with
its defaults) lowered for each of --platforms without their devices, one JSON line per
(step, platform) with counts of StableHLO operations (convolution, grouped_convolution,
dot_general, custom_call, host_callback): which kernels each platform gets. --compile adds
per-device memory and FLOPs of each step compiled for the local backend and, ahead of
time through the libtpu wheel, for the TPU chips of --tpu_topologies.
See medbench_jax.benchmarks.lower.
`soak`: a long run of `python -m medbench_jax.main` (`--steps` steps, evaluating and
checkpointing every `--eval_every`, no early stopping), watched from outside through
/proc (Linux) every `--sample_every` seconds: resident memory of the trainer and of
it with its worker processes, its open files, its child processes, the size of the
trial's checkpoint folder. It prints the figures after warm-up (`--warmup_steps`,
default a tenth of the run) and at the end of training, and writes every sample to
DIR/soak_samples.jsonl. A loop that leaks shows as memory, files or processes growing
with the step count; checkpoint retention as a folder that stays the size of one
`latest` and one `best`.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from medbench_jax import runtime
from medbench_jax.benchmarks import input_speed
from medbench_jax.benchmarks import train_speed

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin.py", "Config file, optionally with an arg: FILE:ARG.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Timed batches per pipeline (input, default 50), timed steps after the "
    "first (train/eval, default 5) or training steps (soak, default 5000).")
_WARMUP = flags.DEFINE_integer(
    "warmup", 5, "Batches before timing starts (worker start-up is not throughput).")
_TORCH = flags.DEFINE_bool("torch_reference", True,
                           "Also measure the PyTorch reference pipeline.")
_WORKDIR = flags.DEFINE_string("workdir", None, "soak: the run's workdir (must not exist).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "soak: steps between evaluations.")
_SAMPLE_EVERY = flags.DEFINE_float("sample_every", 5.0, "soak: seconds between samples.")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", None, "soak: steps before the first figures (default: a tenth of --steps).")

_MODEL = flags.DEFINE_string(
    "model", "resnet50", "train/eval: model name (timm's); overrides the --config's.")
_BATCH = flags.DEFINE_integer("batch", 16,
                              "train/eval: images per step; overrides the --config's.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "train/eval: square input size; overrides the --config's.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ("float32", "bfloat16"),
    "train/eval: compute dtype (parameters stay float32); overrides the --config's.")
_REAL_INPUT = flags.DEFINE_bool(
    "real_input", False, "train with --config: feed the step from the config's training "
    "pipeline (and report input_wait) instead of random batches.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "train/eval: the device's peak TFLOP/s at --dtype, for mfu "
    "(model FLOPs utilisation); unset: mfu is null.")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False,
                                   "train/eval: also measure timm's model in PyTorch.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False,
                                   "train/eval with --compare_torch: also torch.compile.")
_TEN_CROP = flags.DEFINE_bool("ten_crop", False, "eval: ten crops per image.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "train/eval: JAX persistent compilation cache directory.")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                               "lower: the platforms to lower the steps for.")
_COMPILE = flags.DEFINE_bool(
    "compile", False, "lower: also compile, for the local backend and the TPU topologies, "
    "and report per-device memory and FLOPs.")
_TPU_TOPOLOGIES = flags.DEFINE_list(
    "tpu_topologies", ["v4:1x1x1", "v5e:1x1"],
    "lower --compile: TPU topologies compiled for ahead of time (needs the libtpu wheel).")

BENCHMARKS = ("input", "train", "eval", "lower", "soak")
_DEFAULT_STEPS = {"input": 50, "train": 5, "eval": 5, "soak": 5000}
_TABLE_KEYS = ("framework", "first_step_s", "compile_s", "step_s", "images_per_s",
               "input_wait", "mfu", "peak_rss_mb", "peak_device_memory_mb",
               "speed_vs_torch", "speed_vs_torch_compile")


def format_table(lines: Sequence[dict[str, Any]]) -> str:
  """Fixed-width table of the figures that compare frameworks (a blank where missing)."""
  header = [key for key in _TABLE_KEYS if any(key in line for line in lines)]
  rows = [header] + [[_cell(line.get(key)) for key in header] for line in lines]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths))
                   for row in rows)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def _step_arguments(benchmark: str) -> dict[str, Any]:
  """bench_step's model and input arguments: the --config's where given, the flags given
  on the command line over them; without --config the flags (and their defaults)."""
  overrides = {"model": _MODEL, "batch_size": _BATCH, "image_size": _IMAGE_SIZE,
               "dtype": _DTYPE}
  with_config = flags.FLAGS["config"].present
  if _REAL_INPUT.value and (benchmark != "train" or not with_config):
    raise app.UsageError("--real_input feeds the train step from a config's pipeline: "
                         "bench train --config=FILE --real_input.")
  if _REAL_INPUT.value and _IMAGE_SIZE.present:
    raise app.UsageError("--image_size does not apply with --real_input: the pipeline's "
                         "crop sets it.")
  if not with_config:
    return {key: flag.value for key, flag in overrides.items()}
  arguments = train_speed.step_settings(_CONFIG.value, benchmark)
  arguments.update({key: flag.value for key, flag in overrides.items() if flag.present})
  if arguments["model"] != _CONFIG.value.model.name:
    # The config's model.kw (sizes, drop rates) belong to its model, not to another.
    arguments["model_kw"] = {}
  if _REAL_INPUT.value:
    arguments["input_config"] = _CONFIG.value
  return arguments


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(
        f"Usage: python -m medbench_jax.bench {{{','.join(BENCHMARKS)}}} [flags]: input "
        "--config=FILE [--steps=N]; train|eval [--config=FILE[:ARGS] [--real_input "
        "(train)]] [--model=NAME] [--batch=B] [--image_size=S] [--dtype=bfloat16] "
        "[--steps=N] [--peak_tflops=T] [--compare_torch [--torch_compile]] "
        "[--ten_crop (eval)] [--compilation_cache=DIR]; lower --config=FILE[:ARG] "
        "[--platforms=cpu,cuda,tpu] [--model=NAME] [--compile]; soak --config=FILE "
        "--workdir=DIR [--steps=5000] [--eval_every=50].")
  benchmark = argv[1]
  steps = _STEPS.value or _DEFAULT_STEPS.get(benchmark)
  config_name = config_flags.get_config_filename(flags.FLAGS["config"])
  if benchmark == "soak":
    from medbench_jax.benchmarks import soak
    if not _WORKDIR.value:
      raise app.UsageError("soak needs --workdir (a folder that does not exist yet).")
    lines = [soak.bench_soak(
        config_name, _WORKDIR.value, steps=steps, eval_every=_EVAL_EVERY.value,
        sample_every_s=_SAMPLE_EVERY.value,
        warmup=_WARMUP_STEPS.value if _WARMUP_STEPS.value is not None else steps // 10)]
  elif benchmark == "lower":
    from medbench_jax.benchmarks import lower
    runtime.start()
    config = _CONFIG.value
    if _MODEL.present and _MODEL.value != config.model.name:
      # The config's model.kw (sizes, drop rates) belong to its model, not to another.
      config.model.name, config.model.kw = _MODEL.value, {}
    lines = lower.bench_lower(config, _PLATFORMS.value, compile_steps=_COMPILE.value,
                              tpu_topologies=_TPU_TOPOLOGIES.value)
    for line in lines:
      line["config"] = config_name
  elif benchmark == "input":
    runtime.start()
    lines = input_speed.bench_input(_CONFIG.value, config_name, steps=steps, warmup=_WARMUP.value,
                        torch_ref=_TORCH.value)
  else:
    runtime.start()
    lines = train_speed.bench_step(benchmark, steps=steps, compare_torch=_COMPARE_TORCH.value,
                       torch_compile=_TORCH_COMPILE.value, ten_crop=_TEN_CROP.value,
                       compilation_cache=_COMPILATION_CACHE.value,
                       peak_tflops=_PEAK_TFLOPS.value, **_step_arguments(benchmark))
    if flags.FLAGS["config"].present:
      for line in lines:
        line["config"] = config_name
    print(format_table(lines), file=sys.stderr, flush=True)
    for line in lines:  # the sweep planner's step times, per device kind
      train_speed.record(line)
  for line in lines:
    logging.info("%s", line)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
