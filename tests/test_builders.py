"""TFDS builders: official list format in, ArrayRecord out, errors naming file and line."""

import numpy as np
import pytest

from medbench_jax.data import builders
from medbench_jax.data import phantom


def test_prepared_phantom_equals_its_list_files(phantom_dir, phantom_builder):
  expected = {}
  for line in (phantom_dir / "phantom_val.txt").read_text().splitlines():
    name, *labels = line.split()
    expected[name] = np.array(labels, np.float32)
  source = phantom_builder.as_data_source("validation")
  assert len(source) == len(expected) == 40
  for i in range(len(source)):
    example = source[i]
    np.testing.assert_array_equal(example["labels"], expected[example["name"].decode()])
    assert example["image"].shape == (64, 64, 1) and example["image"].dtype == np.uint8
  assert phantom_builder.info.metadata["label_names"] == list(phantom.FINDINGS)


def test_stored_image_is_the_resized_png(phantom_dir, phantom_builder):
  import cv2  # pylint: disable=g-import-not-at-top
  example = phantom_builder.as_data_source("test")[0]
  png = cv2.imread(str(phantom_dir / "images" / example["name"].decode()), cv2.IMREAD_GRAYSCALE)
  expected = cv2.resize(png, (64, 64), interpolation=cv2.INTER_AREA)
  np.testing.assert_array_equal(example["image"][..., 0], expected)


def test_reference_split_list_format_parses(tmp_path):
  # The NIH list format: name then 14 space-separated 0/1 labels.
  path = tmp_path / "Xray14_val_official.txt"
  path.write_text("00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n"
                  "00000002_000.png 1 0 0 0 0 0 0 0 0 0 0 0 0 1\n")
  entries = builders.read_label_list(path, len(builders.Chestxray14.LABELS))
  assert [e.name for e in entries] == ["00000001_000.png", "00000002_000.png"]
  assert entries[0].labels[1] == 1 and entries[1].labels[13] == 1


@pytest.mark.parametrize("line,message", [
    ("a.png 0 1 0", r"list.txt:2: expected an image name and 4 labels, got 4 fields"),
    ("a.png 0 1 x 0", r"list.txt:2: labels must be numbers"),
])
def test_bad_list_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "list.txt"
  path.write_text(f"ok.png 0 0 0 0\n{line}\n")
  with pytest.raises(builders.DataFormatError, match=message):
    builders.read_label_list(path, 4)


def test_missing_image_names_list_line(tmp_path):
  for split in ("train", "val", "test"):
    (tmp_path / f"phantom_{split}.txt").write_text("missing.png 0 0 0 0\n")
  with pytest.raises(builders.DataFormatError, match=r"phantom_train.txt:1: image file .*missing.png"):
    builders.prepare("phantom_cxr", tmp_path, tmp_path / "out", 32)


def test_missing_split_list_says_what_to_provide(tmp_path):
  with pytest.raises(builders.DataFormatError, match="Xray14_train_official.txt"):
    builders.prepare("chestxray14", tmp_path, tmp_path / "out", 32)


def test_unknown_dataset_lists_available(tmp_path):
  with pytest.raises(ValueError, match="phantom_cxr"):
    builders.get_builder("chexpert_v9", 64, tmp_path)
