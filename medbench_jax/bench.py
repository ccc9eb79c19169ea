r"""Benchmarks that print figures (JSON lines), never pass/fail.

  python -m medbench_jax.bench input --config=configs/swin.py [--steps=N]

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

The `train` benchmark is not implemented.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import pathlib
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

BENCHMARKS = ("input",)


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


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(
        f"Usage: python -m medbench_jax.bench {{{','.join(BENCHMARKS)}}} --config=FILE "
        "[--steps=N]. Only `input` is implemented (`train` is not).")
  runtime.start()
  config_name = config_flags.get_config_filename(flags.FLAGS["config"])
  for line in bench_input(_CONFIG.value, config_name, steps=_STEPS.value,
                          warmup=_WARMUP.value, torch_ref=_TORCH.value):
    logging.info("%s", line)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
