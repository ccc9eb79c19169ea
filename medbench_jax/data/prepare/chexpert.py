"""CheXpert and MIMIC-CXR-JPG: CSV-labelled chest X-ray sets with uncertain (-1) and blank
labels, which data/labels.py's apply_label_policy resolves at training time (U-Ones,
LSR, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import glob
import math
import pathlib
import re

import numpy as np

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.base import SPLITS
from medbench_jax.data.prepare.errors import RowError
from medbench_jax.data.prepare.parsing import find_file
from medbench_jax.data.prepare.parsing import parse_number
from medbench_jax.data.prepare.parsing import read_csv
from medbench_jax.data.prepare.parsing import Record

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
                   "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                   "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
# The CheXpert competition's five findings, on which results are compared.
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                        "Pleural Effusion")
_CHEXPERT_VALUES = (1.0, 0.0, -1.0)


def chexpert_labels(row: Mapping[str, str], names: Sequence[str]) -> np.ndarray:
  """1.0 / 0.0 / -1.0 (uncertain) / blank (NaN: not mentioned) per observation."""
  labels = np.array([parse_number(row[n], n, blank=math.nan) for n in names], np.float32)
  bad = [n for n, v in zip(names, labels) if not (math.isnan(v) or v in _CHEXPERT_VALUES)]
  if bad:
    raise RowError(f"labels must be 1.0, 0.0, -1.0 or blank; columns {bad} are not")
  return labels


class Chexpert(ClassificationBuilder):
  """CheXpert (Stanford): train.csv / valid.csv with 14 observations per image.

  Labels are stored as published (-1 uncertain, NaN blank); the uncertainty policy
  (U-Ones, U-Zeros, LSR-Ones, LSR-Zeros) and the blank value are applied when a run
  loads them (data/labels.py), so one prepared copy serves every policy. Splits: the
  official valid.csv is the test split (the official test set is hidden);
  VALIDATION_FRACTION of train.csv's patients are held out for validation.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold CheXpert as Stanford distributes it
  (https://stanfordmlgroup.github.io/competitions/chexpert/): either the extracted
  folder CheXpert-v1.0-small/ (or CheXpert-v1.0/), or its contents: train.csv,
  valid.csv, train/, valid/.
  """
  LABELS = CHEXPERT_LABELS
  EVAL_LABELS = CHEXPERT_COMPETITION
  FRONTAL = "Frontal"
  VALIDATION = splits_lib.Holdout("validation", splits_lib.VALIDATION_FRACTION, "chexpert")

  def read_records(self, manual_dir, problems):
    candidates = [manual_dir] + sorted(pathlib.Path(p).parent for p in
                                       glob.glob(str(manual_dir / "CheXpert-v1.0*/train.csv")))
    root = next((c for c in candidates if (c / "train.csv").exists()), None)
    if root is None:
      problems.fatal(str(manual_dir / "train.csv"),
                     "not found. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip())
      return {}
    splits = {}
    for split, csv_name in (("train", "train.csv"), ("test", "valid.csv")):
      path = root / csv_name
      if not path.exists():
        problems.fatal(str(path), "file not found")
        continue
      records = []
      for where, row in read_csv(path, split, problems,
                                 ("Path", "Frontal/Lateral") + self.LABELS):
        try:
          labels = chexpert_labels(row, self.LABELS)
        except RowError as e:
          problems.add(split, where, str(e))
          continue
        # CSV paths start with the release folder ("CheXpert-v1.0-small/train/...");
        # whatever the user named that folder, the rest is relative to the CSV's folder.
        relative = pathlib.PurePosixPath(row["Path"].strip())
        image = root.joinpath(*relative.parts[1:])
        match = re.search(r"patient\d+", row["Path"])
        records.append(Record(str(relative), str(image), labels, where,
                              match.group(0) if match else "",
                              row["Frontal/Lateral"].strip() == self.FRONTAL))
      splits[split] = records
    if problems.fatal_errors:
      return {}
    splits.update(splits_lib.split_by_group(splits["train"], [self.VALIDATION]))
    return splits


class MimicCxrJpg(ClassificationBuilder):
  """MIMIC-CXR-JPG 2.0.0: CheXpert-labeller labels per study, official splits.

  mimic-cxr-2.0.0-chexpert.csv(.gz) (subject_id, study_id, 14 observations),
  mimic-cxr-2.0.0-split.csv(.gz) (dicom_id, study_id, subject_id, split),
  optionally mimic-cxr-2.0.0-metadata.csv(.gz) (ViewPosition: PA/AP are frontal;
  without it every image counts as frontal and metadata views_known is false), and
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg. Labels are stored as published, like
  CheXpert's; a study without a labeller row has every observation blank.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold MIMIC-CXR-JPG 2.0.0 as PhysioNet distributes it
  (https://physionet.org/content/mimic-cxr-jpg/2.0.0/): files/ and the
  mimic-cxr-2.0.0-{chexpert,split,metadata}.csv.gz files beside it.
  """
  LABELS = CHEXPERT_LABELS
  EVAL_LABELS = CHEXPERT_COMPETITION
  SPLIT_NAMES = {"train": "train", "validate": "validation", "test": "test"}
  FRONTAL_VIEWS = ("PA", "AP")

  def read_records(self, manual_dir, problems):
    label_path = find_file(manual_dir, "mimic-cxr-2.0.0-chexpert.csv", problems)
    split_path = find_file(manual_dir, "mimic-cxr-2.0.0-split.csv", problems)
    if problems.fatal_errors:
      return {}
    labels: dict[tuple[str, str], np.ndarray | None] = {}
    for where, row in read_csv(label_path, "train", problems,
                               ("subject_id", "study_id") + self.LABELS):
      key = (row["subject_id"].strip(), row["study_id"].strip())
      try:
        labels[key] = chexpert_labels(row, self.LABELS)
      except RowError as e:
        problems.add("train", where, str(e))
        labels[key] = None
    views = {}
    meta_path = next((p for p in (manual_dir / "mimic-cxr-2.0.0-metadata.csv",
                                  manual_dir / "mimic-cxr-2.0.0-metadata.csv.gz")
                      if p.exists()), None)
    if meta_path is not None:
      for _, row in read_csv(meta_path, "train", problems, ("dicom_id", "ViewPosition")):
        views[row["dicom_id"].strip()] = row["ViewPosition"].strip()
    self.info.metadata["views_known"] = meta_path is not None
    blank = np.full(len(self.LABELS), np.nan, np.float32)
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for where, row in read_csv(split_path, "train", problems,
                               ("dicom_id", "study_id", "subject_id", "split")):
      split = self.SPLIT_NAMES.get(row["split"].strip())
      if split is None:
        problems.add("train", where, f"split {row['split']!r} is not one of "
                     f"{sorted(self.SPLIT_NAMES)}")
        continue
      subject, study, dicom_id = (row[k].strip() for k in ("subject_id", "study_id",
                                                           "dicom_id"))
      study_labels = labels.get((subject, study), blank)
      if study_labels is None:  # its label row is already reported
        continue
      relative = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
      frontal = views.get(dicom_id, self.FRONTAL_VIEWS[0]) in self.FRONTAL_VIEWS
      splits[split].append(Record(relative, str(manual_dir / relative), study_labels, where,
                                  subject, frontal))
    return splits


BUILDERS = {"chexpert": Chexpert, "mimic_cxr_jpg": MimicCxrJpg}
