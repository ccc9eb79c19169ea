"""Random-access split sources for a run: prepare once, then read ArrayRecords."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from medbench_jax import config_lib
from medbench_jax.data import builders
from medbench_jax.data import phantom


@dataclasses.dataclass
class Subset(Sequence):
  """A fixed subset of a random-access source (picklable for grain workers)."""
  source: Sequence[dict]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


@dataclasses.dataclass
class Splits:
  train: Sequence[dict]
  validation: Sequence[dict]
  test: Sequence[dict]
  class_names: tuple[str, ...]
  # Identity of the label-fraction subset: which training examples were used.
  subset: dict[str, Any]


def label_fraction_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
  """A fixed-seed subset of training indices, identical for every model and trial."""
  count = max(1, int(round(fraction * num_examples)))
  rng = np.random.default_rng(seed)
  return np.sort(rng.permutation(num_examples)[:count])


def manual_dir_for(config: ml_collections.ConfigDict) -> str:
  if config.dataset.manual_dir:
    return os.path.expanduser(config.dataset.manual_dir)
  if config.dataset.name == "phantom_cxr":
    p = config.dataset.phantom
    return os.path.join(config_lib.DEFAULT_CACHE, "phantom_cxr",
                        f"seed{p.seed}_{p.num_train}-{p.num_val}-{p.num_test}_{p.image_size}px")
  raise ValueError(f"config.dataset.manual_dir is required for {config.dataset.name!r}: "
                   "the folder holding the data set as its publisher distributes it.")


def data_dir_for(config: ml_collections.ConfigDict) -> str:
  if config.dataset.data_dir:
    return os.path.expanduser(config.dataset.data_dir)
  if config.dataset.name == "phantom_cxr":
    # Each generated variant is its own data set: keep its prepared copy beside it.
    return os.path.join(manual_dir_for(config), "prepared")
  return os.path.join(config_lib.DEFAULT_CACHE, "tfds")


def load_splits(config: ml_collections.ConfigDict) -> Splits:
  """Generates (phantom) and prepares the data set on process 0, then opens it everywhere."""
  manual_dir = manual_dir_for(config)
  data_dir = data_dir_for(config)
  if config.dataset.name == "phantom_cxr":
    if jax.process_index() == 0:  # generation is idempotent: a finished set is reused
      p = config.dataset.phantom
      phantom.generate(manual_dir, seed=p.seed, num_train=p.num_train, num_val=p.num_val,
                       num_test=p.num_test, image_size=p.image_size,
                       workers=max(1, os.cpu_count() or 1))
  if jax.process_index() == 0:
    builders.prepare(config.dataset.name, manual_dir, data_dir, config.dataset.image_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  builder = builders.get_builder(config.dataset.name, config.dataset.image_size, data_dir)
  class_names = tuple(builder.info.metadata["label_names"])
  train = builder.as_data_source("train")
  subset = {"label_fraction": float(config.dataset.label_fraction),
            "seed": int(config.dataset.label_fraction_seed),
            "num_examples": len(train), "num_selected": len(train)}
  if config.dataset.label_fraction < 1.0:
    indices = label_fraction_indices(len(train), config.dataset.label_fraction,
                                     config.dataset.label_fraction_seed)
    train = Subset(train, indices)
    subset.update(num_selected=len(indices), indices_sha1=_sha1(indices))
  validation = builder.as_data_source("validation")
  test = builder.as_data_source("test")
  logging.info("Dataset %s at %dpx: %d train / %d val / %d test examples; classes %s",
               config.dataset.name, config.dataset.image_size, len(train), len(validation),
               len(test), json.dumps(class_names))
  return Splits(train=train, validation=validation, test=test, class_names=class_names,
                subset=subset)


def _sha1(indices: np.ndarray) -> str:
  return hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()
