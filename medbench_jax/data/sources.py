"""A prepared data set opened for a run: random-access splits and what a run needs to know.

Reads only. A data set is prepared beforehand, once (data/prepare's prepare_dataset,
which a run's lead process calls before training, or the prepare CLI); opening one
that is not is an error saying how to prepare it. Importing this module loads
neither TFDS nor OpenCV, so `validate_dataset_config` checks a config while it is
parsed.

Every split gets the frontal-only filter and (classification) the label policy;
the training split (and any other in dataset.label_fraction_splits) then the
label-fraction subset, whose identity goes to results.json. Under an LSR policy
drawn per read, a split's examples carry the mask of their uncertain labels and the
split its `uncertain_draw`, which the input pipeline applies with its per-example
generator (data/labels.py).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import fcntl
import json
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from medbench_jax import paths
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
  uncertain (with uncertain_draw): the mask of row i's uncertain labels, added to
  example i as "uncertain" for the pipeline to draw their targets per read; until
  then they hold the policy's hard value.
  """
  source: Sequence[dict]
  indices: np.ndarray
  labels: np.ndarray | None = None
  uncertain: np.ndarray | None = None
  uncertain_draw: labels_lib.UncertainDraw | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    example = self.source[int(self.indices[i])]
    if self.labels is not None:
      example = {**example, "labels": self.labels[i]}
    if self.uncertain is not None:
      example = {**example, "uncertain": self.uncertain[i]}
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


def fraction_splits(dataset_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The splits dataset.label_fraction_splits names (comma-separated)."""
  return tuple(s.strip() for s in dataset_config.label_fraction_splits.split(",")
               if s.strip())


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
  _check(d.label_fraction_method in labels_lib.FRACTION_METHODS,
         "dataset.label_fraction_method", d.label_fraction_method,
         labels_lib.FRACTION_METHODS)
  named = fraction_splits(d)
  _check("train" in named and set(named) <= set(splits_lib.SPLITS),
         "dataset.label_fraction_splits", d.label_fraction_splits,
         '"train" and optionally "validation" and "test", comma-separated')
  _check(d.uncertain_policy in labels_lib.UNCERTAIN_POLICIES, "dataset.uncertain_policy",
         d.uncertain_policy, labels_lib.UNCERTAIN_POLICIES)
  _check(d.lsr_draw in labels_lib.LSR_DRAWS, "dataset.lsr_draw", d.lsr_draw,
         labels_lib.LSR_DRAWS)
  _check(d.validation_labels in ("hard", "policy"), "dataset.validation_labels",
         d.validation_labels, ("hard", "policy"))
  _check(isinstance(d.keep_aspect, bool), "dataset.keep_aspect", d.keep_aspect,
         (False, True))
  _check(0.0 <= d.blank_label <= 1.0, "dataset.blank_label", d.blank_label, "0 <= x <= 1")
  for key in ("data_dir", "manual_dir"):
    # ArrayRecord shards and publishers' files are read with local file calls.
    _check(not paths.is_remote(d[key]), f"dataset.{key}", d[key],
           "a local folder, or a bucket mounted as one (e.g. by gcsfuse)")
  if d.name in prepare.PHANTOM_DATASETS and not d.manual_dir:
    for key in ("num_train", "num_val", "num_test"):
      _check(_is_int(d.phantom[key]) and d.phantom[key] >= 1, f"dataset.phantom.{key}",
             d.phantom[key], "an integer >= 1 (every split needs examples)")
    _check(_is_int(d.phantom.image_size) and d.phantom.image_size >= 32,
           "dataset.phantom.image_size", d.phantom.image_size, "an integer >= 32")


def prepare_for_run(dataset_config: ml_collections.ConfigDict, *, shared: bool,
                    barrier: str) -> None:
  """Prepares the configured data set where every process of the run will read it.

  One process: prepares it. Several, `shared` (data_dir is one folder every host sees,
  e.g. a shared file system): the lead process prepares it once, the others wait.
  Several, not `shared` (the default: each host has its own data_dir, e.g. its
  MEDBENCH_CACHE): every host prepares its own copy; processes that share a host (and
  so its data_dir) take turns, the first prepares and the others find it prepared.
  Every process then waits at `barrier`; the log says which of these it did.
  """
  import jax

  from medbench_jax import runtime
  d = dataset_config
  data_dir = prepare.data_dir_for(d)
  if jax.process_count() == 1:
    prepare.prepare_dataset(d)
  elif shared:
    logging.info("Data set %s: prepared once by the lead process in the shared data_dir %s, "
                 "which every host reads", d.name, data_dir)
    if runtime.is_lead():
      prepare.prepare_dataset(d)
  else:
    logging.info("Data set %s: prepared on each host in its own data_dir (here %s); pass "
                 "--shared_data_dir where that folder is one that every host sees", d.name,
                 data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".prepare.lock"), "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
      prepare.prepare_dataset(d)
  runtime.barrier(barrier)


def _policy_of(dataset_config: ml_collections.ConfigDict, split: str, task: str) -> str:
  """How a split's uncertain labels become targets: "hard", "once" or "per_read".

  Test labels are always hard (metrics need them); validation labels follow the
  training policy where dataset.validation_labels is "policy".
  """
  d = dataset_config
  smoothed = (task != "segmentation" and d.uncertain_policy in labels_lib.LSR_RANGES and
              (split == "train" or split == "validation" and d.validation_labels == "policy"))
  return d.lsr_draw if smoothed else "hard"


def dataset_info(dataset_config: ml_collections.ConfigDict,
                 builder: prepare.base.PreparedBuilder) -> DatasetInfo:
  """What the builder of the configured data set says of it; before preparation its
  labels, task and channels are known, not yet what preparation skipped."""
  meta = builder.info.metadata
  class_names = tuple(meta["label_names"])
  return DatasetInfo(
      name=dataset_config.name, task=meta["task"], class_names=class_names,
      eval_class_names=tuple(meta.get("eval_label_names", class_names)),
      channels=int(builder.info.features["image"].shape[-1]),
      image_size=builder.builder_config.image_size,
      has_fov="fov" in builder.info.features,
      skipped_examples=int(sum(meta.get("skipped", {}).values())),
      split_hashes=dict(meta.get("split_sha1", {})))


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
        f"--image_size={d.image_size}{' --keep_aspect' if d.keep_aspect else ''} (a "
        "training run prepares it on its lead process).")
  builder.check_prepared_files()
  meta = builder.info.metadata
  info = dataset_info(d, builder)
  if d.frontal_only and not meta.get("views_known", True):
    raise ValueError(f"config.dataset.frontal_only needs view positions, which {d.name} "
                     "was prepared without (for MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv).")
  subsampled = fraction_splits(d)
  opened, subset = {}, {}
  for split in splits_lib.SPLITS:
    table = builder.label_table(split)
    keep = np.flatnonzero(table["frontal"]) if d.frontal_only else np.arange(
        len(table["frontal"]))
    raw = table["labels"][keep]
    policy = _policy_of(d, split, info.task)
    # Segmentation tables hold class presence (0/1): the policy leaves it as it is.
    targets = labels_lib.apply_label_policy(
        raw, uncertain=d.uncertain_policy, blank=d.blank_label, seed=d.label_fraction_seed,
        smooth=policy == "once")
    uncertain = raw == -1 if policy == "per_read" else None
    if split in subsampled:
      skipped = meta.get("skipped", {}).get(split, 0)
      if d.label_fraction_method == "study" and d.label_fraction < 1 and (
          skipped or d.frontal_only):
        logging.warning(
            "The study's label-fraction rule draws over the published list; this %s split "
            "lacks %s, so its subset is not the one the reference code selects.", split,
            f"{skipped} skipped example(s)" if skipped else "its lateral views")
      chosen, method = labels_lib.label_fraction_indices(
          targets, d.label_fraction, d.label_fraction_seed, d.label_fraction_method)
      identity = labels_lib.subset_identity(
          fraction=d.label_fraction, seed=d.label_fraction_seed, method=method,
          labels=targets, indices=keep[chosen], chosen=chosen, class_names=info.class_names)
      if split == "train":
        subset = identity
      else:
        subset.setdefault("other_splits", {})[split] = {
            k: identity[k] for k in ("num_examples", "num_selected", "indices_sha1")}
      keep, targets = keep[chosen], targets[chosen]
      uncertain = None if uncertain is None else uncertain[chosen]
    opened[split] = Subset(
        builder.as_data_source(split), keep,
        None if info.task == "segmentation" else targets, uncertain,
        None if uncertain is None else labels_lib.UncertainDraw(
            *labels_lib.LSR_RANGES[d.uncertain_policy]))
  train, validation, test = (opened[s] for s in splits_lib.SPLITS)
  logging.info("Dataset %s (%s) at %dpx: %d train / %d val / %d test examples%s; classes "
               "%s; label subset %s", d.name, info.task, info.image_size, len(train),
               len(validation), len(test),
               f" ({info.skipped_examples} bad example(s) skipped when prepared)"
               if info.skipped_examples else "", json.dumps(info.class_names),
               json.dumps(subset))
  return Splits(train=train, validation=validation, test=test, info=info, subset=subset)
