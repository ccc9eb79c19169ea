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
import orbax.checkpoint as ocp
from absl import logging
from sklearn import model_selection

from medbench_jax import config_lib
from medbench_jax.data import builders
from medbench_jax.data import phantom


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
  train: Sequence[dict]
  validation: Sequence[dict]
  test: Sequence[dict]
  class_names: tuple[str, ...]
  # Identity of the label-fraction subset: which training examples were used.
  subset: dict[str, Any]
  # Labels the publisher evaluates on (CheXpert's five), a subset of class_names.
  eval_class_names: tuple[str, ...] = ()
  # Examples dropped by --skip_bad / config.dataset.skip_bad when it was prepared.
  skipped_examples: int = 0


# The study's names: U-Ones, U-Zeros, LSR-Ones, LSR-Zeros (Pham et al. 2021).
UNCERTAIN_POLICIES = ("u_ones", "u_zeros", "lsr_ones", "lsr_zeros")
# Other processes wait this long for process 0 to generate and prepare the data set.
_PREPARE_TIMEOUT_S = 24 * 3600
_LSR_RANGES = {"lsr_ones": (0.55, 0.85), "lsr_zeros": (0.0, 0.3)}


def apply_label_policy(raw: np.ndarray, *, uncertain: str, blank: float, seed: int,
                       smooth: bool) -> np.ndarray:
  """Raw labels (1, 0, -1 uncertain, NaN blank) -> training targets in [0, 1].

  Uncertain labels become 1 (u_ones), 0 (u_zeros), or with `smooth` a fixed-seed
  uniform draw in [0.55, 0.85] (lsr_ones) or [0, 0.3] (lsr_zeros); without
  `smooth` (validation and test, where metrics need hard labels) the LSR policies
  map like u_ones / u_zeros. Blank ("not mentioned") becomes `blank`.
  """
  if uncertain not in UNCERTAIN_POLICIES:
    raise ValueError(f"config.dataset.uncertain_policy={uncertain!r} is not allowed; "
                     f"allowed: {UNCERTAIN_POLICIES}")
  labels = np.array(raw, np.float32)
  is_uncertain = labels == -1
  labels[np.isnan(labels)] = blank
  if smooth and uncertain in _LSR_RANGES:
    rng = np.random.default_rng(seed)
    labels[is_uncertain] = rng.uniform(*_LSR_RANGES[uncertain], size=int(is_uncertain.sum()))
  else:
    labels[is_uncertain] = 1.0 if uncertain.endswith("ones") else 0.0
  return labels


def _strata(labels: np.ndarray, max_strata: int) -> np.ndarray | None:
  """Label combination per example; rare combinations pooled until sklearn can split.

  Returns None when only one stratum would be left (then the subset is random).
  """
  _, inverse, counts = np.unique(labels >= 0.5, axis=0, return_inverse=True,
                                 return_counts=True)
  inverse = inverse.reshape(-1)
  threshold = 2
  while True:
    rare = counts[inverse] < threshold
    strata = np.where(rare, -1, inverse)
    num_strata = len(np.unique(strata))
    if num_strata == 1:
      return None
    # sklearn needs every stratum twice and room for each on both sides of the split.
    if rare.sum() != 1 and num_strata <= max_strata:
      return strata
    threshold *= 2


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int
                           ) -> tuple[np.ndarray, str]:
  """A fixed-seed subset of training indices, identical for every model and trial.

  Stratified on the label combination (multi-label rows, one-hot classes) with
  scikit-learn, rare combinations pooled; random where the labels allow no
  stratification. Returns sorted indices and the method used.
  """
  num = len(labels)
  count = max(1, int(round(fraction * num)))
  if count >= num:
    return np.arange(num), "all"
  strata = _strata(np.asarray(labels), min(count, num - count))
  if strata is None:
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(num)[:count]), "random"
  chosen, _ = model_selection.train_test_split(
      np.arange(num), train_size=count, stratify=strata, random_state=seed)
  return np.sort(chosen), "label_combination"


def manual_dir_for(config: ml_collections.ConfigDict) -> str:
  if config.dataset.manual_dir:
    return os.path.expanduser(config.dataset.manual_dir)
  if config.dataset.name == "phantom_cxr":
    p = config.dataset.phantom
    return os.path.join(config_lib.DEFAULT_CACHE, "phantom_cxr",
                        f"seed{p.seed}_{p.num_train}-{p.num_val}-{p.num_test}_{p.image_size}px"
                        f"_v{phantom.FORMAT_VERSION}")
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
  """Generates (phantom) and prepares the data set on process 0, then opens it everywhere.

  Every split gets the label policy and the frontal-only filter; the training split
  then the label-fraction subset, whose identity goes to results.json.
  """
  d = config.dataset
  manual_dir = manual_dir_for(config)
  data_dir = data_dir_for(config)
  if d.name == "phantom_cxr":
    if jax.process_index() == 0:  # generation is idempotent: a finished set is reused
      p = d.phantom
      phantom.generate(manual_dir, seed=p.seed, num_train=p.num_train, num_val=p.num_val,
                       num_test=p.num_test, image_size=p.image_size,
                       workers=builders.default_workers())
  options = d.csv.to_dict() if builders.takes_options(d.name) else None
  if jax.process_index() == 0:
    builders.prepare(d.name, manual_dir, data_dir, d.image_size, skip_bad=d.skip_bad,
                     options=options)
  if jax.process_count() > 1:
    # A coordination-service barrier, not a device collective: preparing a data set takes
    # longer than the collectives' connection timeout (30 s with gloo).
    ocp.multihost.get_barrier_sync_fn()(key="medbench_dataset_prepared",
                                        timeout_ms=_PREPARE_TIMEOUT_S * 1000)
  builder = builders.get_builder(d.name, d.image_size, data_dir, options)
  meta = builder.info.metadata
  class_names = tuple(meta["label_names"])
  if d.frontal_only and not meta.get("views_known", True):
    raise ValueError(f"config.dataset.frontal_only needs view positions, which {d.name} "
                     "was prepared without (for MIMIC-CXR: mimic-cxr-2.0.0-metadata.csv).")
  splits = {}
  for split in builders.SPLITS:
    table = builders.label_table(builder, split)
    keep = np.flatnonzero(table["frontal"]) if d.frontal_only else np.arange(
        len(table["frontal"]))
    labels = apply_label_policy(table["labels"][keep], uncertain=d.uncertain_policy,
                                blank=d.blank_label, seed=d.label_fraction_seed,
                                smooth=split == "train")
    splits[split] = (builder.as_data_source(split), keep, labels)

  source, keep, labels = splits["train"]
  chosen, method = label_fraction_indices(labels, d.label_fraction, d.label_fraction_seed)
  positives = (labels[chosen] >= 0.5).sum(axis=0)
  subset = {"label_fraction": float(d.label_fraction), "seed": int(d.label_fraction_seed),
            "num_examples": len(labels), "num_selected": len(chosen), "method": method,
            "indices_sha1": _sha1(keep[chosen]),
            "class_counts": {n: int(c) for n, c in zip(class_names, positives)}}
  splits["train"] = (source, keep[chosen], labels[chosen])
  train, validation, test = (Subset(*splits[s]) for s in builders.SPLITS)
  skipped = int(sum(meta.get("skipped", {}).values()))
  logging.info("Dataset %s at %dpx: %d train / %d val / %d test examples%s; classes %s; "
               "label subset %s", d.name, d.image_size, len(train), len(validation),
               len(test), f" ({skipped} bad example(s) skipped when prepared)" if skipped
               else "", json.dumps(class_names), json.dumps(subset))
  return Splits(train=train, validation=validation, test=test, class_names=class_names,
                subset=subset, eval_class_names=tuple(meta.get("eval_label_names",
                                                               class_names)),
                skipped_examples=skipped)


def _sha1(indices: np.ndarray) -> str:
  return hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest()
