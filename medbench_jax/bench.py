r"""Benchmarks that print figures (JSON lines), never pass/fail.

  python -m medbench_jax.bench input --config=configs/swin.py [--steps=N]
  python -m medbench_jax.bench soak --config=configs/swin.py --workdir=DIR \
      [--steps=5000] [--eval_every=50] [--sample_every=5] [--warmup_steps=N]

`input`: images/s of the training input pipeline (pipeline.train_dataset over the
prepared data set of the config: for the default config the phantom set, generated
and prepared on first use), batch size and grain workers from the config. Beside it,
unless --notorch_reference, the same figure for the reference code's pipeline: a
PyTorch DataLoader decoding the original PNGs every step (PIL, RGB,
RandomResizedCrop, flip, rotation 7, ToTensor, Normalize), same batch size, worker
count and output size (data sets whose examples are image files; not MedMNIST's
arrays). Ours ships uint8 one-channel crops (normalisation and the
RGB broadcast run on the accelerator); the reference ships float32 RGB tensors:
each is measured as the training loop consumes it.

`soak`: a long run of `python -m medbench_jax.main` (`--steps` steps, evaluating and
checkpointing every `--eval_every`, no early stopping), watched from outside through
/proc (Linux) every `--sample_every` seconds: resident memory of the trainer and of
it with its worker processes, its open files, its child processes, the size of the
trial's checkpoint folder. It prints the figures after warm-up (`--warmup_steps`,
default a tenth of the run) and at the end of training, and writes every sample to
DIR/soak_samples.jsonl. A loop that leaks shows as memory, files or processes growing
with the step count; checkpoint retention as a folder that stays the size of one
`latest` and one `best`.

The `train` benchmark is not implemented.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from medbench_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin.py", "Config file, optionally with an arg: FILE:ARG.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed batches per pipeline.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 5, "Batches before timing starts (worker start-up is not throughput).")
_TORCH = flags.DEFINE_bool("torch_reference", True,
                           "Also measure the PyTorch reference pipeline.")
_WORKDIR = flags.DEFINE_string("workdir", None, "soak: the run's workdir (must not exist).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "soak: steps between evaluations.")
_SAMPLE_EVERY = flags.DEFINE_float("sample_every", 5.0, "soak: seconds between samples.")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", None, "soak: steps before the first figures (default: a tenth of --steps).")

BENCHMARKS = ("input", "soak")


def images_per_s(batches: Iterator[Any], *, steps: int, warmup: int, batch_size: int) -> float:
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch_size / (time.perf_counter() - start)


class PngDataset:
  """The reference code's map-style dataset: open, convert to RGB, transform."""

  def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Callable):
    self.paths, self.labels, self.transform = list(paths), labels, transform

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.paths[i]) as image:
      return self.transform(image.convert("RGB")), self.labels[i]


def torch_reference(paths: Sequence[str], labels: np.ndarray, *, crop: int,
                    batch_size: int, workers: int, mean: Sequence[float],
                    std: Sequence[float], steps: int, warmup: int) -> float:
  """images/s of the PyTorch reference pipeline (torch is imported only here)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  transform = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(),
                         T.RandomRotation(7), T.ToTensor(), T.Normalize(mean, std)])
  loader = torch.utils.data.DataLoader(
      PngDataset(paths, labels, transform), batch_size=batch_size, shuffle=True,
      num_workers=workers, drop_last=True)
  # Epoch after epoch, as a training loop would run it.
  batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
  return images_per_s(batches, steps=steps, warmup=warmup, batch_size=batch_size)


def bench_input(config, config_name: str, *, steps: int, warmup: int,
                torch_ref: bool) -> list[dict[str, Any]]:
  from medbench_jax import config_lib  # pylint: disable=g-import-not-at-top
  from medbench_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from medbench_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from medbench_jax.data import sources  # pylint: disable=g-import-not-at-top
  from medbench_jax.data.prepare.errors import Problems  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  # TFDS reports preparation progress on stdout, which is kept for the JSON lines.
  with contextlib.redirect_stdout(sys.stderr):
    builder = prepare.prepare_dataset(config.dataset)
    splits = sources.open_splits(config.dataset)
  batch_size, workers = config.input.batch_size, config.input.num_workers
  ds = pipeline.train_dataset(splits.train, pp_spec=config.input.pp_train,
                              keys=("image", "labels"), local_batch_size=batch_size, seed=0,
                              num_workers=workers)
  iterator = iter(ds)
  crop = next(iterator)["image"].shape[1]
  try:
    ours = images_per_s(iterator, steps=steps, warmup=warmup, batch_size=batch_size)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
  common = {"config": config_name, "workers": workers, "batch_size": batch_size,
            "crop_size": crop, "steps": steps}
  results = [{"bench": "input", "images_per_s": round(ours, 1), **common}]
  if torch_ref:
    problems = Problems()
    records = builder.read_records(
        pathlib.Path(prepare.manual_dir_for(config.dataset)), problems)["train"]
    problems.check(skip_bad=True)
    mean, std = config_lib.NORMALIZATIONS[config.input.normalization]
    # In a fresh process, as the reference code runs: importing torchvision next to
    # TensorFlow can crash (their LLVM copies clash), and nothing of ours is loaded.
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")) as pool:
      theirs = pool.submit(
          torch_reference, [r.path for r in records], np.stack([r.labels for r in records]),
          crop=crop, batch_size=batch_size, workers=workers, mean=mean, std=std,
          steps=steps, warmup=warmup).result()
    results.append({"bench": "input_torch_reference", "images_per_s": round(theirs, 1),
                    **common})
    results[0]["speedup_vs_torch_reference"] = round(ours / theirs, 2)
  return results


# ---------------------------------------------------------------- soak


def _proc_status_kb(pid: int, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _descendants(pid: int) -> list[int]:
  """Every process below `pid` (children, grandchildren, ...), from /proc."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        # The command name, in parentheses, may hold spaces: fields follow its ')'.
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue  # ended meanwhile
    children.setdefault(ppid, []).append(int(entry))
  found, pending = [], [pid]
  while pending:
    for child in children.get(pending.pop(), []):
      found.append(child)
      pending.append(child)
  return found


def _folder_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except OSError:
        pass  # deleted meanwhile (retention)
  return total


def soak_sample(pid: int, ckpt_dir: str) -> dict[str, Any]:
  """One look at a running trainer from outside (memory in MiB, folder in bytes)."""
  family = _descendants(pid)
  rss = {}
  for p in [pid, *family]:
    try:
      rss[p] = _proc_status_kb(p, "VmRSS") / 1024
    except OSError:
      rss[p] = 0.0
  folders = {kind: sorted(os.listdir(os.path.join(ckpt_dir, kind)))
             if os.path.isdir(os.path.join(ckpt_dir, kind)) else []
             for kind in ("latest", "best")}
  return {"rss_mb": round(rss[pid], 1), "rss_with_children_mb": round(sum(rss.values()), 1),
          "open_files": len(os.listdir(f"/proc/{pid}/fd")),
          "child_processes": len(family), "ckpt_bytes": _folder_bytes(ckpt_dir),
          "ckpt_entries": sum(len(v) for v in folders.values())}


def bench_soak(config_file: str, workdir: str, *, steps: int, eval_every: int,
               warmup: int, sample_every_s: float) -> dict[str, Any]:
  """Runs main for `steps` steps in a child process, sampling it (module docstring)."""
  if os.path.exists(workdir):
    raise app.UsageError(f"--workdir={workdir} exists: the soak needs a fresh run.")
  os.makedirs(workdir)
  overrides = {"train.max_steps": steps, "train.num_epochs": steps,
               "train.eval_every_steps": eval_every, "train.patience": steps,
               "train.log_every_steps": min(eval_every, 50)}
  command = [sys.executable, "-u", "-m", "medbench_jax.main", f"--config={config_file}",
             f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  log_path = os.path.join(workdir, "soak_main.log")
  ckpt_dir = os.path.join(workdir, "trial_0", "ckpt")
  samples: list[dict[str, Any]] = []
  start = time.perf_counter()
  with open(log_path, "w") as log, open(log_path) as reader:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    step, training = 0, True
    with open(os.path.join(workdir, "soak_samples.jsonl"), "w") as out:
      while proc.poll() is None:
        time.sleep(sample_every_s)
        for line in reader.readlines():
          if found := re.search(r"\] step (\d+)/\d+ ", line):
            step = int(found.group(1))
          training = training and "] test (best step" not in line
        try:
          sample = {"t_s": round(time.perf_counter() - start, 1), "step": step,
                    "training": training, **soak_sample(proc.pid, ckpt_dir)}
        except OSError:
          break  # the trainer ended between poll and sample
        if proc.poll() is not None:
          break  # ended while sampled: an exited process shows no memory
        samples.append(sample)
        out.write(json.dumps(sample) + "\n")
        out.flush()
  if proc.wait():
    raise RuntimeError(f"The soak run failed (exit status {proc.returncode}); see {log_path}")
  trained = [s for s in samples if s["training"] and s["step"] >= warmup]
  if len(trained) < 2:
    raise RuntimeError(f"Too few samples after warm-up ({len(trained)}): lower --warmup or "
                       "--sample_every.")
  first, last = trained[0], trained[-1]
  peak = max(s["rss_mb"] for s in trained)
  return {
      "bench": "soak", "config": config_file, "steps": steps, "eval_every": eval_every,
      "evaluations": steps // eval_every, "wall_s": round(time.perf_counter() - start, 1),
      "samples": len(samples), "warmup_step": first["step"], "end_step": last["step"],
      "rss_mb_warmup": first["rss_mb"], "rss_mb_end": last["rss_mb"], "rss_mb_peak": peak,
      "rss_growth_pct": round(100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"], 2),
      "rss_with_children_mb_warmup": first["rss_with_children_mb"],
      "rss_with_children_mb_end": last["rss_with_children_mb"],
      "open_files_range": [min(s["open_files"] for s in trained),
                           max(s["open_files"] for s in trained)],
      "child_processes_range": [min(s["child_processes"] for s in trained),
                                max(s["child_processes"] for s in trained)],
      "ckpt_mb_range": [round(min(s["ckpt_bytes"] for s in trained) / 2**20, 2),
                        round(max(s["ckpt_bytes"] for s in trained) / 2**20, 2)],
      "ckpt_entries_max": max(s["ckpt_entries"] for s in trained),
  }


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(
        f"Usage: python -m medbench_jax.bench {{{','.join(BENCHMARKS)}}} --config=FILE "
        "[--steps=N]. `train` is not implemented.")
  config_name = config_flags.get_config_filename(flags.FLAGS["config"])
  if argv[1] == "soak":
    if not _WORKDIR.value:
      raise app.UsageError("soak needs --workdir (a folder that does not exist yet).")
    line = bench_soak(config_name, _WORKDIR.value, steps=_STEPS.value,
                      eval_every=_EVAL_EVERY.value,
                      warmup=(_WARMUP_STEPS.value if _WARMUP_STEPS.value is not None
                              else _STEPS.value // 10), sample_every_s=_SAMPLE_EVERY.value)
    print(json.dumps(line), flush=True)
    return
  runtime.start()
  for line in bench_input(_CONFIG.value, config_name, steps=_STEPS.value,
                          warmup=_WARMUP.value, torch_ref=_TORCH.value):
    logging.info("%s", line)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
