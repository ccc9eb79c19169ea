"""data/labels.py: label policies and label-fraction subsets."""

import hashlib

import numpy as np
import pytest

from medbench_jax.data import labels as labels_lib

RAW = np.array([[1, 0, -1, np.nan], [-1, -1, 0, 1]], np.float32)


@pytest.mark.parametrize("policy,uncertain_value", [("u_ones", 1.0), ("u_zeros", 0.0)])
def test_hard_policies(policy, uncertain_value):
  out = labels_lib.apply_label_policy(RAW, uncertain=policy, blank=0.0, seed=0, smooth=True)
  np.testing.assert_array_equal(out, [[1, 0, uncertain_value, 0],
                                      [uncertain_value, uncertain_value, 0, 1]])


@pytest.mark.parametrize("policy,low,high,hard", [("lsr_ones", 0.55, 0.85, 1.0),
                                                  ("lsr_zeros", 0.0, 0.3, 0.0)])
def test_label_smoothing_policies_are_fixed_seed_draws(policy, low, high, hard):
  raw = np.full((500, 3), -1, np.float32)
  out = labels_lib.apply_label_policy(raw, uncertain=policy, blank=0.0, seed=3, smooth=True)
  assert low <= out.min() and out.max() <= high and out.std() > 0.05
  np.testing.assert_array_equal(out, labels_lib.apply_label_policy(
      raw, uncertain=policy, blank=0.0, seed=3, smooth=True))
  # Validation and test keep hard labels, which the AUC needs.
  np.testing.assert_array_equal(labels_lib.apply_label_policy(
      raw, uncertain=policy, blank=0.0, seed=3, smooth=False), np.full_like(raw, hard))


def test_blank_takes_the_configured_value_and_bad_policy_names_the_key():
  out = labels_lib.apply_label_policy(RAW, uncertain="u_ones", blank=0.5, seed=0, smooth=True)
  assert out[0, 3] == 0.5
  with pytest.raises(ValueError, match="uncertain_policy='u_maybe'.*u_ones"):
    labels_lib.apply_label_policy(RAW, uncertain="u_maybe", blank=0.0, seed=0, smooth=True)


def test_label_fraction_is_stratified_fixed_and_seeded():
  rng = np.random.default_rng(0)
  labels = (rng.random((2000, 5)) < [0.5, 0.2, 0.1, 0.05, 0.01]).astype(np.float32)
  chosen, method = labels_lib.label_fraction_indices(labels, 0.1, seed=0)
  assert method == "label_combination" and len(chosen) == 200
  assert np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, labels_lib.label_fraction_indices(labels, 0.1, 0)[0])
  assert not np.array_equal(chosen, labels_lib.label_fraction_indices(labels, 0.1, 1)[0])
  # Per-class prevalence follows the full set closely (random subsets of 200 drift more).
  np.testing.assert_allclose(labels[chosen].mean(0), labels.mean(0), atol=0.02)


def test_one_hot_classes_keep_their_shares():
  labels = np.eye(3, dtype=np.float32)[np.repeat([0, 1, 2], [600, 300, 100])]
  chosen, _ = labels_lib.label_fraction_indices(labels, 0.05, seed=0)
  assert labels[chosen].sum(0).tolist() == [30, 15, 5]


def test_label_fraction_falls_back_to_random_and_keeps_all_at_one():
  labels = np.zeros((10, 2), np.float32)  # one label combination: nothing to stratify
  chosen, method = labels_lib.label_fraction_indices(labels, 0.3, seed=0)
  assert method == "random" and len(chosen) == 3
  chosen, method = labels_lib.label_fraction_indices(labels, 1.0, seed=0)
  assert method == "all" and chosen.tolist() == list(range(10))


def test_subset_identity_records_which_examples_and_their_classes():
  targets = np.array([[1, 0], [0.7, 1], [0, 0], [1, 1]], np.float32)
  identity = labels_lib.subset_identity(
      fraction=0.5, seed=3, method="random", labels=targets, indices=np.array([5, 9]),
      chosen=np.array([1, 3]), class_names=("A", "B"))
  assert identity == {
      "label_fraction": 0.5, "seed": 3, "num_examples": 4, "num_selected": 2,
      "method": "random",
      "indices_sha1": hashlib.sha1(np.array([5, 9], np.int64).tobytes()).hexdigest(),
      "class_counts": {"A": 2, "B": 2}}
