"""Label policies (uncertain and blank labels) and label-fraction subsets.

Data sets store labels as published (1, 0, and where they have them -1 uncertain and
NaN blank); a run turns them into training targets here, so one prepared copy serves
every policy. The label fraction is a fixed-seed subset of the training split,
identical for every model and trial, so that comparisons are paired.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
from sklearn import model_selection

# The study's names: U-Ones, U-Zeros, LSR-Ones, LSR-Zeros (Pham et al. 2021).
UNCERTAIN_POLICIES = ("u_ones", "u_zeros", "lsr_ones", "lsr_zeros")
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

  Stratified on the label combination (multi-label rows, one-hot classes, classes
  present in a segmentation mask) with scikit-learn, rare combinations pooled;
  random where the labels allow no stratification. Returns sorted indices and the
  method used.
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
