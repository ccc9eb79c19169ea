"""Label policies (uncertain and blank labels) and label-fraction subsets.

Data sets store labels as published (1, 0, and where they have them -1 uncertain and
NaN blank); a run turns them into training targets here, so one prepared copy serves
every policy. The label smoothing policies (LSR) draw uncertain targets at random:
anew each time an example is read (`UncertainDraw`, the reference study's way,
through the input pipeline's per-example generators, so a run stays deterministic
and resumable), or once per run.

The label fraction is a fixed-seed subset, identical for every model and trial, so
that comparisons are paired: stratified on the label combination (this project's
default), or the reference study's rule (`study_fraction_indices`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import random
from typing import Any

import numpy as np
from sklearn import model_selection

# The study's names: U-Ones, U-Zeros, LSR-Ones, LSR-Zeros (Pham et al. 2021).
UNCERTAIN_POLICIES = ("u_ones", "u_zeros", "lsr_ones", "lsr_zeros")
LSR_RANGES = {"lsr_ones": (0.55, 0.85), "lsr_zeros": (0.0, 0.3)}
LSR_DRAWS = ("per_read", "once")
FRACTION_METHODS = ("stratified", "study")


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
  if smooth and uncertain in LSR_RANGES:
    rng = np.random.default_rng(seed)
    labels[is_uncertain] = rng.uniform(*LSR_RANGES[uncertain], size=int(is_uncertain.sum()))
  else:
    labels[is_uncertain] = 1.0 if uncertain.endswith("ones") else 0.0
  return labels


@dataclasses.dataclass(frozen=True)
class UncertainDraw:
  """Redraws an example's uncertain targets from U(low, high) each time it is read.

  The reference study's LSR (random.uniform in the dataset's __getitem__, so every
  epoch sees new values), made reproducible: `rng` is the input pipeline's generator
  for this read (grain derives it from the seed and the read's position, which the
  checkpointed iterator state holds). The example carries the mask of its uncertain
  labels under "uncertain" (sources.Subset); this replaces them and drops the mask.
  """
  low: float
  high: float

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    example = dict(example)
    uncertain = np.asarray(example.pop("uncertain"), bool)
    labels = np.array(example["labels"], np.float32)
    labels[uncertain] = rng.uniform(self.low, self.high, size=int(uncertain.sum()))
    example["labels"] = labels
    return example


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


def study_fraction_indices(num: int, fraction: float, seed: int = 99) -> np.ndarray:
  """The reference study's subset of a list of `num` examples, as sorted indices.

  Its loaders shuffle the indices with `random.Random(99).shuffle` and keep the first
  `int(num * anno_percent / 100.0)`; the same draw over the same list gives the same
  examples. fraction is anno_percent / 100 (recovered to 6 decimals, so 0.29 is 29 %).
  """
  percent = round(fraction * 100.0, 6)
  if percent >= 100:
    return np.arange(num)
  order = list(range(num))
  random.Random(seed).shuffle(order)
  count = int(num * percent / 100.0)
  if count == 0:
    raise ValueError(f"label_fraction={fraction} keeps int({num} * {percent:g} / 100) = 0 "
                     f"of {num} examples")
  return np.sort(np.array(order[:count], np.int64))


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int,
                           method: str = "stratified") -> tuple[np.ndarray, str]:
  """A fixed-seed subset of indices, identical for every model and trial.

  method "stratified": stratified on the label combination (multi-label rows,
  one-hot classes, classes present in a segmentation mask) with scikit-learn, rare
  combinations pooled; random where the labels allow no stratification. "study":
  the reference study's rule (study_fraction_indices). Returns sorted indices and
  the method used ("all" when every example is kept).
  """
  if method not in FRACTION_METHODS:
    raise ValueError(f"config.dataset.label_fraction_method={method!r} is not allowed; "
                     f"allowed: {FRACTION_METHODS}")
  num = len(labels)
  if method == "study":
    chosen = study_fraction_indices(num, fraction, seed)
    return chosen, "all" if len(chosen) == num else "study"
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


def subset_identity(*, fraction: float, seed: int, method: str, labels: np.ndarray,
                    indices: np.ndarray, chosen: np.ndarray,
                    class_names: Sequence[str]) -> dict[str, Any]:
  """Which training examples a run used, as results.json's `label_subset` records it.

  labels: the training split's targets; chosen: the selected rows of them; indices:
  the selected examples' positions in the prepared split (their sha1 identifies them).
  """
  positives = (labels[chosen] >= 0.5).sum(axis=0)
  return {"label_fraction": float(fraction), "seed": int(seed),
          "num_examples": len(labels), "num_selected": len(chosen), "method": method,
          "indices_sha1": hashlib.sha1(np.asarray(indices, np.int64).tobytes()).hexdigest(),
          "class_counts": {n: int(c) for n, c in zip(class_names, positives)}}
