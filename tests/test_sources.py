"""data/sources.py: opening prepared splits (label policy, fraction, frontal filter,
DatasetInfo) without preparing anything; config checks."""

import random

import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax.data import labels as labels_lib
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
  hashes = prepare.builder_for(d).info.metadata["split_sha1"]
  assert sorted(hashes) == ["test", "train", "validation"]
  assert splits.info == sources.DatasetInfo(
      name="phantom_cxr", task="multi-label", class_names=phantom.FINDINGS,
      eval_class_names=phantom.FINDINGS, channels=1, image_size=16, split_hashes=hashes)
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
    ("label_fraction_method", "first", "label_fraction_method='first'.*stratified"),
    ("label_fraction_splits", "validation", "label_fraction_splits='validation'"),
    ("label_fraction_splits", "train,dev", "label_fraction_splits='train,dev'"),
    ("lsr_draw", "twice", "lsr_draw='twice'.*per_read"),
    ("validation_labels", "soft", "validation_labels='soft'.*hard"),
])
def test_bad_dataset_config_names_the_key(key, value, message):
  d = config_lib.default_config().dataset
  sources.validate_dataset_config(d)
  d[key] = value
  with pytest.raises(ValueError, match=message):
    sources.validate_dataset_config(d)


def _names(split):
  return [split[i]["name"].decode() for i in range(len(split))]


def test_the_studys_chexpert_protocol(tmp_path):
  """LSR-Ones redrawn per read on train and validation, hard test labels; the study's
  random.Random(99) fraction of every split."""
  expected = layouts.chexpert_layout(tmp_path / "chexpert")
  d = _config("chexpert", tmp_path / "chexpert", tmp_path / "tfds",
              uncertain_policy="lsr_ones", lsr_draw="per_read", validation_labels="policy",
              label_fraction=0.5, label_fraction_method="study", label_fraction_seed=99,
              label_fraction_splits="train,validation,test")
  prepare.prepare_dataset(d, workers=1)
  splits = sources.open_splits(d)
  full = sources.open_splits(_config("chexpert", tmp_path / "chexpert", tmp_path / "tfds"))
  for name, split, whole in (("train", splits.train, full.train),
                             ("validation", splits.validation, full.validation),
                             ("test", splits.test, full.test)):
    all_names = _names(whole)
    order = np.arange(len(all_names))
    random.Random(99).shuffle(order)  # the reference's loader
    assert sorted(_names(split)) == sorted(all_names[i] for i in order[:len(order) // 2])
    for i in range(len(split)):
      example = split[i]
      raw = expected[example["name"].decode()][1]
      hard = np.nan_to_num(raw, nan=0.0)
      hard[hard == -1] = 1.0
      np.testing.assert_array_equal(example["labels"], hard)
      if name == "test":
        assert "uncertain" not in example
      else:
        np.testing.assert_array_equal(example["uncertain"], raw == -1)
    assert (split.uncertain_draw is None) == (name == "test")
  assert splits.train.uncertain_draw == labels_lib.UncertainDraw(0.55, 0.85)
  assert splits.subset["method"] == "study" and splits.subset["seed"] == 99
  assert {k: v["num_selected"] for k, v in splits.subset["other_splits"].items()} == {
      "validation": len(splits.validation), "test": len(splits.test)}


def test_project_options_hard_validation_and_lsr_drawn_once(tmp_path):
  layouts.chexpert_layout(tmp_path / "chexpert")
  d = _config("chexpert", tmp_path / "chexpert", tmp_path / "tfds",
              uncertain_policy="lsr_ones", lsr_draw="once")
  prepare.prepare_dataset(d, workers=1)
  splits = sources.open_splits(d)
  assert splits.train.uncertain_draw is None and splits.validation.uncertain_draw is None
  train = np.stack([splits.train[i]["labels"] for i in range(len(splits.train))])
  assert ((train > 0.5) & (train < 0.9)).any()  # smoothed, once, from the seed
  np.testing.assert_array_equal(train, np.stack([e["labels"] for e in sources.open_splits(
      d).train]))
  validation = np.stack([e["labels"] for e in splits.validation])
  assert set(np.unique(validation)) <= {0.0, 1.0}
  assert "other_splits" not in splits.subset


# ---------------------------------------------------------------- data on every host


def test_a_bucket_data_dir_is_refused_at_once_naming_what_works():
  config = config_lib.default_config()
  config.dataset.data_dir = "gs://bucket/tfds"
  with pytest.raises(ValueError, match="dataset.data_dir.*mounted"):
    sources.validate_dataset_config(config.dataset)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_two_processes_with_separate_caches_each_prepare_their_data_and_train(tmp_path):
  """Two loopback processes (jax.distributed over 127.0.0.1) whose caches, and so
  data_dirs, are separate folders, as on two hosts: each prepares its own copy."""
  import subprocess
  import sys

  from tests import helpers
  address = f"--coordinator_address=127.0.0.1:{helpers.free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "medbench_jax.main", f"--config={helpers.TINY}",
       f"--workdir={tmp_path / 'run'}", "--config.train.max_steps=4", address,
       "--num_processes=2", f"--process_id={i}"], cwd=helpers.REPO,
      env=helpers.subprocess_env(1, JAX_PLATFORMS="cpu",
                                 MEDBENCH_CACHE=str(tmp_path / f"host{i}")),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=1000)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    assert "prepared on each host in its own data_dir" in out
  for i in range(2):
    prepared = list((tmp_path / f"host{i}").rglob("dataset_info.json"))
    assert prepared, f"host {i} has no prepared copy"
  assert (tmp_path / "run" / "results.json").exists()
