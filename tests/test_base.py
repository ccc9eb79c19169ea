"""data/prepare/base.py: one problem report, skip_bad, reuse and restart, stored features."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from medbench_jax.data import prepare
from medbench_jax.data.prepare import base
from medbench_jax.data.prepare.errors import DataFormatError
from tests import layouts


def test_one_report_lists_every_problem_with_file_and_line(tmp_path):
  manual = layouts.broken_phantom(tmp_path)
  with pytest.raises(DataFormatError) as e:
    layouts.prepare_layout("phantom_cxr", manual, tmp_path)
  report = str(e.value)
  assert "5 data problem(s)" in report
  for line, message in [(2, "not found in"), (3, "truncated PNG"),
                        (4, "cannot decode"), (5, "expected an image name and 4 labels"),
                        (6, "labels must be numbers")]:
    assert f"phantom_train.txt:{line}: " in report and message in report, (line, message)
  assert not prepare.get_builder("phantom_cxr", 16, tmp_path / "tfds").is_prepared()


def test_skip_bad_prepares_the_rest_and_counts(tmp_path):
  manual = layouts.broken_phantom(tmp_path)
  builder = layouts.prepare_layout("phantom_cxr", manual, tmp_path, skip_bad=True)
  assert len(builder.as_data_source("train")) == 3
  assert builder.info.metadata["skipped"] == {"train": 5, "validation": 0, "test": 0}
  summary = prepare.split_summaries("phantom_cxr", builder)
  assert [(s["split"], s["examples"], s["skipped"]) for s in summary] == [
      ("train", 3, 5), ("validation", 3, 0), ("test", 3, 0)]


def test_finished_preparation_is_reused_and_interrupted_one_restarts(tmp_path, phantom_dir):
  builder = prepare.get_builder("phantom_cxr", 16, tmp_path / "tfds")
  data_path = pathlib.Path(builder.data_path)
  stale = data_path.parent / f"incomplete.ABC123_{data_path.name}"
  stale.mkdir(parents=True)
  (stale / "train.scratch").write_bytes(b"left by a killed run")
  builder = layouts.prepare_layout("phantom_cxr", phantom_dir, tmp_path)
  assert not stale.exists() and builder.is_prepared()
  assert not list(data_path.glob("*.scratch"))
  stamp = (data_path / "dataset_info.json").stat().st_mtime_ns
  again = prepare.get_builder("phantom_cxr", 16, tmp_path / "tfds").prepare_once(
      tmp_path / "no_such_dir")
  assert (data_path / "dataset_info.json").stat().st_mtime_ns == stamp
  assert len(again.as_data_source("train")) == 96


def test_label_table_rows_are_the_examples_in_order(phantom_builder):
  for split in ("train", "test"):
    table = phantom_builder.label_table(split)
    source = phantom_builder.as_data_source(split)
    assert len(table["labels"]) == len(source)
    for i in range(0, len(source), 5):
      np.testing.assert_array_equal(table["labels"][i], source[i]["labels"])
    assert table["frontal"].all() and (table["patient"] == "").all()


@pytest.mark.parametrize("name,keys", [("phantom_cxr", ("image",)),
                                       ("drive", ("image", "mask", "fov"))])
def test_pixels_are_stored_as_raw_bytes(tmp_path, name, keys):
  """One serialized string per array, not one int64 varint per pixel."""
  text = tfds.features.Text().get_serialized_info()
  features = prepare.get_builder(name, 32, tmp_path).info.features
  for key in keys:
    assert features[key].dtype == np.uint8 and len(features[key].shape) == 3
    serialized = features[key].get_serialized_info()
    assert (serialized.shape, serialized.dtype) == (text.shape, text.dtype), key
  serialized = base.pixel_tensor((4, 4, 1)).get_serialized_info()
  assert (serialized.shape, serialized.dtype) == (text.shape, text.dtype)
