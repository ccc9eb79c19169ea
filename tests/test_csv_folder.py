"""csv_folder: a user's image folder + CSV(s), described by options."""

import pytest

from medbench_jax.data import prepare
from medbench_jax.data import splits
from medbench_jax.data.prepare.errors import DataFormatError
from tests import layouts

CSV_OPTIONS = dict(csv="labels.csv", image_dir="pics", path_column="file",
                   labels="Effusion,Nodule", split_column="split", patient_column="patient")
HEADER = ["file", "Effusion", "Nodule", "split", "patient"]


def test_csv_folder_with_a_split_column(tmp_path):
  rows, expected = layouts.csv_folder_rows(tmp_path / "m")
  layouts.write_csv(tmp_path / "m" / "labels.csv", HEADER, rows)
  builder = layouts.prepare_layout("csv_folder", tmp_path / "m", tmp_path,
                                   options=CSV_OPTIONS)
  assert builder.info.metadata["label_names"] == ["Effusion", "Nodule"]
  for split in splits.SPLITS:
    layouts.assert_labels(layouts.read_split(builder, split), expected[split])


def test_csv_folder_with_one_csv_per_split(tmp_path):
  rows, expected = layouts.csv_folder_rows(tmp_path / "m")
  for split, short in (("train", "train"), ("validation", "val"), ("test", "test")):
    layouts.write_csv(tmp_path / "m" / f"{split}.csv", ["file", "Effusion", "Nodule"],
                      [r[:3] for r in rows if r[3] == short])
  options = dict(CSV_OPTIONS, csv="{split}.csv", split_column="", patient_column="")
  builder = layouts.prepare_layout("csv_folder", tmp_path / "m", tmp_path, options=options)
  for split in splits.SPLITS:
    layouts.assert_labels(layouts.read_split(builder, split), expected[split])


def test_csv_folder_patient_in_two_user_splits_is_an_error(tmp_path):
  rows, _ = layouts.csv_folder_rows(tmp_path / "m", patient_of=lambda i: f"P{i // 2}")
  layouts.write_csv(tmp_path / "m" / "labels.csv", HEADER, rows)
  with pytest.raises(DataFormatError, match="Patient-level leakage"):
    layouts.prepare_layout("csv_folder", tmp_path / "m", tmp_path, options=CSV_OPTIONS)


def test_options_are_checked():
  with pytest.raises(ValueError, match="takes no options"):
    prepare.get_builder("chexpert", 16, "/tmp", {"labels": "A"})
  with pytest.raises(ValueError, match="Unknown csv option.*'colour'"):
    prepare.get_builder("csv_folder", 16, "/tmp", {"labels": "A", "colour": 1})
  with pytest.raises(ValueError, match="must name the label columns"):
    prepare.get_builder("csv_folder", 16, "/tmp", {})
