"""A prepared data set opened for a run: random-access splits and what a run needs to know.

Reads only. A data set is prepared beforehand, once (data/prepare's prepare_dataset,
which a run's lead process calls before training, or the prepare CLI); opening one
that is not is an error saying how to prepare it. Importing this module loads
neither TFDS nor OpenCV, so `validate_dataset_config` checks a config while it is
parsed.

Every split gets the frontal-only filter and (classification) the label policy;
the training split then the label-fraction subset, whose identity goes to
results.json.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from medbench_jax.data import labels as labels_lib
from medbench_jax.data import prepare
from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare import registry


@dataclasses.dataclass
class DatasetInfo:
  """What a run needs to know about a prepared data set.

  task: "multi-label", "multi-class" (one-hot labels), "binary" or "segmentation".
  class_names: the label (segmentation: mask channel) names, in stored order.
  eval_class_names: the labels the publisher evaluates on (CheXpert's five).
  skipped_examples: examples dropped by skip_bad when it was prepared.
  """
  name: str
  task: str
  class_names: tuple[str, ...]
  eval_class_names: tuple[str, ...]
  channels: int
  image_size: int
  has_fov: bool = False
  skipped_examples: int = 0
  # split -> sha1 of its example names (prepare/base.split_sha1), for provenance.
  split_hashes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Subset(Sequence):
  """Selected examples of a random-access source (picklable for grain workers).

  labels, when given, replace the stored labels of the selected examples (row i
  for example i): the label policy's result for sets with uncertain labels.
  """
  source: Sequence[dict]
  indices: np.ndarray
  labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    example = self.source[int(self.indices[i])]
    if self.labels is not None:
      example = {**example, "labels": self.labels[i]}
    return example


@dataclasses.dataclass
class Splits:
  """The three splits as random-access example sequences, and the data set's info.

  Examples: "image" uint8 (S, S, C); classification: "labels" float32 (K,) after the
  label policy; segmentation: "mask" uint8 (S, S, K) 0/1 and, where the data set has
  one, "fov" uint8 (S, S, 1); "name" (bytes) too.
  """
  train: Sequence[dict]
  validation: Sequence[dict]
  test: Sequence[dict]
  info: DatasetInfo
  # Identity of the label-fraction subset: which training examples were used.
  subset: dict[str, Any]


def _check(condition: bool, key: str, value: Any, allowed: Any) -> None:
  if not condition:
    raise ValueError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_dataset_config(dataset_config: ml_collections.ConfigDict) -> None:
  """Fails naming the key and its allowed values; cheap (nothing is read or imported)."""
  d = dataset_config
  _check(d.name in registry.names(), "dataset.name", d.name, registry.names())
  _check(_is_int(d.image_size) and d.image_size > 0, "dataset.image_size", d.image_size,
         "a positive integer")
  _check(0.0 < d.label_fraction <= 1.0, "dataset.label_fraction", d.label_fraction,
         "0 < x <= 1")
  _check(_is_int(d.label_fraction_seed), "dataset.label_fraction_seed",
         d.label_fraction_seed, "an integer")
  _check(d.uncertain_policy in labels_lib.UNCERTAIN_POLICIES, "dataset.uncertain_policy",
         d.uncertain_policy, labels_lib.UNCERTAIN_POLICIES)
  _check(0.0 <= d.blank_label <= 1.0, "dataset.blank_label", d.blank_label, "0 <= x <= 1")
  if d.name in prepare.PHANTOM_DATASETS and not d.manual_dir:
    for key in ("num_train", "num_val", "num_test"):
      _check(_is_int(d.phantom[key]) and d.phantom[key] >= 1, f"dataset.phantom.{key}",
             d.phantom[key], "an integer >= 1 (every split needs examples)")
    _check(_is_int(d.phantom.image_size) and d.phantom.image_size >= 32,
           "dataset.phantom.image_size", d.phantom.image_size, "an integer >= 32")


def open_splits(dataset_config: ml_collections.ConfigDict) -> Splits:
  """Opens the prepared splits of the configured data set (see the module docstring)."""
  d = dataset_config
  validate_dataset_config(d)
  builder = prepare.builder_for(d)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"Dataset {d.name!r} at {d.image_size}px is not prepared in "
        f"{prepare.data_dir_for(d)}. Prepare it first: python -m medbench_jax.prepare "
        f"--dataset={d.name} --manual_dir=DIR --data_dir={prepare.data_dir_for(d)} "
        f"--image_size={d.image_size} (a training run prepares it on its lead process).")
  builder.check_prepared_files()
  meta = builder.info.metadata
  features = builder.info.features
  class_names = tuple(meta["label_names"])
  info = DatasetInfo(
      name=d.name, task=meta["task"], class_names=class_names,
      eval_class_names=tuple(meta.get("eval_label_names", class_names)),
      channels=int(features["image"].shape[-1]), image_size=int(features["image"].shape[0]),
      has_fov="fov" in features, skipped_examples=int(sum(meta.get("skipped", {}).values())),
      split_hashes=dict(meta.get("split_sha1", {})))
  if d.frontal_only and not meta.get("views_known", True):
    raise ValueError(f"config.dataset.frontal_only needs view positions, which {d.name} "
                     "was prepared without (for MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv).")
  opened = {}
  for split in splits_lib.SPLITS:
    table = builder.label_table(split)
    keep = np.flatnonzero(table["frontal"]) if d.frontal_only else np.arange(
        len(table["frontal"]))
    # Segmentation tables hold class presence (0/1): the policy leaves it as it is.
    targets = labels_lib.apply_label_policy(
        table["labels"][keep], uncertain=d.uncertain_policy, blank=d.blank_label,
        seed=d.label_fraction_seed, smooth=split == "train")
    opened[split] = (builder.as_data_source(split), keep, targets)

  source, keep, targets = opened["train"]
  chosen, method = labels_lib.label_fraction_indices(targets, d.label_fraction,
                                                     d.label_fraction_seed)
  subset = labels_lib.subset_identity(
      fraction=d.label_fraction, seed=d.label_fraction_seed, method=method, labels=targets,
      indices=keep[chosen], chosen=chosen, class_names=class_names)
  opened["train"] = (source, keep[chosen], targets[chosen])
  train, validation, test = (
      Subset(source, indices, None if info.task == "segmentation" else targets)
      for source, indices, targets in (opened[s] for s in splits_lib.SPLITS))
  logging.info("Dataset %s (%s) at %dpx: %d train / %d val / %d test examples%s; classes "
               "%s; label subset %s", d.name, info.task, info.image_size, len(train),
               len(validation), len(test),
               f" ({info.skipped_examples} bad example(s) skipped when prepared)"
               if info.skipped_examples else "", json.dumps(class_names), json.dumps(subset))
  return Splits(train=train, validation=validation, test=test, info=info, subset=subset)
