"""csv_folder: any image folder + CSV(s), its layout described by options (CsvConfig)."""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import math
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.base import SPLITS
from medbench_jax.data.prepare.errors import RowError
from medbench_jax.data.prepare.parsing import parse_number
from medbench_jax.data.prepare.parsing import read_csv
from medbench_jax.data.prepare.parsing import Record

CSV_SPLIT_NAMES = {"train": "train", "val": "validation", "valid": "validation",
                   "validation": "validation", "test": "test"}


class CsvConfig(tfds.core.BuilderConfig):
  """A folder + CSV layout described by options; one prepared copy per description.

  csv: the CSV file, or with split_column="" a name with "{split}" that becomes
  train, validation and test (e.g. "{split}.csv"). image_dir: folder (relative to
  manual_dir) the path column is relative to. labels: the label columns (a list, or
  one comma-separated string). split_column values: train, val/valid/validation,
  test. patient_column: optional; with it no patient may cross splits.
  """

  OPTIONS = {"csv": "labels.csv", "image_dir": "", "path_column": "path", "labels": "",
             "split_column": "split", "patient_column": ""}

  def __init__(self, *, image_size: int, keep_aspect: bool = False, **options):
    unknown = sorted(set(options) - set(self.OPTIONS))
    if unknown:
      raise ValueError(f"Unknown csv option(s) {unknown}; allowed: {sorted(self.OPTIONS)}")
    settings = {**self.OPTIONS, **options}
    labels = settings["labels"]
    settings["labels"] = [x.strip() for x in (labels.split(",") if isinstance(labels, str)
                                              else labels) if x.strip()]
    if not settings["labels"]:
      raise ValueError("csv option `labels` must name the label columns, e.g. "
                       "labels=Effusion,Nodule")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    super().__init__(name=f"{image_size}px{'_aspect' if keep_aspect else ''}_{digest}",
                     description=json.dumps(settings))
    self.image_size = image_size
    self.keep_aspect = keep_aspect
    self.settings = settings


class CsvFolder(ClassificationBuilder):
  """Any image folder + CSV(s): a column of relative paths, label columns by name.

  Label values are numbers (0/1; -1 and blank are kept as uncertain/blank for the
  label policy). Splits are the user's: a patient in two splits is an error.
  """

  BUILDER_CONFIGS = []
  OFFICIAL_SPLITS = ()
  TAKES_OPTIONS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir holds the images and the CSV(s); see CsvConfig."

  @classmethod
  def config_for(cls, image_size: int, options: Mapping[str, Any] | None = None,
                 keep_aspect: bool = False) -> CsvConfig:
    return CsvConfig(image_size=image_size, keep_aspect=keep_aspect, **(options or {}))

  @property
  def LABELS(self) -> tuple[str, ...]:  # pylint: disable=invalid-name
    return tuple(self.builder_config.settings["labels"])

  def read_records(self, manual_dir, problems):
    o = self.builder_config.settings
    required = [o["path_column"], *o["labels"]]
    required += [c for c in (o["split_column"], o["patient_column"]) if c]
    if o["split_column"]:
      sources = [(None, manual_dir / o["csv"])]
    else:
      sources = [(split, manual_dir / o["csv"].format(split=split)) for split in SPLITS]
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for fixed_split, path in sources:
      if not path.exists():
        problems.fatal(str(path), "file not found")
        continue
      for where, row in read_csv(path, fixed_split or "train", problems, required):
        split = fixed_split or CSV_SPLIT_NAMES.get(row[o["split_column"]].strip().lower())
        try:
          if split is None:
            raise RowError(f"split {row[o['split_column']]!r} is not one of "
                           f"{sorted(CSV_SPLIT_NAMES)}")
          labels = np.array([parse_number(row[c], c, blank=math.nan) for c in o["labels"]],
                            np.float32)
        except RowError as e:
          problems.add(fixed_split or "train", where, str(e))
          continue
        relative = row[o["path_column"]].strip()
        splits[split].append(Record(
            relative, str(manual_dir / o["image_dir"] / relative), labels, where,
            row[o["patient_column"]].strip() if o["patient_column"] else ""))
    return splits


BUILDERS = {"csv_folder": CsvFolder}
