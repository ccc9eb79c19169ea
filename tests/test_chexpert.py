"""CheXpert and MIMIC-CXR-JPG builders: raw labels, views, patients, bad CSV rows."""

import numpy as np
import pytest

from medbench_jax.data import splits
from medbench_jax.data.prepare import chexpert
from medbench_jax.data.prepare.errors import DataFormatError
from tests import layouts


def test_chexpert_keeps_raw_labels_views_and_patients(tmp_path):
  expected = layouts.chexpert_layout(tmp_path / "chexpert")
  builder = layouts.prepare_layout("chexpert", tmp_path / "chexpert", tmp_path)
  seen = {}
  for split in splits.SPLITS:
    table = builder.label_table(split)
    source = builder.as_data_source(split)
    for i in range(len(source)):
      name = source[i]["name"].decode()
      level, labels, frontal = expected[name]
      assert abs(float(source[i]["image"].mean()) - level) <= 2
      np.testing.assert_array_equal(source[i]["labels"], labels)  # NaN == NaN here
      np.testing.assert_array_equal(table["labels"][i], labels)
      assert table["frontal"][i] == frontal
      assert table["patient"][i] == name.split("/")[2]
      seen[name] = split
  assert sorted(seen) == sorted(expected)
  assert {n for n, s in seen.items() if s == "test"} == {n for n in expected if "/valid/" in n}
  assert builder.info.metadata["eval_label_names"] == list(chexpert.CHEXPERT_COMPETITION)


def test_chexpert_folder_given_directly_and_renamed(tmp_path):
  expected = layouts.chexpert_layout(tmp_path / "x")
  (tmp_path / "x" / "CheXpert-v1.0-small").rename(tmp_path / "my_chexpert")
  builder = layouts.prepare_layout("chexpert", tmp_path / "my_chexpert", tmp_path)
  assert sum(len(builder.as_data_source(s)) for s in splits.SPLITS) == len(expected)


MIMIC_LABEL_HEADER = ["subject_id", "study_id"] + sorted(chexpert.CHEXPERT_LABELS)


def test_mimic_cxr_jpg_layout(tmp_path):
  manual = tmp_path / "mimic"
  label_rows, split_rows, meta_rows, expected = [], [], [], {}
  for k, (subject, study, split) in enumerate([
      ("10000032", "50414267", "train"), ("10000764", "57375967", "train"),
      ("10000898", "50771383", "validate"), ("10001122", "51231512", "test")]):
    values = ["1.0", "-1.0", "", "0.0"] * 3 + ["1.0", ""]
    values = values[k:] + values[:k]
    label_rows.append([subject, study] + values)
    by_name = dict(zip(sorted(chexpert.CHEXPERT_LABELS), values))
    labels = np.array([float(by_name[n]) if by_name[n] else np.nan
                       for n in chexpert.CHEXPERT_LABELS], np.float32)
    for j, view in enumerate(("PA", "LATERAL")):
      dicom = f"{k:04d}{j}abc-12345678-90abcdef-12345678-90abcdef"
      split_rows.append([dicom, study, subject, split])
      meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544"])
      relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
      layouts.image(manual / relative, 20 + 40 * k + 20 * j)
      expected[relative] = (20 + 40 * k + 20 * j, labels, view == "PA",
                            {"validate": "validation"}.get(split, split))
  layouts.write_csv(manual / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_HEADER,
                    label_rows, gz=True)
  layouts.write_csv(manual / "mimic-cxr-2.0.0-split.csv.gz",
                    ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
  layouts.write_csv(manual / "mimic-cxr-2.0.0-metadata.csv.gz", [
      "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
      "ViewPosition", "Rows", "Columns"], meta_rows, gz=True)
  builder = layouts.prepare_layout("mimic_cxr_jpg", manual, tmp_path)
  for split in splits.SPLITS:
    table = builder.label_table(split)
    source = builder.as_data_source(split)
    for i in range(len(source)):
      level, labels, frontal, want_split = expected[source[i]["name"].decode()]
      assert want_split == split
      assert abs(float(source[i]["image"].mean()) - level) <= 2
      np.testing.assert_array_equal(table["labels"][i], labels)
      assert table["frontal"][i] == frontal
  assert sum(len(builder.as_data_source(s)) for s in splits.SPLITS) == len(expected)
  assert builder.info.metadata["views_known"] is True


def test_missing_csv_column_and_bad_values_are_reported(tmp_path):
  manual = tmp_path / "c" / "CheXpert-v1.0-small"
  header = layouts.CHEXPERT_HEADER
  row = ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Male", "50",
         "Frontal", "PA"] + ["0.0"] * 14
  layouts.image(manual / "train/patient00001/study1/view1_frontal.jpg", 9)
  layouts.write_csv(manual / "train.csv", header, [row, row[:-1], row[:-1] + ["maybe"],
                                                   row[:-1] + ["2.0"]])
  layouts.write_csv(manual / "valid.csv", header[:-1], [row[:-1]])
  with pytest.raises(DataFormatError) as e:
    layouts.prepare_layout("chexpert", tmp_path / "c", tmp_path)
  report = str(e.value)
  assert "valid.csv:1: missing column(s) ['Support Devices']" in report
  assert "train.csv:3: expected 19 fields" in report
  assert "train.csv:4: " in report and "non-numeric value 'maybe'" in report
  assert "train.csv:5: labels must be 1.0, 0.0, -1.0 or blank" in report
