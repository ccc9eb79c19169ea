"""Classification sets published as DICOM: VinDr-CXR and RSNA Pneumonia.

Images go through dicom.load_gray (modality LUT, the file's VOI window, MONOCHROME1
inversion). Splits the publishers do not give are held out by a hash of the
patient id (data/splits.py), with the same salts for every variant of a set
(aggregation policy, 3-class or binary), so that they all have the same splits:
  vindr_cxr*     train / test as published (15,000 / 3,000 images);
                 validation = VALIDATION_FRACTION of train. Its CSVs carry no
                 patient ids, so the unit is the image.
  rsna_pneumonia*  only stage_2_train is labelled: test = 20 %, validation = 10 %,
                 train = 70 % of its patients (one image per patient).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib

import numpy as np

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.errors import Problems, RowError
from medbench_jax.data.prepare.parsing import Record, parse_number, read_csv
from medbench_jax.data.prepare.staging import Decoder


@dataclasses.dataclass(frozen=True)
class DicomDecoder(Decoder):
  """A DICOM record -> uint8 (size, size, channels) through dicom.load_gray."""

  def __call__(self, record: Record) -> np.ndarray:
    return np.repeat(dicom.load_gray(record.path, self.size), self.channels, axis=2)


def _find_one(manual_dir: pathlib.Path, name: str, instructions: str,
              problems: Problems) -> pathlib.Path | None:
  """The one file called `name` below manual_dir (archives add their own top folder)."""
  found = sorted(manual_dir.rglob(name))
  if len(found) != 1:
    problems.fatal(str(manual_dir), f"expected one {name} below it, found "
                   f"{[str(p) for p in found] or 'none'}. {instructions.strip()}")
    return None
  return found[0]


def _binary_labels(row: dict[str, str], names: tuple[str, ...]) -> np.ndarray:
  labels = np.array([parse_number(row[n], n) for n in names], np.float32)
  bad = [n for n, v in zip(names, labels) if v not in (0.0, 1.0)]
  if bad:
    raise RowError(f"labels must be 0 or 1; columns {bad} are not")
  return labels


# ---------------------------------------------------------------- VinDr-CXR

VINDR_LABELS = (
    # Local findings (radiologists also drew boxes for these) ...
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly",
    "Clavicle fracture", "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD",
    "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst", "Mediastinal shift",
    "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
    # ... and global impressions.
    "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")

# How the training set's one row per radiologist becomes one label per image.
# votes: (readers, labels) of 0/1. Majority: more than half of the readers.
AGGREGATIONS = {
    "majority": lambda votes: votes.mean(axis=0) > 0.5,
    "any": lambda votes: votes.any(axis=0),
    "all": lambda votes: votes.all(axis=0),
}


class _VindrCxr(ClassificationBuilder, skip_registration=True):
  """VinDr-CXR 1.0.0 (PhysioNet): 28 image-level labels, 3 readers per training image."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold VinDr-CXR 1.0.0 as PhysioNet distributes it
  (https://physionet.org/content/vindr-cxr/1.0.0/): annotations/image_labels_train.csv,
  annotations/image_labels_test.csv, train/<image_id>.dicom, test/<image_id>.dicom.
  """
  LABELS = VINDR_LABELS
  OFFICIAL_SPLITS = ("train", "test")
  AGGREGATION = "majority"
  VALIDATION = splits_lib.Holdout("validation", splits_lib.VALIDATION_FRACTION, "vindr_cxr")

  def decoder(self) -> DicomDecoder:
    return DicomDecoder(self.builder_config.image_size, self.CHANNELS)

  def _rows(self, path: pathlib.Path, split: str, key: tuple[str, ...],
            problems: Problems) -> dict[str, list[tuple[str, np.ndarray]]]:
    """image_id -> [(where, labels)] for every good row."""
    rows = collections.defaultdict(list)
    for where, row in read_csv(path, split, problems, key + self.LABELS):
      try:
        rows[row["image_id"].strip()].append((where, _binary_labels(row, self.LABELS)))
      except RowError as e:
        problems.add(split, where, str(e))
    return rows

  def read_records(self, manual_dir, problems):
    train_csv = _find_one(manual_dir, "image_labels_train.csv",
                          self.MANUAL_DOWNLOAD_INSTRUCTIONS, problems)
    test_csv = _find_one(manual_dir, "image_labels_test.csv",
                         self.MANUAL_DOWNLOAD_INSTRUCTIONS, problems)
    if problems.fatal_errors:
      return {}
    root = train_csv.parent.parent  # annotations/ sits beside train/ and test/
    aggregate = AGGREGATIONS[self.AGGREGATION]
    splits = {}
    for split, path, key in (("train", train_csv, ("image_id", "rad_id")),
                             ("test", test_csv, ("image_id",))):
      records = []
      for image_id, rows in sorted(self._rows(path, split, key, problems).items()):
        if split == "test" and len(rows) > 1:
          for where, _ in rows[1:]:
            problems.add(split, where, f"{image_id} has several rows; the test set has "
                         "one consensus row per image")
          continue
        labels = aggregate(np.stack([labels for _, labels in rows])).astype(np.float32)
        records.append(Record(image_id, str(root / split / f"{image_id}.dicom"), labels,
                              rows[0][0]))
      splits[split] = records
    splits.update(splits_lib.split_by_group(splits["train"], [self.VALIDATION]))
    return splits


class VindrCxr(_VindrCxr):
  """VinDr-CXR, a label positive when most of an image's readers marked it."""


class VindrCxrAny(_VindrCxr):
  """VinDr-CXR, a label positive when any reader marked it."""
  AGGREGATION = "any"


class VindrCxrAll(_VindrCxr):
  """VinDr-CXR, a label positive when every reader marked it."""
  AGGREGATION = "all"


# ---------------------------------------------------------------- RSNA Pneumonia

RSNA_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
# Test first, then validation from the rest (salts as first published).
RSNA_HOLDOUTS = (splits_lib.Holdout("test", 0.2, "rsna_pneumonia:test"),
                 splits_lib.Holdout("validation", 0.1, "rsna_pneumonia:val"))


class _RsnaPneumonia(ClassificationBuilder, skip_registration=True):
  """RSNA Pneumonia Detection Challenge (2018), stage 2 training data.

  A patient's rows (one per box) must agree: Target 1 exactly for "Lung Opacity".
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the competition's stage_2_train_images/<patientId>.dcm,
  stage_2_train_labels.csv (patientId,x,y,width,height,Target) and
  stage_2_detailed_class_info.csv (patientId,class), as Kaggle distributes them
  (https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data).
  """
  OFFICIAL_SPLITS = ()

  def decoder(self) -> DicomDecoder:
    return DicomDecoder(self.builder_config.image_size, self.CHANNELS)

  @staticmethod
  def _per_patient(rows, column: str, problems: Problems, parse) -> dict[str, tuple[str, str]]:
    """patientId -> (value, where of its first row); a disagreeing row is a problem."""
    first = {}
    for where, row in rows:
      patient = row["patientId"].strip()
      try:
        value = parse(row[column].strip())
      except RowError as e:
        problems.add("train", where, str(e))
        continue
      if patient in first and first[patient][0] != value:
        problems.add("train", where, f"{column} {value!r} contradicts {first[patient][0]!r} "
                     f"at {first[patient][1]}")
        continue
      first.setdefault(patient, (value, where))
    return first

  def read_records(self, manual_dir, problems):
    paths = [_find_one(manual_dir, name, self.MANUAL_DOWNLOAD_INSTRUCTIONS, problems)
             for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv")]
    if problems.fatal_errors:
      return {}
    labels_csv, class_csv = paths

    def target(value):
      if value not in ("0", "1"):
        raise RowError(f"Target must be 0 or 1, got {value!r}")
      return value

    def kind(value):
      if value not in RSNA_CLASSES:
        raise RowError(f"class must be one of {RSNA_CLASSES}, got {value!r}")
      return value

    targets = self._per_patient(
        read_csv(labels_csv, "train", problems, ("patientId", "Target")),
        "Target", problems, target)
    classes = self._per_patient(
        read_csv(class_csv, "train", problems, ("patientId", "class")),
        "class", problems, kind)
    for patient in sorted(set(classes) - set(targets)):
      problems.add("train", classes[patient][1], f"{patient} has no row in {labels_csv.name}")
    images = labels_csv.parent / "stage_2_train_images"
    records = []
    for patient, (value, where) in sorted(targets.items()):
      if patient not in classes:
        problems.add("train", where, f"{patient} has no row in {class_csv.name}")
        continue
      name = classes[patient][0]
      if (name == "Lung Opacity") != (value == "1"):
        problems.add("train", where, f"Target {value} disagrees with class {name!r} at "
                     f"{classes[patient][1]}")
        continue
      # One-hot over LABELS; the binary variant's one label is "Lung Opacity".
      labels = np.float32([name == label for label in self.LABELS])
      records.append(Record(patient, str(images / f"{patient}.dcm"), labels, where, patient))
    return splits_lib.split_by_group(records, RSNA_HOLDOUTS)


class RsnaPneumonia(_RsnaPneumonia):
  """3 classes, one-hot: Normal / No Lung Opacity / Not Normal / Lung Opacity."""
  LABELS = RSNA_CLASSES
  TASK = "multi-class"


class RsnaPneumoniaBinary(_RsnaPneumonia):
  """Lung opacity (pneumonia) or not, the competition's Target."""
  LABELS = ("Lung Opacity",)
  TASK = "binary"


BUILDERS = {
    "vindr_cxr": VindrCxr,
    "vindr_cxr_any": VindrCxrAny,
    "vindr_cxr_all": VindrCxrAll,
    "rsna_pneumonia": RsnaPneumonia,
    "rsna_pneumonia_binary": RsnaPneumoniaBinary,
}
