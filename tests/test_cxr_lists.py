"""Image folder + label list builders: the phantom, ChestX-ray14 (both), Shenzhen."""

import numpy as np
import pytest

from medbench_jax.data import splits
from medbench_jax.data.prepare import cxr_lists
from medbench_jax.data.prepare import phantom
from medbench_jax.data.prepare.errors import DataFormatError
from tests import layouts


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
  import cv2
  example = phantom_builder.as_data_source("test")[0]
  png = cv2.imread(str(phantom_dir / "images" / example["name"].decode()), cv2.IMREAD_GRAYSCALE)
  expected = cv2.resize(png, (64, 64), interpolation=cv2.INTER_AREA)
  np.testing.assert_array_equal(example["image"][..., 0], expected)


def test_missing_image_names_list_line(tmp_path):
  for split in ("train", "val", "test"):
    (tmp_path / f"phantom_{split}.txt").write_text("missing.png 0 0 0 0\n")
  with pytest.raises(DataFormatError, match=r"phantom_train.txt:1: image file .*missing.png"):
    layouts.prepare_layout("phantom_cxr", tmp_path, tmp_path / "out", 32)


def test_missing_split_list_says_what_to_provide(tmp_path):
  with pytest.raises(DataFormatError, match="Xray14_train_official.txt"):
    layouts.prepare_layout("chestxray14", tmp_path, tmp_path / "out", 32)


def test_chestxray14_official_lists_with_nih_archive_folders(tmp_path):
  manual = tmp_path / "cxr14"
  rows = {"train": [("00000001_000.png", 3), ("00000001_001.png", 13)],
          "val": [("00000002_000.png", None)], "test": [("00000003_000.png", 0)]}
  expected = {}
  for k, (split, entries) in enumerate(rows.items()):
    lines = []
    for j, (name, positive) in enumerate(entries):
      labels = np.zeros(14, np.float32)
      if positive is not None:
        labels[positive] = 1
      lines.append(name + " " + " ".join(str(int(v)) for v in labels))
      # Split across two archive folders, as NIH's tarballs extract.
      layouts.image(manual / f"images_00{k % 2 + 1}" / "images" / name, 10 + 20 * k + 10 * j)
      expected.setdefault(split, {})[name] = (10 + 20 * k + 10 * j, labels)
    (manual / f"Xray14_{split}_official.txt").write_text("\n".join(lines) + "\n")
  builder = layouts.prepare_layout("chestxray14", manual, tmp_path)
  for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
    layouts.assert_labels(layouts.read_split(builder, tfds_split), expected[split])
  assert builder.label_table("train")["patient"].tolist() == ["1", "1"]


NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]


def _nih_row(name, findings, patient):
  return [name, findings, "0", str(patient), "58", "M", "PA", "2682", "2749", "0.143", "0.143"]


def test_chestxray14_nih_csv_and_lists(tmp_path):
  manual = tmp_path / "nih"
  findings = {}
  rows = []
  for patient in range(1, 41):
    for follow_up in range(2):
      name = f"{patient:08d}_{follow_up:03d}.png"
      text = ["No Finding", "Cardiomegaly|Emphysema", "Hernia", "Pleural_Thickening|Mass"][
          (patient + follow_up) % 4]
      findings[name] = text
      rows.append(_nih_row(name, text, patient))
      layouts.image(manual / "images" / name, patient * 5)
  # NIH's header ends with a comma; its rows do not.
  layouts.write_csv(manual / "Data_Entry_2017.csv", NIH_HEADER, rows, trailing_comma=True)
  names = sorted(findings)
  test_names = [n for n in names if int(n[:8]) > 32]
  (manual / "train_val_list.txt").write_text(
      "\n".join(n for n in names if n not in test_names) + "\n")
  (manual / "test_list.txt").write_text("\n".join(test_names) + "\n")
  builder = layouts.prepare_layout("chestxray14_nih", manual, tmp_path)
  got = {s: layouts.read_split(builder, s) for s in splits.SPLITS}
  assert sorted(got["test"]) == test_names
  assert len(got["train"]) + len(got["validation"]) == len(names) - len(test_names)
  assert got["validation"], "a validation split is held out of train_val"
  for split_examples in got.values():
    for name, (level, labels) in split_examples.items():
      assert abs(level - int(name[:8]) * 5) <= 2
      positives = {cxr_lists.CXR14_LABELS[i] for i in np.flatnonzero(labels)}
      assert positives == set(findings[name].split("|")) - {"No Finding"}
  patients = {s: set(builder.label_table(s)["patient"]) for s in splits.SPLITS}
  assert not patients["train"] & patients["validation"]


def test_shenzhen_lists_as_published(tmp_path):
  manual = tmp_path / "shenzhen"
  expected = {}
  for k, (split, list_name) in enumerate([("train", "ShenzenCXR_train_data.txt"),
                                          ("validation", "ShenzenCXR_valid_data.txt"),
                                          ("test", "ShenzenCXR_test_data.txt")]):
    lines = []
    for tb in (0, 1):
      name = f"CHNCXR_{k * 2 + tb + 1:04d}_{tb}.png"
      lines.append(f"{name},{tb}")
      layouts.image(manual / "CXR_png" / name, 30 + 60 * k + 30 * tb)
      expected.setdefault(split, {})[name] = (30 + 60 * k + 30 * tb,
                                              np.array([tb], np.float32))
    (manual / list_name).write_text("\n".join(lines) + "\n")
  builder = layouts.prepare_layout("shenzhen_cxr", manual, tmp_path)
  for split in splits.SPLITS:
    layouts.assert_labels(layouts.read_split(builder, split), expected[split])
