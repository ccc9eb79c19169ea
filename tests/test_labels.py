"""data/labels.py: label policies and label-fraction subsets."""

import hashlib
import random

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


def _reference_subset(num, anno_percent):
  """The reference study's loaders (dataloader.py), verbatim in substance: shuffle a
  numpy index array with random.Random(99), keep the first int(N * p / 100.0)."""
  indexes = np.arange(num)
  if anno_percent < 100:
    random.Random(99).shuffle(indexes)
    num_data = int(indexes.shape[0] * anno_percent / 100.0)
    indexes = indexes[:num_data]
  return indexes


@pytest.mark.parametrize("num,percent", [(75312, 1), (75312, 5), (463, 10), (463, 29),
                                         (21295, 50), (100, 7), (15000, 100)])
def test_study_fraction_is_the_references_random_99_subset(num, percent):
  chosen = labels_lib.study_fraction_indices(num, percent / 100.0, seed=99)
  reference = _reference_subset(num, percent)
  assert len(chosen) == len(reference)
  np.testing.assert_array_equal(chosen, np.sort(reference))


def test_study_method_through_label_fraction_indices_and_an_empty_subset():
  labels = np.zeros((463, 1), np.float32)
  chosen, method = labels_lib.label_fraction_indices(labels, 0.1, 99, "study")
  assert method == "study"
  np.testing.assert_array_equal(chosen, np.sort(_reference_subset(463, 10)))
  assert labels_lib.label_fraction_indices(labels, 1.0, 99, "study")[1] == "all"
  with pytest.raises(ValueError, match=r"keeps int\(10 \* 5 / 100\) = 0 of 10"):
    labels_lib.label_fraction_indices(labels[:10], 0.05, 99, "study")
  with pytest.raises(ValueError, match="label_fraction_method='first'.*stratified"):
    labels_lib.label_fraction_indices(labels, 0.1, 99, "first")


def test_uncertain_draw_replaces_only_uncertain_labels_in_the_lsr_range():
  draw = labels_lib.UncertainDraw(*labels_lib.LSR_RANGES["lsr_ones"])
  example = {"labels": np.float32([1, 0, 1, 1]), "uncertain": np.array([0, 0, 1, 1], bool),
             "image": np.zeros(1)}
  out = draw(example, np.random.default_rng(0))
  assert "uncertain" not in out and "uncertain" in example  # the input is left as it was
  np.testing.assert_array_equal(out["labels"][:2], [1, 0])
  assert np.all((0.55 <= out["labels"][2:]) & (out["labels"][2:] <= 0.85))
  assert out["labels"][2] != out["labels"][3]
  again = draw(example, np.random.default_rng(0))
  np.testing.assert_array_equal(out["labels"], again["labels"])
