"""Chest X-ray sets published as an image folder and label lists: the phantom,
ChestX-ray14 (the study's lists, or NIH's CSV and lists) and Shenzhen."""

from __future__ import annotations

import numpy as np

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare import phantom
from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.images import ImageIndex
from medbench_jax.data.prepare.parsing import read_csv
from medbench_jax.data.prepare.parsing import read_label_list
from medbench_jax.data.prepare.parsing import Record


class ListClassificationBuilder(ClassificationBuilder, skip_registration=True):
  """An image folder and one label list per split (`name l1 ... lK` per line).

  SPLIT_FILES names the list per split; IMAGE_DIRS are glob patterns (relative to
  manual_dir) of the folders holding the images; SEPARATOR None means whitespace.
  """

  SPLIT_FILES: dict[str, str] = {}
  IMAGE_DIRS: tuple[str, ...] = ("images",)
  SEPARATOR: str | None = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = ""

  def patient_of(self, name: str) -> str:
    del name
    return ""

  def read_records(self, manual_dir, problems):
    missing = [f for f in self.SPLIT_FILES.values() if not (manual_dir / f).exists()]
    if missing:
      problems.fatal(str(manual_dir), f"missing split list(s) {missing}. "
                     f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
      return {}
    index = ImageIndex(manual_dir, self.IMAGE_DIRS)
    splits = {}
    for split, list_file in self.SPLIT_FILES.items():
      records = []
      for entry in read_label_list(manual_dir / list_file, len(self.LABELS), problems, split,
                                   self.SEPARATOR):
        path = index.find(entry.name)
        if path is None:
          problems.add(split, entry.source, index.missing(entry.name))
          continue
        records.append(Record(entry.name, path, entry.labels, entry.source,
                              self.patient_of(entry.name)))
      splits[split] = records
    return splits


class PhantomCxr(ListClassificationBuilder):
  """The embedded phantom chest X-ray data set (see data/prepare/phantom.py)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Generated, not downloaded: medbench_jax.data.prepare.prepare_dataset generates it "
      "(main does this on first use), or medbench_jax.data.prepare.phantom.generate("
      "manual_dir).")
  LABELS = phantom.FINDINGS
  SPLIT_FILES = {"train": "phantom_train.txt", "validation": "phantom_val.txt",
                 "test": "phantom_test.txt"}


CXR14_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                "Fibrosis", "Pleural_Thickening", "Hernia")
# NIH's archives extract to images_001/images/ ... images_012/images/; many copies
# merge them into one images/ folder.
CXR14_IMAGE_DIRS = ("images", "images_*/images")


def cxr14_patient(name: str) -> str:
  """ChestX-ray14 file names are PATIENT_FOLLOWUP.png."""
  return name.split("_")[0].lstrip("0") or "0"


class Chestxray14(ListClassificationBuilder):
  """NIH ChestX-ray14 with the reference study's official split lists."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold NIH's images (images_001.tar.gz ... images_012.tar.gz from
  https://nihcc.app.box.com/v/ChestXray-NIHCC, extracted as they come, or merged into
  images/) and the study's split lists Xray14_train_official.txt,
  Xray14_val_official.txt and Xray14_test_official.txt (published with the study's
  code, https://github.com/jlianglab/BenchmarkTransferLearning, folder dataset/).
  """
  LABELS = CXR14_LABELS
  SPLIT_FILES = {"train": "Xray14_train_official.txt",
                 "validation": "Xray14_val_official.txt",
                 "test": "Xray14_test_official.txt"}
  IMAGE_DIRS = CXR14_IMAGE_DIRS

  def patient_of(self, name):
    return cxr14_patient(name)


class ShenzhenCxr(ListClassificationBuilder):
  """Shenzhen tuberculosis chest X-rays with the study's split lists (`name,label`)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold CXR_png/ (the Shenzhen set from
  https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets)
  and the study's lists ShenzenCXR_train_data.txt, ShenzenCXR_valid_data.txt,
  ShenzenCXR_test_data.txt (spelled as published, folder dataset/ of
  https://github.com/jlianglab/BenchmarkTransferLearning).
  """
  LABELS = ("Tuberculosis",)
  TASK = "binary"
  SPLIT_FILES = {"train": "ShenzenCXR_train_data.txt",
                 "validation": "ShenzenCXR_valid_data.txt",
                 "test": "ShenzenCXR_test_data.txt"}
  IMAGE_DIRS = ("CXR_png",)
  SEPARATOR = ","


class Chestxray14Nih(ClassificationBuilder):
  """NIH ChestX-ray14 with NIH's own labels and lists.

  Data_Entry_2017.csv ("Finding Labels" pipe-separated, "No Finding" for none;
  "Patient ID"), train_val_list.txt and test_list.txt (one file name per line).
  NIH publishes no validation split: VALIDATION_FRACTION of the train_val patients
  are held out (by a hash of the patient id, so the same ones every time).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold NIH's images (images_001.tar.gz ... images_012.tar.gz,
  extracted as they come or merged into images/), Data_Entry_2017.csv,
  train_val_list.txt and test_list.txt from https://nihcc.app.box.com/v/ChestXray-NIHCC.
  """
  LABELS = CXR14_LABELS
  NO_FINDING = "No Finding"
  VALIDATION = splits_lib.Holdout("validation", splits_lib.VALIDATION_FRACTION,
                                  "chestxray14_nih")

  def read_records(self, manual_dir, problems):
    files = {name: manual_dir / name for name in
             ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt")}
    for path in files.values():
      if not path.exists():
        problems.fatal(str(path), "file not found. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip())
    if problems.fatal_errors:
      return {}
    entries: dict[str, tuple[str, np.ndarray, str] | None] = {}
    column = {name: i for i, name in enumerate(self.LABELS)}
    for where, row in read_csv(files["Data_Entry_2017.csv"], "train", problems,
                               ("Image Index", "Finding Labels", "Patient ID")):
      labels = np.zeros(len(self.LABELS), np.float32)
      unknown = []
      for finding in row["Finding Labels"].split("|"):
        finding = finding.strip()
        if finding in column:
          labels[column[finding]] = 1.0
        elif finding != self.NO_FINDING:
          unknown.append(finding)
      if unknown:
        problems.add("train", where, f"unknown finding(s) {unknown}; known: "
                     f"{list(self.LABELS) + [self.NO_FINDING]}")
        entries[row["Image Index"].strip()] = None
        continue
      entries[row["Image Index"].strip()] = (where, labels, row["Patient ID"].strip())
    index = ImageIndex(manual_dir, CXR14_IMAGE_DIRS)
    splits: dict[str, list[Record]] = {}
    for split, list_name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
      records = []
      with open(files[list_name]) as f:
        for line_no, line in enumerate(f, start=1):
          name = line.strip()
          if not name:
            continue
          where = f"{files[list_name]}:{line_no}"
          if name not in entries:
            problems.add(split, where, f"{name} has no row in Data_Entry_2017.csv")
            continue
          if entries[name] is None:  # its CSV row is already reported
            continue
          label_where, labels, patient = entries[name]
          path = index.find(name)
          if path is None:
            problems.add(split, label_where, index.missing(name))
            continue
          records.append(Record(name, path, labels, label_where, patient))
      splits[split] = records
    splits.update(splits_lib.split_by_group(splits["train"], [self.VALIDATION]))
    return splits


BUILDERS = {
    "phantom_cxr": PhantomCxr,
    "chestxray14": Chestxray14,
    "chestxray14_nih": Chestxray14Nih,
    "shenzhen_cxr": ShenzhenCxr,
}
