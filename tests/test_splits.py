"""Derived splits: exact fractions of patients, order-independent, patients kept whole."""

import numpy as np

from medbench_jax.data import splits

FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


def test_patients_stay_whole_and_counts_follow_the_fractions():
  names = [f"img{i}" for i in range(100)]
  groups = [f"patient{i // 2}" for i in range(100)]  # two images per patient
  result = splits.derive(names, FRACTIONS, groups=groups)
  assert {s: len(v) for s, v in result.items()} == {"train": 70, "validation": 10, "test": 20}
  patient_split = {}
  for split, members in result.items():
    for name in members:
      assert patient_split.setdefault(groups[names.index(name)], split) == split


def test_order_of_the_files_does_not_matter():
  names = [f"img{i}" for i in range(30)]
  order = np.random.default_rng(0).permutation(30)
  assert splits.derive(names, FRACTIONS) == splits.derive([names[i] for i in order], FRACTIONS)


def test_small_sets_get_a_validation_and_test_example():
  assert {s: len(v) for s, v in splits.derive(["a", "b", "c", "d"], FRACTIONS).items()} == {
      "train": 2, "validation": 1, "test": 1}
