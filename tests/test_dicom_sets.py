"""VinDr-CXR and RSNA Pneumonia builders on miniature copies of their layouts."""

import csv

import numpy as np
import pytest

from medbench_jax.data import splits as splits_lib
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


# ---------------------------------------------------------------- the study's lists

# The first lines of the study's published lists (dataset/ of BenchmarkTransformers).
VINDR_STUDY_TRAIN = [
    ("train_jpeg/000434271f63a053c4128a0ba6352c7f", [0, 0, 0, 0, 0, 1]),
    ("train_jpeg/00053190460d56c53cc3e57321387478", [0, 0, 0, 0, 0, 1]),
    ("train_jpeg/0005e8e3701dfb1dd93d53e2ff537b6e", [0, 1, 1, 1, 0, 0])]
VINDR_STUDY_TEST = [
    ("test_jpeg/e0dc2e79105ad93532484e956ef8a71a", [1, 0, 1, 0, 1, 0]),
    ("test_jpeg/0aed23e64ebdea798486056b4f174424", [1, 0, 1, 0, 0, 0]),
    ("test_jpeg/aa15cfcfca7605465ca0513902738b95", [0, 0, 0, 1, 0, 0])]
RSNA_STUDY = {
    "train": [("2ae02282-0394-4795-8de1-23039b6cdcba.png", 0),
              ("9a735bd1-ea0d-4cde-adaa-4d5e407a87ac.png", 0),
              ("053f237f-c835-4067-8a74-a0b7641bdaca.png", 0)],
    "validation": [("d398a439-a18d-4f05-a2c8-1487e561a47e.png", 0),
                   ("a4a90296-f230-475f-b396-a828e3a53baf.png", 0)],
    "test": [("d3dad6bb-8d1a-4542-823a-ba12bf6a5124.png", 0),
             ("7f91ccc0-e863-4d57-b346-f96059772e7a.png", 0)]}


def _write_list(path, lines, ending="\n"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes("".join(line + ending for line in lines).encode())


def _vindr_study(root, rng, extra=24):
  """The lists' first lines plus `extra` generated train images; every other train
  image as the study's JPEG, the rest (and the test set) as the original DICOM."""
  train = VINDR_STUDY_TRAIN + [(f"train_jpeg/{i:032x}", list(rng.integers(0, 2, 6)))
                               for i in range(extra)]
  stored = {}  # image id -> the image a 16 px copy must hold
  for i, (name, _) in enumerate(train + VINDR_STUDY_TEST):
    folder, image_id = name.split("/")
    if i % 2 == 0 and folder == "train_jpeg":
      layouts.image(root / f"{name}.jpeg", 20 + 7 * i, shape=(30, 40))
      stored[image_id] = np.full((16, 16, 1), 20 + 7 * i, np.uint8)
    else:
      path = dicom_files.write(root / folder.removesuffix("_jpeg") / f"{image_id}.dicom",
                               rng.integers(0, 256, (30, 40), dtype=np.uint8))
      stored[image_id] = dicom.load_gray(path, 16)
  # As published: a space before Windows line endings.
  for list_name, rows in (("VinDrCXR_train_pe_global_one.txt", train),
                          ("VinDrCXR_test_pe_global_one.txt", VINDR_STUDY_TEST)):
    lines = [f"{n} {' '.join(map(str, labels))} " for n, labels in rows]
    _write_list(root / list_name, lines, "\r\n")
  return train, stored


def test_vindr_study_lists_jpegs_or_dicoms_and_vindr_cxr_validation(tmp_path):
  train, stored = _vindr_study(tmp_path / "raw", np.random.default_rng(4))
  builder = layouts.prepare_layout("vindr_cxr_study", tmp_path / "raw", tmp_path)
  assert builder.info.metadata["label_names"] == list(dicom_sets.VINDR_STUDY_LABELS)
  examples = {s: _by_name(builder, s) for s in SPLITS}
  ids = [name.split("/")[1] for name, _ in train]
  assert len(examples["train"]) + len(examples["validation"]) == len(train)
  assert sorted(examples["test"]) == sorted(n.split("/")[1] for n, _ in VINDR_STUDY_TEST)
  # No validation list in the study: the images vindr_cxr holds out, by the hash rule.
  held_out = splits_lib.assign(ids, [dicom_sets.VindrCxr.VALIDATION])
  assert sorted(examples["validation"]) == sorted(i for i in ids
                                                  if held_out[i] == "validation")
  assert examples["validation"]
  for name, labels in train + VINDR_STUDY_TEST:
    image_id = name.split("/")[1]
    example = next(e[image_id] for e in examples.values() if image_id in e)
    np.testing.assert_array_equal(example["labels"], np.float32(labels))
    # JPEG is lossy: a grey level may move by one or two.
    np.testing.assert_allclose(example["image"], stored[image_id], atol=2, err_msg=image_id)


def test_vindr_study_missing_image_and_bad_label_name_file_and_line(tmp_path):
  _vindr_study(tmp_path / "raw", np.random.default_rng(5), extra=0)
  (tmp_path / "raw" / "train_jpeg" / "000434271f63a053c4128a0ba6352c7f.jpeg").unlink()
  lists = tmp_path / "raw" / "VinDrCXR_test_pe_global_one.txt"
  lines = lists.read_bytes().decode().split("\r\n")
  lines[1] = lines[1].replace(" 1 0 1 0 0 0", " 1 0 2 0 0 0")
  lists.write_bytes("\r\n".join(lines).encode())
  with pytest.raises(DataFormatError) as error:
    layouts.prepare_layout("vindr_cxr_study", tmp_path / "raw", tmp_path)
  message = str(error.value)
  assert ("VinDrCXR_train_pe_global_one.txt:1: image not found; looked for "
          f"{tmp_path}/raw/train_jpeg/000434271f63a053c4128a0ba6352c7f.jpeg and "
          f"{tmp_path}/raw/train/000434271f63a053c4128a0ba6352c7f.dicom") in message
  assert "VinDrCXR_test_pe_global_one.txt:2: labels must be 0 or 1" in message


def _rsna_study(root, rng, extra=6):
  """The lists' first lines (plus generated lines of every class): PNGs in a folder of
  the user's naming for even lines, the competition's DICOMs for odd ones."""
  lists = {split: rows + [(f"{split[:3]}{i:05d}-0000-4000-8000-{i:012x}.png", i % 3)
                          for i in range(extra)] for split, rows in RSNA_STUDY.items()}
  stored, n = {}, 0  # patient -> the image a 16 px copy must hold
  for rows in lists.values():
    for name, _ in rows:
      patient = name.removesuffix(".png")
      if n % 2 == 0:
        layouts.image(root / "pngs" / name, 30 + 5 * n, shape=(32, 32))
        stored[patient] = np.full((16, 16, 1), 30 + 5 * n, np.uint8)
      else:
        path = dicom_files.write(root / "stage_2_train_images" / f"{patient}.dcm",
                                 rng.integers(0, 256, (32, 32), dtype=np.uint8),
                                 patient=patient)
        stored[patient] = dicom.load_gray(path, 16)
      n += 1
  files = {"train": "RSNAPneumonia_train.txt", "validation": "RSNAPneumonia_val.txt",
           "test": "RSNAPneumonia_test.txt"}
  for split, rows in lists.items():
    _write_list(root / files[split], [f"{name} {label}" for name, label in rows])
  return lists, stored


def test_rsna_study_lists_pngs_or_dicoms_one_hot(tmp_path):
  lists, stored = _rsna_study(tmp_path / "raw", np.random.default_rng(6))
  builder = layouts.prepare_layout("rsna_pneumonia_study", tmp_path / "raw", tmp_path)
  assert builder.info.metadata["task"] == "multi-class"
  assert builder.info.metadata["label_names"] == list(dicom_sets.RSNA_CLASSES)
  for split, rows in lists.items():
    examples = _by_name(builder, split)
    assert len(examples) == len(rows)
    for name, label in rows:
      example = examples[name.removesuffix(".png")]
      np.testing.assert_array_equal(example["labels"], np.eye(3, dtype=np.float32)[label])
      np.testing.assert_array_equal(example["image"], stored[name.removesuffix(".png")])


def test_rsna_study_bad_class_names_file_and_line(tmp_path):
  _rsna_study(tmp_path / "raw", np.random.default_rng(7), extra=0)
  with open(tmp_path / "raw" / "RSNAPneumonia_val.txt", "a") as f:
    f.write("d398a439-a18d-4f05-a2c8-1487e561a47e.png 3\n")
  with pytest.raises(DataFormatError, match=r"RSNAPneumonia_val.txt:3: class must be one "
                                            r"of \[0, 1, 2\] \(Normal, .*got 3"):
    layouts.prepare_layout("rsna_pneumonia_study", tmp_path / "raw", tmp_path)
