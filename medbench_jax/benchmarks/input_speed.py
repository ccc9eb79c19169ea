"""images/s of the training input pipeline, and of the reference code's PyTorch pipeline
beside it (`python -m medbench_jax.bench input`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import pathlib
import sys
import time
from typing import Any

import numpy as np


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
    from PIL import Image
    with Image.open(self.paths[i]) as image:
      return self.transform(image.convert("RGB")), self.labels[i]


def torch_reference(paths: Sequence[str], labels: np.ndarray, *, crop: int,
                    batch_size: int, workers: int, mean: Sequence[float],
                    std: Sequence[float], steps: int, warmup: int) -> float:
  """images/s of the PyTorch reference pipeline (torch is imported only here)."""
  import torch
  from torchvision import transforms as T
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
  from medbench_jax import config_checks
  from medbench_jax import config_lib
  from medbench_jax.data import pipeline
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.data.prepare.errors import Problems

  config_checks.validate(config)
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
