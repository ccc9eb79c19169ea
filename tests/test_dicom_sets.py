"""VinDr-CXR and RSNA Pneumonia builders on miniature copies of their layouts."""

import csv

import numpy as np
import pytest

from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare import dicom_sets
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.splits import SPLITS
from tests import dicom_files
from tests import layouts


def _by_name(builder, split):
  source = builder.as_data_source(split)
  return {source[i]["name"].decode(): source[i] for i in range(len(source))}


def _write_csv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


# ---------------------------------------------------------------- VinDr-CXR


def _vindr(root, rng, num_train=30):
  """Train: 3 readers per image with random votes; test: one row per image."""
  root = root / "vindr-cxr" / "1.0.0"
  votes, rows = {}, []
  for i in range(num_train):
    image_id = f"{i:032x}"
    votes[image_id] = (rng.random((3, len(dicom_sets.VINDR_LABELS))) < 0.4).astype(int)
    rows += [[image_id, f"R{r + 1}", *votes[image_id][r]] for r in range(3)]
    # 12-bit, with MONOCHROME1 on every third file.
    dicom_files.write(root / "train" / f"{image_id}.dicom",
                      rng.integers(0, 4096, (24, 24), dtype=np.uint16),
                      photometric="MONOCHROME1" if i % 3 == 0 else "MONOCHROME2", bits=12)
  _write_csv(root / "annotations" / "image_labels_train.csv",
             ["image_id", "rad_id", *dicom_sets.VINDR_LABELS], rows)
  test = {f"{i:032x}": rng.integers(0, 2, len(dicom_sets.VINDR_LABELS))
          for i in range(100, 104)}
  for image_id in test:
    dicom_files.write(root / "test" / f"{image_id}.dicom",
                      rng.integers(0, 256, (24, 24), dtype=np.uint8))
  _write_csv(root / "annotations" / "image_labels_test.csv",
             ["image_id", *dicom_sets.VINDR_LABELS], [[k, *v] for k, v in test.items()])
  return root, votes, test


def test_vindr_aggregation_policies_and_official_test(tmp_path):
  root, votes, test = _vindr(tmp_path / "raw", np.random.default_rng(0))
  expected = {"vindr_cxr": lambda v: v.sum(0) >= 2, "vindr_cxr_any": lambda v: v.sum(0) >= 1,
              "vindr_cxr_all": lambda v: v.sum(0) == 3}
  split_members = []
  for name, policy in expected.items():
    builder = layouts.prepare_layout(name, tmp_path / "raw", tmp_path)
    assert builder.info.metadata["label_names"] == list(dicom_sets.VINDR_LABELS)
    examples = {s: _by_name(builder, s) for s in SPLITS}
    split_members.append({s: sorted(e) for s, e in examples.items()})
    assert sorted(examples["test"]) == sorted(test)
    assert examples["validation"] and sorted(
        [*examples["train"], *examples["validation"]]) == sorted(votes)
    for image_id, v in votes.items():
      example = examples["train"].get(image_id) or examples["validation"][image_id]
      np.testing.assert_array_equal(example["labels"], policy(v).astype(np.float32))
    for image_id, labels in test.items():
      np.testing.assert_array_equal(examples["test"][image_id]["labels"], labels)
  # Every policy splits the same images the same way.
  assert split_members[0] == split_members[1] == split_members[2]
  image_id = next(iter(votes))  # file 0 is MONOCHROME1
  stored = (_by_name(builder, "train") | _by_name(builder, "validation"))[image_id]["image"]
  np.testing.assert_array_equal(stored, dicom.load_gray(root / "train" / f"{image_id}.dicom",
                                                        16))


def test_vindr_bad_rows_name_file_and_line(tmp_path):
  root, _, test = _vindr(tmp_path / "raw", np.random.default_rng(1))
  path = root / "annotations" / "image_labels_train.csv"
  lines = path.read_text().splitlines()
  lines[2] = lines[2].rsplit(",", 1)[0] + ",2"  # a vote of 2 on line 3
  path.write_text("\n".join(lines) + "\n")
  first_test = next(iter(test))
  with open(root / "annotations" / "image_labels_test.csv", "a", newline="") as f:
    csv.writer(f).writerow([first_test, *[0] * len(dicom_sets.VINDR_LABELS)])
  with pytest.raises(DataFormatError) as error:
    layouts.prepare_layout("vindr_cxr", tmp_path / "raw", tmp_path)
  message = str(error.value)
  assert "image_labels_train.csv:3: labels must be 0 or 1; columns ['No finding']" in message
  assert f"image_labels_test.csv:6: {first_test} has several rows" in message


def test_vindr_missing_annotations_say_what_to_provide(tmp_path):
  with pytest.raises(DataFormatError, match=r"expected one image_labels_train.csv "
                                                     r"below it, found none.*PhysioNet"):
    layouts.prepare_layout("vindr_cxr", tmp_path, tmp_path)


# ---------------------------------------------------------------- RSNA Pneumonia


def _rsna(root, rng, count=40):
  """Lung Opacity patients have two boxes (two rows in both CSVs), others one row."""
  label_rows, class_rows, classes = [], [], {}
  for i in range(count):
    patient = f"{i:08x}-0000-4000-8000-{i:012x}"
    kind = dicom_sets.RSNA_CLASSES[i % 3]
    classes[patient] = kind
    boxes = 2 if kind == "Lung Opacity" else 1
    for b in range(boxes):
      if kind == "Lung Opacity":
        label_rows.append([patient, 100 + b, 200, 50, 60, 1])
      else:
        label_rows.append([patient, "", "", "", "", 0])
      class_rows.append([patient, kind])
    dicom_files.write(root / "stage_2_train_images" / f"{patient}.dcm",
                      rng.integers(0, 256, (20, 20), dtype=np.uint8), patient=patient)
  _write_csv(root / "stage_2_train_labels.csv",
             ["patientId", "x", "y", "width", "height", "Target"], label_rows)
  _write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], class_rows)
  return classes


def test_rsna_three_class_and_binary_share_patient_splits(tmp_path):
  classes = _rsna(tmp_path / "raw", np.random.default_rng(2))
  three = layouts.prepare_layout("rsna_pneumonia", tmp_path / "raw", tmp_path)
  binary = layouts.prepare_layout("rsna_pneumonia_binary", tmp_path / "raw", tmp_path)
  assert three.info.metadata["task"] == "multi-class"
  assert binary.info.metadata["label_names"] == ["Lung Opacity"]
  members = {}
  for builder in (three, binary):
    examples = {s: _by_name(builder, s) for s in SPLITS}
    assert all(examples.values())
    members[builder.name] = {s: sorted(e) for s, e in examples.items()}
    assert sorted(n for e in examples.values() for n in e) == sorted(classes)
    for split_examples in examples.values():
      for patient, example in split_examples.items():
        expected = [classes[patient] == label for label in builder.LABELS]
        np.testing.assert_array_equal(example["labels"], np.float32(expected))
  assert members["rsna_pneumonia"] == members["rsna_pneumonia_binary"]
  table = three.label_table("test")
  assert set(table["patient"]) == set(members["rsna_pneumonia"]["test"])


def test_rsna_contradicting_rows_are_reported_and_skippable(tmp_path):
  classes = _rsna(tmp_path / "raw", np.random.default_rng(3))
  normal = next(p for p, k in classes.items() if k == "Normal")
  with open(tmp_path / "raw" / "stage_2_train_labels.csv", "a", newline="") as f:
    csv.writer(f).writerow([normal, 1, 2, 3, 4, 1])
  with pytest.raises(DataFormatError, match=r"stage_2_train_labels.csv:\d+: Target "
                                                     r"'1' contradicts '0'"):
    layouts.prepare_layout("rsna_pneumonia", tmp_path / "raw", tmp_path)
  # The contradicting row is dropped; the patient's first, consistent row stays.
  builder = layouts.prepare_layout("rsna_pneumonia", tmp_path / "raw", tmp_path, skip_bad=True)
  assert builder.info.metadata["skipped"]["train"] == 1
  assert sum(len(builder.as_data_source(s)) for s in SPLITS) == len(classes)
