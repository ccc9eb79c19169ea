"""data/sources.py: opening prepared splits (label policy, fraction, frontal filter,
DatasetInfo) without preparing anything; config checks."""

import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax.data import prepare
from medbench_jax.data import sources
from medbench_jax.data.prepare import chexpert
from medbench_jax.data.prepare import phantom
from tests import layouts


def _config(name, manual_dir, data_dir, **dataset):
  config = config_lib.default_config()
  config.dataset.update(name=name, manual_dir=str(manual_dir), data_dir=str(data_dir),
                        image_size=16, **dataset)
  return config.dataset


def test_open_splits_applies_frontal_policy_and_fraction(tmp_path):
  expected = layouts.chexpert_layout(tmp_path / "chexpert")
  d = _config("chexpert", tmp_path / "chexpert", tmp_path / "tfds", frontal_only=True,
              uncertain_policy="u_zeros", blank_label=0.0, label_fraction=0.5)
  prepare.prepare_dataset(d, workers=1)
  splits = sources.open_splits(d)
  assert splits.info.eval_class_names == chexpert.CHEXPERT_COMPETITION
  assert splits.info.class_names == chexpert.CHEXPERT_LABELS
  assert splits.info.task == "multi-label"
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
  assert sources.open_splits(d).subset == subset  # identical for every model


def test_skipped_examples_reach_the_info(tmp_path):
  manual = layouts.broken_phantom(tmp_path)
  d = _config("phantom_cxr", manual, tmp_path / "tfds", skip_bad=True)
  d.phantom.update(seed=1, num_train=8, num_val=3, num_test=3, image_size=32)
  prepare.prepare_dataset(d, workers=1)
  assert sources.open_splits(d).info.skipped_examples == 5


def test_a_data_set_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
  d = _config("phantom_cxr", tmp_path / "phantom", tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match=r"'phantom_cxr' at 16px is not prepared in .*"
                                              r"python -m medbench_jax.prepare "
                                              r"--dataset=phantom_cxr"):
    sources.open_splits(d)
  assert not (tmp_path / "phantom").exists() and not (tmp_path / "tfds").exists()


def test_classification_info_and_examples(phantom_dir, tmp_path):
  d = _config("phantom_cxr", phantom_dir, tmp_path / "tfds")
  d.phantom.update(num_train=96, num_val=40, num_test=40, image_size=96)
  prepare.prepare_dataset(d, workers=1)
  splits = sources.open_splits(d)
  assert splits.info == sources.DatasetInfo(
      name="phantom_cxr", task="multi-label", class_names=phantom.FINDINGS,
      eval_class_names=phantom.FINDINGS, channels=1, image_size=16)
  example = splits.test[0]
  assert example["image"].shape == (16, 16, 1) and example["labels"].dtype == np.float32
  assert (len(splits.train), len(splits.validation), len(splits.test)) == (96, 40, 40)


def test_segmentation_masks_and_a_label_fraction_of_the_training_split(tmp_path):
  layouts.montgomery(tmp_path / "raw", np.random.default_rng(0), count=20)
  d = _config("montgomery_lr", tmp_path / "raw", tmp_path / "tfds", label_fraction=0.5)
  prepare.prepare_dataset(d, workers=1)
  splits = sources.open_splits(d)
  assert splits.info.task == "segmentation" and not splits.info.has_fov
  assert splits.info.class_names == ("left_lung", "right_lung")
  full = len(prepare.builder_for(d).as_data_source("train"))
  assert splits.subset["num_examples"] == full
  assert len(splits.train) == splits.subset["num_selected"] == round(full / 2)
  example = splits.train[0]
  assert "labels" not in example
  assert example["mask"].shape == (16, 16, 2) and set(np.unique(example["mask"])) <= {0, 1}
  assert example["image"].shape == (16, 16, 1)


@pytest.mark.parametrize("key,value,message", [
    ("name", "mnist", "config.dataset.name='mnist' is not allowed; allowed: .*chexpert"),
    ("label_fraction", 0.0, "config.dataset.label_fraction=0.0"),
    ("uncertain_policy", "u_maybe", "config.dataset.uncertain_policy='u_maybe'.*u_ones"),
    ("image_size", 0, "config.dataset.image_size=0 is not allowed; allowed: a positive"),
    ("blank_label", 2.0, "config.dataset.blank_label=2.0"),
])
def test_bad_dataset_config_names_the_key(key, value, message):
  d = config_lib.default_config().dataset
  sources.validate_dataset_config(d)
  d[key] = value
  with pytest.raises(ValueError, match=message):
    sources.validate_dataset_config(d)
