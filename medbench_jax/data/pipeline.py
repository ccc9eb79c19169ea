"""grain input pipelines over a random-access source (a TFDS ArrayRecord data source).

Train: global seeded shuffle -> this process's slice -> per-example seeded
augmentation -> infinite repeat (reshuffled every epoch) -> batch -> worker processes.
Every stage is index-based, so the iterator state is a few integers that the
checkpoint stores, and a resumed run sees exactly the batches it would have seen.

Eval: every example exactly once, split across processes, padded to whole batches;
`valid` marks the real examples so padding never reaches a metric.

A source with an `uncertain_draw` (sources.Subset under an LSR policy drawn per
read) has its examples' uncertain labels drawn here, before the preprocessing ops,
with the same per-example generator: in training a new draw at every read (grain
derives the generator from the seed and the read's position, so a resumed run draws
what it would have drawn); in evaluation one draw per example and `seed` (the
trainer passes the step, so every validation draws anew).

Batches hold exactly the example keys a task asks for (`keys`: e.g. image and labels
for classification, image and mask for segmentation), as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from medbench_jax.data import transforms


def exit_with_parent(trainer_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker init (bound to the trainer's pid): end this worker once the trainer is
  gone, and only then.

  grain's worker processes block on their output queue forever after a SIGKILLed trainer
  (a preempted job, `kill -9`), so each one watches for being re-parented. The pid is
  bound in the trainer, not read here: a trainer killed while the worker still imports
  has already re-parented it.
  """
  del worker_index, worker_count
  # Preemption signals reach the whole process group (SLURM's SIGTERM, a terminal's
  # Ctrl-C): the trainer saves at its next step boundary, so its workers keep serving
  # it until it is gone.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)

  def watch() -> None:
    while os.getppid() == trainer_pid:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _select(example: dict[str, Any], keys: Sequence[str]) -> dict[str, np.ndarray]:
  missing = [key for key in keys if key not in example]
  if missing:
    raise KeyError(f"Examples have no {missing}; they have {sorted(example)}")
  return {key: np.asarray(example[key]) for key in keys}


LabelDraw = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


def _label_draw(source: Sequence[dict]) -> LabelDraw | None:
  return getattr(source, "uncertain_draw", None)


@dataclasses.dataclass
class TrainPreprocess:
  """A training example's preprocessing on the host, run inside grain workers
  (picklable): the label draw (if any), the spec's host ops, then `keys`."""
  pp_spec: str
  keys: tuple[str, ...]
  label_draw: LabelDraw | None = None

  def __post_init__(self):
    self._op = transforms.parse(self.pp_spec)

  def __getstate__(self):
    return {"pp_spec": self.pp_spec, "keys": self.keys, "label_draw": self.label_draw}

  def __setstate__(self, state):
    self.__init__(**state)

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.label_draw is not None:
      example = self.label_draw(example, rng)
    return _select(self._op(example, rng), self.keys)


def train_dataset(source: Sequence[dict], *, pp_spec: str, keys: Sequence[str],
                  local_batch_size: int, seed: int, num_workers: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Infinite shuffled, augmented batches of this process's share of `source`."""
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds[process_index::process_count]
  ds = ds.random_map(TrainPreprocess(pp_spec, tuple(keys), _label_draw(source)),
                     seed=seed + 1)
  ds = ds.repeat().batch(local_batch_size, drop_remainder=True)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
        worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
  return iter_ds


@dataclasses.dataclass
class PaddedEvalExample:
  """Maps a local padded index to this process's share of the source.

  Process p gets source indices p, p + P, p + 2P, ...; beyond its share it returns
  example 0 with valid=False so every process runs the same number of batches.
  Labels drawn per read come from a generator of (seed, source index).
  """
  source: Sequence[dict]
  pp_spec: str
  keys: tuple[str, ...]
  process_index: int
  process_count: int
  seed: int = 0

  def __post_init__(self):
    self._op = transforms.parse(self.pp_spec)
    self._label_draw = _label_draw(self.source)

  def __getstate__(self):
    return {k: getattr(self, k) for k in
            ("source", "pp_spec", "keys", "process_index", "process_count", "seed")}

  def __setstate__(self, state):
    self.__init__(**state)

  def __call__(self, local_index: int) -> dict[str, Any]:
    index = self.process_index + local_index * self.process_count
    valid = index < len(self.source)
    example = self.source[index if valid else 0]
    # Eval ops are deterministic; the generator serves the label draw only.
    rng = np.random.default_rng((self.seed, index))
    if self._label_draw is not None:
      example = self._label_draw(example, rng)
    out = _select(self._op(example, rng), self.keys)
    return {**out, "valid": np.bool_(valid)}


def eval_batches_per_process(num_examples: int, local_batch_size: int,
                             process_count: int) -> int:
  return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)


def eval_dataset(source: Sequence[dict], *, pp_spec: str, keys: Sequence[str],
                 local_batch_size: int, num_threads: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0) -> grain.IterDataset:
  """Every example of `source` once, over all processes, in padded batches (+ "valid").

  seed: of the labels drawn per read (a source with an uncertain_draw), e.g. the step.
  Read by threads of the trainer's own process, not worker processes: evaluation runs many
  times per trial, and its deterministic decode and resize release the GIL (OpenCV, numpy),
  so threads keep up without a fresh set of processes (and their start-up) at every run.
  """
  num_batches = eval_batches_per_process(len(source), local_batch_size, process_count)
  ds = grain.MapDataset.range(num_batches * local_batch_size).map(
      PaddedEvalExample(source, pp_spec, tuple(keys), process_index, process_count, seed))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                              prefetch_buffer_size=2 * local_batch_size))


def iterate(ds: grain.IterDataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a finite dataset and stops its readers afterwards, even when left early."""
  iterator = iter(ds)
  try:
    yield from iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def normalize(images: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
  """uint8 (..., H, W, 1) grayscale -> float32 (..., H, W, 3) normalized like the source.

  Runs on the accelerator: the host ships one uint8 channel (12x fewer bytes than
  float32 RGB) and the pretrained models still see the 3 channels they expect.
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
