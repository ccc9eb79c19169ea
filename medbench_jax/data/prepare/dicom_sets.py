"""Classification sets published as DICOM: VinDr-CXR and RSNA Pneumonia, with the
publishers' labels or with the reference study's own lists (*_study).

Images go through dicom.read_gray (modality LUT, the file's VOI window, MONOCHROME1
inversion; prepare/decoders.py); the study's lists may name converted JPEG/PNG
copies instead, which are read as they are. Splits the publishers do not give are
held out by a hash of the patient id (data/splits.py), with the same salts for
every variant of a set (aggregation policy, 3-class or binary, the study's lists),
so that they all have the same splits:
  vindr_cxr*     train / test as published (15,000 / 3,000 images);
                 validation = VALIDATION_FRACTION of train. Its CSVs carry no
                 patient ids, so the unit is the image.
  vindr_cxr_study  the study's train / test lists (the same images); validation as
                 vindr_cxr's, since the study publishes no validation list.
  rsna_pneumonia*  only stage_2_train is labelled: test = 20 %, validation = 10 %,
                 train = 70 % of its patients (one image per patient).
  rsna_pneumonia_study  the study's train / val / test lists (21,295 / 2,680 / 2,709).
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.errors import RowError
from medbench_jax.data.prepare.images import ImageIndex
from medbench_jax.data.prepare.parsing import parse_number
from medbench_jax.data.prepare.parsing import read_csv
from medbench_jax.data.prepare.parsing import read_label_list
from medbench_jax.data.prepare.parsing import Record


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


# ---------------------------------------------------------------- the study's lists


class _StudyLists(ClassificationBuilder, skip_registration=True):
  """The reference study's list files (`image l1 ... lK` per line), one per split.

  `candidates(manual_dir, name, index)` gives, in order of preference, the files an
  entry may be (the converted image the list names, or the original DICOM); index
  finds file names in IMAGE_DIRS (glob patterns below manual_dir), where set.
  """

  SPLIT_FILES: dict[str, str] = {}
  NUM_FIELDS = 0  # label fields per line
  IMAGE_DIRS: tuple[str, ...] = ()

  def candidates(self, manual_dir: pathlib.Path, name: str, index: ImageIndex | None
                 ) -> list[pathlib.Path]:
    raise NotImplementedError

  def record(self, name: str, path: pathlib.Path, labels: np.ndarray, where: str) -> Record:
    raise NotImplementedError

  def read_records(self, manual_dir, problems):
    missing = [f for f in self.SPLIT_FILES.values() if not (manual_dir / f).exists()]
    if missing:
      problems.fatal(str(manual_dir), f"missing list(s) {missing}. "
                     f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
      return {}
    index = ImageIndex(manual_dir, self.IMAGE_DIRS) if self.IMAGE_DIRS else None
    splits = {}
    for split, list_file in self.SPLIT_FILES.items():
      records = []
      for entry in read_label_list(manual_dir / list_file, self.NUM_FIELDS, problems, split):
        candidates = self.candidates(manual_dir, entry.name, index)
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
          problems.add(split, entry.source, "image not found; looked for " +
                       " and ".join(str(p) for p in candidates))
          continue
        try:
          records.append(self.record(entry.name, path, entry.labels, entry.source))
        except RowError as e:
          problems.add(split, entry.source, str(e))
      splits[split] = records
    return splits


# The study's names for its six VinDr-CXR labels (the lists' column order).
VINDR_STUDY_LABELS = ("PE", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases",
                      "No finding")


class VindrCxrStudy(_StudyLists):
  """VinDr-CXR with the reference study's 6-label lists (its VinDrCXR task).

  Lines `train_jpeg/<image_id> l1 ... l6`: the study's JPEG conversion of the DICOM
  (`<manual_dir>/train_jpeg/<image_id>.jpeg`, as its loader opens it), or else the
  original `<manual_dir>/train/<image_id>.dicom`.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the study's lists VinDrCXR_train_pe_global_one.txt and
  VinDrCXR_test_pe_global_one.txt (folder dataset/ of
  https://github.com/jlianglab/BenchmarkTransformers) beside the images: the JPEGs
  they name (train_jpeg/<image_id>.jpeg, test_jpeg/<image_id>.jpeg) or VinDr-CXR
  1.0.0's DICOMs (train/<image_id>.dicom, test/<image_id>.dicom;
  https://physionet.org/content/vindr-cxr/1.0.0/).
  """
  LABELS = VINDR_STUDY_LABELS
  OFFICIAL_SPLITS = ("train", "test")
  SPLIT_FILES = {"train": "VinDrCXR_train_pe_global_one.txt",
                 "test": "VinDrCXR_test_pe_global_one.txt"}
  NUM_FIELDS = len(VINDR_STUDY_LABELS)

  def candidates(self, manual_dir, name, index):
    del index
    folder, _, image_id = name.rpartition("/")
    return [manual_dir / f"{name}.jpeg",
            manual_dir / folder.removesuffix("_jpeg") / f"{image_id}.dicom"]

  def record(self, name, path, labels, where):
    if not np.isin(labels, (0.0, 1.0)).all():
      raise RowError(f"labels must be 0 or 1, got {labels.tolist()}")
    # Named by image id, as vindr_cxr names its records: the validation draw below
    # then holds out the same images as vindr_cxr's.
    return Record(name.rpartition("/")[2], str(path), labels, where)

  def read_records(self, manual_dir, problems):
    splits = super().read_records(manual_dir, problems)
    if "train" in splits:
      splits.update(splits_lib.split_by_group(splits["train"], [_VindrCxr.VALIDATION]))
    return splits


class RsnaPneumoniaStudy(_StudyLists):
  """RSNA Pneumonia with the reference study's 3-class lists (its RSNAPneumonia task).

  Lines `<patientId>.png <class>`, class 0 Normal, 1 No Lung Opacity / Not Normal,
  2 Lung Opacity (stored one-hot): the PNG conversion the list names, found in
  manual_dir or a folder directly below it, or else the competition's
  stage_2_train_images/<patientId>.dcm.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the study's lists RSNAPneumonia_train.txt,
  RSNAPneumonia_val.txt and RSNAPneumonia_test.txt (folder dataset/ of
  https://github.com/jlianglab/BenchmarkTransformers) and the images: the PNGs they
  name (in manual_dir or a folder directly below it) or the competition's
  stage_2_train_images/<patientId>.dcm
  (https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data).
  """
  LABELS = RSNA_CLASSES
  TASK = "multi-class"
  SPLIT_FILES = {"train": "RSNAPneumonia_train.txt", "validation": "RSNAPneumonia_val.txt",
                 "test": "RSNAPneumonia_test.txt"}
  NUM_FIELDS = 1
  IMAGE_DIRS = (".", "*")

  def candidates(self, manual_dir, name, index):
    found = index.find(name)
    return [pathlib.Path(found) if found else manual_dir / name,
            manual_dir / "stage_2_train_images" / f"{pathlib.Path(name).stem}.dcm"]

  def record(self, name, path, labels, where):
    classes = range(len(RSNA_CLASSES))
    if labels[0] not in [float(c) for c in classes]:
      raise RowError(f"class must be one of {list(classes)} ({', '.join(RSNA_CLASSES)}), "
                     f"got {labels[0]:g}")
    patient = pathlib.Path(name).stem
    one_hot = np.eye(len(RSNA_CLASSES), dtype=np.float32)[int(labels[0])]
    return Record(patient, str(path), one_hot, where, patient)


BUILDERS = {
    "vindr_cxr": VindrCxr,
    "vindr_cxr_any": VindrCxrAny,
    "vindr_cxr_all": VindrCxrAll,
    "rsna_pneumonia": RsnaPneumonia,
    "rsna_pneumonia_binary": RsnaPneumoniaBinary,
    "vindr_cxr_study": VindrCxrStudy,
    "rsna_pneumonia_study": RsnaPneumoniaStudy,
}
