"""Decoding every image once, in a process pool, into a scratch file of fixed-size slots.

A builder's `Decoder` turns a `Record` into the uint8 array kept for it; the pool
writes slot i of the scratch file for record i, so the builder later streams the
good slots into ArrayRecords in record order without holding the data set in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import pathlib

from absl import logging
import cv2
import numpy as np

from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.images import read_image
from medbench_jax.data.prepare.images import to_stored
from medbench_jax.data.prepare.parsing import Record

# Starting a worker process costs about a second: below this many images the
# preparation decodes in-process.
POOL_MIN_RECORDS = 512


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Record -> the fixed-shape uint8 array kept for it; runs in pool workers.

  Must be picklable (a dataclass of plain fields with a module-level class). Raise
  DataFormatError for a bad example: its message joins the report. Segmentation
  builders return image and mask channels together and check their sizes here.
  """
  size: int
  channels: int = 1

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.size, self.size, self.channels)

  def __call__(self, record: Record) -> np.ndarray:
    return to_stored(read_image(record.path), self.size, self.channels)


def default_workers() -> int:
  return len(os.sched_getaffinity(0))


def worker_init() -> None:
  """Initialiser of every image-decoding process pool (staging, phantom generation)."""
  # One process per core already; cv2's own threads would oversubscribe.
  cv2.setNumThreads(1)


def _stage_chunk(decoder: Decoder, scratch: str, items: list[tuple[int, Record]]
                 ) -> list[tuple[int, str]]:
  """Decodes records into their slots of the scratch file; returns (slot, error)s."""
  nbytes = math.prod(decoder.shape)
  errors = []
  fd = os.open(scratch, os.O_WRONLY)
  try:
    for slot, record in items:
      try:
        array = np.ascontiguousarray(decoder(record), np.uint8)
        if array.shape != decoder.shape:
          raise DataFormatError(f"decoded to shape {array.shape}, expected {decoder.shape}")
      except DataFormatError as e:
        errors.append((slot, str(e)))
        continue
      except Exception as e:  # pylint: disable=broad-except
        # A decoder library failing on a file is a data problem of that file.
        errors.append((slot, f"cannot decode {record.path}: {type(e).__name__}: {e}"))
        continue
      os.pwrite(fd, array.tobytes(), slot * nbytes)
  finally:
    os.close(fd)
  return errors


def stage_records(records: Sequence[Record], decoder: Decoder, scratch: pathlib.Path,
                  split: str, problems: Problems, workers: int) -> None:
  """Decodes every record into `scratch` (slot i = record i) in a process pool."""
  nbytes = math.prod(decoder.shape)
  with open(scratch, "wb") as f:
    f.truncate(len(records) * nbytes)
  items = list(enumerate(records))
  chunk = max(1, min(256, math.ceil(len(items) / (4 * max(workers, 1)))))
  chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
  pool = None
  if workers <= 1 or len(chunks) <= 1 or len(records) < POOL_MIN_RECORDS:
    results: Iterable[list[tuple[int, str]]] = (
        _stage_chunk(decoder, str(scratch), c) for c in chunks)
  else:
    # spawn, not fork: the parent may already run TF/JAX threads, which fork breaks.
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
        initializer=worker_init)
    results = pool.map(_stage_chunk, [decoder] * len(chunks), [str(scratch)] * len(chunks),
                       chunks)
  try:
    for i, errors in enumerate(results, start=1):
      for slot, error in errors:
        problems.add(split, records[slot].where, error)
      if i % max(1, len(chunks) // 10) == 0:
        logging.info("%s: decoded %d/%d images", split, min(i * chunk, len(items)),
                     len(items))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)


def read_scratch(scratch: pathlib.Path, shape: tuple[int, ...], slots: Sequence[int]
                 ) -> Iterator[np.ndarray]:
  nbytes = math.prod(shape)
  with open(scratch, "rb") as f:
    for slot in slots:
      f.seek(slot * nbytes)
      yield np.frombuffer(f.read(nbytes), np.uint8).reshape(shape)
