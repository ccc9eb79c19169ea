"""TFDS builders: official list format in, ArrayRecord out, errors naming file and line."""

import numpy as np
import pytest

from medbench_jax.data import builders
from medbench_jax.data import chexpert
from medbench_jax.data import medmnist
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


# ------------------------------------------------------------------ miniature layouts
# Every image is one flat grey level that identifies its example, so a test can tell
# which stored image belongs to which labels.

import csv  # noqa: E402
import gzip  # noqa: E402
import pathlib  # noqa: E402

import cv2  # noqa: E402


def _image(path: pathlib.Path, value: int, shape=(40, 48)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))


def _csv(path: pathlib.Path, header, rows, *, gz=False, trailing_comma=False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
    f.write(",".join(header) + ("," if trailing_comma else "") + "\n")
    csv.writer(f, lineterminator="\n").writerows(rows)


def _prepare(name, manual_dir, tmp_path, size=16, **kw):
  return builders.prepare(name, manual_dir, tmp_path / "tfds", size, workers=1, **kw)


def _read(builder, split):
  """name -> (grey level, labels) of a prepared split."""
  source = builder.as_data_source(split)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    out[ex["name"].decode()] = (int(round(float(ex["image"].mean()))), ex["labels"])
  return out


def _assert_labels(got, expected):
  assert sorted(got) == sorted(expected)
  for name, (level, labels) in expected.items():
    assert abs(got[name][0] - level) <= 2, name
    np.testing.assert_array_equal(got[name][1], labels, err_msg=name)


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
      _image(manual / f"images_00{k % 2 + 1}" / "images" / name, 10 + 20 * k + 10 * j)
      expected.setdefault(split, {})[name] = (10 + 20 * k + 10 * j, labels)
    (manual / f"Xray14_{split}_official.txt").write_text("\n".join(lines) + "\n")
  builder = _prepare("chestxray14", manual, tmp_path)
  for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
    _assert_labels(_read(builder, tfds_split), expected[split])
  assert builders.label_table(builder, "train")["patient"].tolist() == ["1", "1"]


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
      _image(manual / "images" / name, patient * 5)
  # NIH's header ends with a comma; its rows do not.
  _csv(manual / "Data_Entry_2017.csv", NIH_HEADER, rows, trailing_comma=True)
  names = sorted(findings)
  test_names = [n for n in names if int(n[:8]) > 32]
  (manual / "train_val_list.txt").write_text(
      "\n".join(n for n in names if n not in test_names) + "\n")
  (manual / "test_list.txt").write_text("\n".join(test_names) + "\n")
  builder = _prepare("chestxray14_nih", manual, tmp_path)
  got = {s: _read(builder, s) for s in builders.SPLITS}
  assert sorted(got["test"]) == test_names
  assert len(got["train"]) + len(got["validation"]) == len(names) - len(test_names)
  assert got["validation"], "a validation split is held out of train_val"
  for split_examples in got.values():
    for name, (level, labels) in split_examples.items():
      assert abs(level - int(name[:8]) * 5) <= 2
      positives = {builders.CXR14_LABELS[i] for i in np.flatnonzero(labels)}
      assert positives == set(findings[name].split("|")) - {"No Finding"}
  patients = {s: set(builders.label_table(builder, s)["patient"]) for s in builders.SPLITS}
  assert not patients["train"] & patients["validation"]


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(
    chexpert.CHEXPERT_LABELS)


def _chexpert_layout(root: pathlib.Path, release="CheXpert-v1.0-small"):
  """train.csv: 40 patients x (frontal + lateral); valid.csv: 2 patients."""
  expected, rng = {}, np.random.default_rng(0)
  for csv_name, folder, patients in (("train.csv", "train", range(1, 41)),
                                     ("valid.csv", "valid", range(64541, 64543))):
    rows = []
    for p in patients:
      for view, kind in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
        path = f"{release}/{folder}/patient{p:05d}/study1/{view}.jpg"
        values = rng.choice(["1.0", "0.0", "-1.0", ""], size=14)
        rows.append([path, "Female", "68", kind, "AP" if kind == "Frontal" else ""]
                    + list(values))
        level = (len(expected) * 7) % 250
        _image(root / release / folder / f"patient{p:05d}" / "study1" / f"{view}.jpg",
               level)
        expected[path] = (level, np.array([float(v) if v else np.nan for v in values],
                                          np.float32), kind == "Frontal")
    _csv(root / release / csv_name, CHEXPERT_HEADER, rows)
  return expected


def test_chexpert_keeps_raw_labels_views_and_patients(tmp_path):
  expected = _chexpert_layout(tmp_path / "chexpert")
  builder = _prepare("chexpert", tmp_path / "chexpert", tmp_path)
  seen = {}
  for split in builders.SPLITS:
    table = builders.label_table(builder, split)
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
  expected = _chexpert_layout(tmp_path / "x")
  (tmp_path / "x" / "CheXpert-v1.0-small").rename(tmp_path / "my_chexpert")
  builder = _prepare("chexpert", tmp_path / "my_chexpert", tmp_path)
  assert sum(len(builder.as_data_source(s)) for s in builders.SPLITS) == len(expected)


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
      _image(manual / relative, 20 + 40 * k + 20 * j)
      expected[relative] = (20 + 40 * k + 20 * j, labels, view == "PA",
                            {"validate": "validation"}.get(split, split))
  _csv(manual / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_HEADER, label_rows, gz=True)
  _csv(manual / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                                  "split"], split_rows, gz=True)
  _csv(manual / "mimic-cxr-2.0.0-metadata.csv.gz", [
      "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
      "ViewPosition", "Rows", "Columns"], meta_rows, gz=True)
  builder = _prepare("mimic_cxr_jpg", manual, tmp_path)
  for split in builders.SPLITS:
    table = builders.label_table(builder, split)
    source = builder.as_data_source(split)
    for i in range(len(source)):
      level, labels, frontal, want_split = expected[source[i]["name"].decode()]
      assert want_split == split
      assert abs(float(source[i]["image"].mean()) - level) <= 2
      np.testing.assert_array_equal(table["labels"][i], labels)
      assert table["frontal"][i] == frontal
  assert sum(len(builder.as_data_source(s)) for s in builders.SPLITS) == len(expected)
  assert builder.info.metadata["views_known"] is True


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
      _image(manual / "CXR_png" / name, 30 + 60 * k + 30 * tb)
      expected.setdefault(split, {})[name] = (30 + 60 * k + 30 * tb,
                                              np.array([tb], np.float32))
    (manual / list_name).write_text("\n".join(lines) + "\n")
  builder = _prepare("shenzhen_cxr", manual, tmp_path)
  for split in builders.SPLITS:
    _assert_labels(_read(builder, split), expected[split])


def _medmnist(path: pathlib.Path, labels_of, rgb=False, side=28, sizes=(6, 3, 4)):
  arrays, expected = {}, {}
  for key, n in zip(("train", "val", "test"), sizes):
    levels = (np.arange(n) * 20 + {"train": 5, "val": 10, "test": 15}[key]) % 250
    shape = (n, side, side, 3) if rgb else (n, side, side)
    images = np.broadcast_to(levels.reshape((n,) + (1,) * (len(shape) - 1)),
                             shape).astype(np.uint8).copy()
    if rgb:
      images[..., 0] = 0  # red off: catches channel-order mistakes
    labels = np.array([labels_of(i) for i in range(n)], np.uint8)  # as medmnist ships them
    arrays[f"{key}_images"], arrays[f"{key}_labels"] = images, labels
    expected[key] = (images, labels)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  return expected


@pytest.mark.parametrize("flag,labels_of,onehot", [
    ("chestmnist", lambda i: [(i + j) % 3 == 0 for j in range(14)], False),
    ("pneumoniamnist", lambda i: [i % 2], False),
    ("organamnist", lambda i: [i % 11], True),
])
def test_medmnist_npz(tmp_path, flag, labels_of, onehot):
  expected = _medmnist(tmp_path / "mm" / f"{flag}.npz", labels_of)
  builder = _prepare(f"medmnist_{flag}", tmp_path / "mm", tmp_path, size=28)
  for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
    images, labels = expected[key]
    source = builder.as_data_source(split)
    assert len(source) == len(images)
    for i in range(len(source)):
      np.testing.assert_array_equal(source[i]["image"][..., 0], images[i])
      want = np.eye(11)[labels[i][0]] if onehot else labels[i]
      np.testing.assert_array_equal(source[i]["labels"], want)
  assert builder.info.metadata["task"] == medmnist.MEDMNIST[flag].task


def test_medmnist_plus_rgb_picks_the_size_file(tmp_path):
  _medmnist(tmp_path / "mm" / "pathmnist.npz", lambda i: [i % 9], rgb=True)
  expected = _medmnist(tmp_path / "mm" / "pathmnist_64.npz", lambda i: [i % 9], rgb=True,
                       side=64)
  builder = _prepare("medmnist_pathmnist", tmp_path / "mm", tmp_path, size=64)
  image = builder.as_data_source("test")[1]["image"]
  assert image.shape == (64, 64, 3)
  np.testing.assert_array_equal(image, expected["test"][0][1])  # RGB order kept


# ------------------------------------------------------------------ problems, resume


def _broken_phantom(tmp_path):
  """A phantom copy with one problem of every kind, each on a known line."""
  from medbench_jax.data import phantom as phantom_lib  # pylint: disable=g-import-not-at-top
  manual = tmp_path / "broken"
  phantom_lib.generate(manual, seed=1, num_train=8, num_val=3, num_test=3, image_size=32)
  train = (manual / "phantom_train.txt").read_text().splitlines()
  names = [line.split()[0] for line in train]
  (manual / "images" / names[1]).unlink()  # line 2: missing
  data = (manual / "images" / names[2]).read_bytes()
  (manual / "images" / names[2]).write_bytes(data[:len(data) // 2])  # line 3: truncated
  (manual / "images" / names[3]).write_bytes(b"not an image at all")  # line 4
  train[4] = names[4] + " 0 1"  # line 5: too few fields
  train[5] = names[5] + " 0 1 x 0"  # line 6: not a number
  (manual / "phantom_train.txt").write_text("\n".join(train) + "\n")
  return manual


def test_one_report_lists_every_problem_with_file_and_line(tmp_path):
  manual = _broken_phantom(tmp_path)
  with pytest.raises(builders.DataFormatError) as e:
    _prepare("phantom_cxr", manual, tmp_path)
  report = str(e.value)
  assert "5 data problem(s)" in report
  for line, message in [(2, "not found in"), (3, "truncated PNG"),
                        (4, "cannot decode"), (5, "expected an image name and 4 labels"),
                        (6, "labels must be numbers")]:
    assert f"phantom_train.txt:{line}: " in report and message in report, (line, message)
  assert not builders.get_builder("phantom_cxr", 16, tmp_path / "tfds").is_prepared()


def test_skip_bad_prepares_the_rest_and_counts(tmp_path):
  manual = _broken_phantom(tmp_path)
  builder = _prepare("phantom_cxr", manual, tmp_path, skip_bad=True)
  assert len(builder.as_data_source("train")) == 3
  assert builder.info.metadata["skipped"] == {"train": 5, "validation": 0, "test": 0}
  summary = builders.split_summaries(builder)
  assert [(s["split"], s["examples"], s["skipped"]) for s in summary] == [
      ("train", 3, 5), ("validation", 3, 0), ("test", 3, 0)]


def test_missing_csv_column_and_bad_values_are_reported(tmp_path):
  manual = tmp_path / "c" / "CheXpert-v1.0-small"
  header = CHEXPERT_HEADER
  row = ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Male", "50",
         "Frontal", "PA"] + ["0.0"] * 14
  _image(manual / "train/patient00001/study1/view1_frontal.jpg", 9)
  _csv(manual / "train.csv", header, [row, row[:-1], row[:-1] + ["maybe"],
                                      row[:-1] + ["2.0"]])
  _csv(manual / "valid.csv", header[:-1], [row[:-1]])
  with pytest.raises(builders.DataFormatError) as e:
    _prepare("chexpert", tmp_path / "c", tmp_path)
  report = str(e.value)
  assert "valid.csv:1: missing column(s) ['Support Devices']" in report
  assert "train.csv:3: expected 19 fields" in report
  assert "train.csv:4: " in report and "non-numeric value 'maybe'" in report
  assert "train.csv:5: labels must be 1.0, 0.0, -1.0 or blank" in report


def test_patient_check_warns_for_official_splits_and_fails_for_made_ones():
  patients = {"train": ["1", "2"], "validation": ["3"], "test": ["2", "4"]}
  warnings = builders.check_patients(patients, official=("train", "validation", "test"))
  assert len(warnings) == 1 and "'train' and 'test'" in warnings[0]
  with pytest.raises(builders.DataFormatError, match="1 patient.*'train' and 'test'"):
    builders.check_patients(patients, official=("validation", "test"))
  assert builders.check_patients({"train": ["1", ""], "test": ["", "2"]}, ()) == []


def test_finished_preparation_is_reused_and_interrupted_one_restarts(tmp_path, phantom_dir):
  builder = builders.get_builder("phantom_cxr", 16, tmp_path / "tfds")
  data_path = pathlib.Path(builder.data_path)
  stale = data_path.parent / f"incomplete.ABC123_{data_path.name}"
  stale.mkdir(parents=True)
  (stale / "train.scratch").write_bytes(b"left by a killed run")
  builder = _prepare("phantom_cxr", phantom_dir, tmp_path)
  assert not stale.exists() and builder.is_prepared()
  assert not list(data_path.glob("*.scratch"))
  stamp = (data_path / "dataset_info.json").stat().st_mtime_ns
  again = builders.prepare("phantom_cxr", tmp_path / "no_such_dir", tmp_path / "tfds", 16)
  assert (data_path / "dataset_info.json").stat().st_mtime_ns == stamp
  assert len(again.as_data_source("train")) == 96


def test_process_pool_stores_the_same_bytes(tmp_path, phantom_dir, phantom_builder,
                                            monkeypatch):
  monkeypatch.setattr(builders, "POOL_MIN_RECORDS", 0)
  pooled = builders.prepare("phantom_cxr", phantom_dir, tmp_path / "pool", 64, workers=2)
  for split in builders.SPLITS:
    a, b = pooled.as_data_source(split), phantom_builder.as_data_source(split)
    assert len(a) == len(b)
    for i in range(0, len(a), 7):
      np.testing.assert_array_equal(a[i]["image"], b[i]["image"])


def _csv_folder(manual, *, patient_of=lambda i: f"P{i}"):
  rows, expected = [], {}
  for i in range(9):
    split = ("train", "val", "test")[i % 3]
    path = f"sub{i % 2}/img_{i}.png"
    labels = np.array([i % 2, (i // 2) % 2], np.float32)
    rows.append([path, str(labels[0]), str(int(labels[1])), split, patient_of(i)])
    _image(manual / "pics" / path, 20 + 25 * i)
    expected.setdefault({"val": "validation"}.get(split, split), {})[path] = (
        20 + 25 * i, labels)
  return rows, expected


CSV_OPTIONS = dict(csv="labels.csv", image_dir="pics", path_column="file",
                   labels="Effusion,Nodule", split_column="split", patient_column="patient")


def test_csv_folder_with_a_split_column(tmp_path):
  rows, expected = _csv_folder(tmp_path / "m")
  _csv(tmp_path / "m" / "labels.csv", ["file", "Effusion", "Nodule", "split", "patient"], rows)
  builder = builders.prepare("csv_folder", tmp_path / "m", tmp_path / "tfds", 16, workers=1,
                             options=CSV_OPTIONS)
  assert builder.info.metadata["label_names"] == ["Effusion", "Nodule"]
  for split in builders.SPLITS:
    _assert_labels(_read(builder, split), expected[split])


def test_csv_folder_with_one_csv_per_split(tmp_path):
  rows, expected = _csv_folder(tmp_path / "m")
  for split, short in (("train", "train"), ("validation", "val"), ("test", "test")):
    _csv(tmp_path / "m" / f"{split}.csv", ["file", "Effusion", "Nodule"],
         [r[:3] for r in rows if r[3] == short])
  options = dict(CSV_OPTIONS, csv="{split}.csv", split_column="", patient_column="")
  builder = builders.prepare("csv_folder", tmp_path / "m", tmp_path / "tfds", 16, workers=1,
                             options=options)
  for split in builders.SPLITS:
    _assert_labels(_read(builder, split), expected[split])


def test_csv_folder_patient_in_two_user_splits_is_an_error(tmp_path):
  rows, _ = _csv_folder(tmp_path / "m", patient_of=lambda i: f"P{i // 2}")
  _csv(tmp_path / "m" / "labels.csv", ["file", "Effusion", "Nodule", "split", "patient"], rows)
  with pytest.raises(builders.DataFormatError, match="Patient-level leakage"):
    builders.prepare("csv_folder", tmp_path / "m", tmp_path / "tfds", 16, workers=1,
                     options=CSV_OPTIONS)


def test_options_are_checked():
  with pytest.raises(ValueError, match="takes no options"):
    builders.get_builder("chexpert", 16, "/tmp", {"labels": "A"})
  with pytest.raises(ValueError, match="Unknown csv option.*'colour'"):
    builders.get_builder("csv_folder", 16, "/tmp", {"labels": "A", "colour": 1})
  with pytest.raises(ValueError, match="must name the label columns"):
    builders.get_builder("csv_folder", 16, "/tmp", {})
