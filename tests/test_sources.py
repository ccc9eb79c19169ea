"""data/sources.py: label policies, label-fraction subsets, frontal filter, skipped count."""

import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax.data import chexpert
from medbench_jax.data import sources
from tests import test_builders

RAW = np.array([[1, 0, -1, np.nan], [-1, -1, 0, 1]], np.float32)


@pytest.mark.parametrize("policy,uncertain_value", [("u_ones", 1.0), ("u_zeros", 0.0)])
def test_hard_policies(policy, uncertain_value):
  out = sources.apply_label_policy(RAW, uncertain=policy, blank=0.0, seed=0, smooth=True)
  np.testing.assert_array_equal(out, [[1, 0, uncertain_value, 0],
                                      [uncertain_value, uncertain_value, 0, 1]])


@pytest.mark.parametrize("policy,low,high,hard", [("lsr_ones", 0.55, 0.85, 1.0),
                                                  ("lsr_zeros", 0.0, 0.3, 0.0)])
def test_label_smoothing_policies_are_fixed_seed_draws(policy, low, high, hard):
  raw = np.full((500, 3), -1, np.float32)
  out = sources.apply_label_policy(raw, uncertain=policy, blank=0.0, seed=3, smooth=True)
  assert low <= out.min() and out.max() <= high and out.std() > 0.05
  np.testing.assert_array_equal(out, sources.apply_label_policy(
      raw, uncertain=policy, blank=0.0, seed=3, smooth=True))
  # Validation and test keep hard labels, which the AUC needs.
  np.testing.assert_array_equal(sources.apply_label_policy(
      raw, uncertain=policy, blank=0.0, seed=3, smooth=False), np.full_like(raw, hard))


def test_blank_takes_the_configured_value_and_bad_policy_names_the_key():
  out = sources.apply_label_policy(RAW, uncertain="u_ones", blank=0.5, seed=0, smooth=True)
  assert out[0, 3] == 0.5
  with pytest.raises(ValueError, match="uncertain_policy='u_maybe'.*u_ones"):
    sources.apply_label_policy(RAW, uncertain="u_maybe", blank=0.0, seed=0, smooth=True)


def test_label_fraction_is_stratified_fixed_and_seeded():
  rng = np.random.default_rng(0)
  labels = (rng.random((2000, 5)) < [0.5, 0.2, 0.1, 0.05, 0.01]).astype(np.float32)
  chosen, method = sources.label_fraction_indices(labels, 0.1, seed=0)
  assert method == "label_combination" and len(chosen) == 200
  assert np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, sources.label_fraction_indices(labels, 0.1, 0)[0])
  assert not np.array_equal(chosen, sources.label_fraction_indices(labels, 0.1, 1)[0])
  # Per-class prevalence follows the full set closely (random subsets of 200 drift more).
  np.testing.assert_allclose(labels[chosen].mean(0), labels.mean(0), atol=0.02)


def test_one_hot_classes_keep_their_shares():
  labels = np.eye(3, dtype=np.float32)[np.repeat([0, 1, 2], [600, 300, 100])]
  chosen, _ = sources.label_fraction_indices(labels, 0.05, seed=0)
  assert labels[chosen].sum(0).tolist() == [30, 15, 5]


def test_label_fraction_falls_back_to_random_and_keeps_all_at_one():
  labels = np.zeros((10, 2), np.float32)  # one label combination: nothing to stratify
  chosen, method = sources.label_fraction_indices(labels, 0.3, seed=0)
  assert method == "random" and len(chosen) == 3
  chosen, method = sources.label_fraction_indices(labels, 1.0, seed=0)
  assert method == "all" and chosen.tolist() == list(range(10))


def _config(name, manual_dir, data_dir, **dataset):
  config = config_lib.default_config()
  config.dataset.update(name=name, manual_dir=str(manual_dir), data_dir=str(data_dir),
                        image_size=16, **dataset)
  return config


def test_load_splits_applies_frontal_policy_and_fraction(tmp_path):
  expected = test_builders._chexpert_layout(tmp_path / "chexpert")  # pylint: disable=protected-access
  config = _config("chexpert", tmp_path / "chexpert", tmp_path / "tfds", frontal_only=True,
                   uncertain_policy="u_zeros", blank_label=0.0, label_fraction=0.5)
  splits = sources.load_splits(config)
  assert splits.eval_class_names == chexpert.CHEXPERT_COMPETITION
  frontal = {n for n, (_, _, f) in expected.items() if f}
  for split in (splits.train, splits.validation, splits.test):
    for i in range(len(split)):
      example = split[i]
      name = example["name"].decode()
      assert name in frontal
      want = np.nan_to_num(expected[name][1], nan=0.0)
      want[want == -1] = 0.0
      np.testing.assert_array_equal(example["labels"], want)
  subset = splits.subset
  assert subset["num_selected"] == len(splits.train) == round(subset["num_examples"] / 2)
  assert len(subset["indices_sha1"]) == 40 and subset["seed"] == 0
  assert set(subset["class_counts"]) == set(chexpert.CHEXPERT_LABELS)
  assert sum(subset["class_counts"].values()) == int(
      sum((splits.train[i]["labels"] >= 0.5).sum() for i in range(len(splits.train))))
  assert sources.load_splits(config).subset == subset  # identical for every model


def test_skipped_examples_reach_the_splits(tmp_path):
  manual = test_builders._broken_phantom(tmp_path)  # pylint: disable=protected-access
  config = _config("phantom_cxr", manual, tmp_path / "tfds", skip_bad=True)
  config.dataset.phantom.update(seed=1, num_train=8, num_val=3, num_test=3, image_size=32)
  assert sources.load_splits(config).skipped_examples == 5
