"""TFDS builders: official on-disk layouts -> ArrayRecord, read back by grain.

Images are stored decoded (uint8, one channel) at the builder config's resolution,
so training never decodes a PNG or DICOM per step: the input pipeline only crops,
flips and rotates arrays it reads by random access.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds

from medbench_jax.data import phantom


class DataFormatError(ValueError):
  """A data set file that does not follow its published format (file and line named)."""


@dataclasses.dataclass(frozen=True)
class ListEntry:
  name: str
  labels: np.ndarray
  source: str  # "file:line", for error messages


def read_label_list(path: str | os.PathLike, num_labels: int) -> list[ListEntry]:
  """Parses ChestX-ray14's official list format: `name l1 l2 ... lK` per line."""
  entries = []
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      where = f"{path}:{line_no}"
      if len(fields) != num_labels + 1:
        raise DataFormatError(
            f"{where}: expected an image name and {num_labels} labels, got"
            f" {len(fields)} fields: {line.strip()!r}")
      try:
        labels = np.array([float(v) for v in fields[1:]], np.float32)
      except ValueError:
        raise DataFormatError(
            f"{where}: labels must be numbers, got {line.strip()!r}") from None
      entries.append(ListEntry(fields[0], labels, where))
  if not entries:
    raise DataFormatError(f"{path}: the list is empty")
  return entries


def load_gray(path: pathlib.Path, size: int, where: str) -> np.ndarray:
  """Reads an image as one-channel uint8 and resizes it to size x size (area filter)."""
  if not path.exists():
    raise DataFormatError(f"{where}: image file {path} does not exist")
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise DataFormatError(f"{where}: cannot decode image {path}")
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3
                         else cv2.COLOR_BGRA2GRAY)
  if image.dtype != np.uint8:
    # 16-bit PNGs (some CXR releases) are rescaled by their own range.
    lo, hi = float(image.min()), float(image.max())
    image = ((image - lo) * (255.0 / max(hi - lo, 1.0))).round().astype(np.uint8)
  if image.shape != (size, size):
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    image = cv2.resize(image, (size, size), interpolation=interpolation)
  return image[..., None]


class ResolutionConfig(tfds.core.BuilderConfig):
  """One prepared copy of a data set per stored resolution."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f"{image_size}px",
                     description=f"Images stored at {image_size}x{image_size}.",
                     **kwargs)
    self.image_size = image_size


def resolution_configs(sizes: Sequence[int] = (144, 224, 256, 512)) -> list[ResolutionConfig]:
  return [ResolutionConfig(image_size=s) for s in sizes]


class ListClassificationBuilder(tfds.core.GeneratorBasedBuilder):
  """Multi-label classification from an image folder and ChestX-ray14-style lists.

  Subclasses name the list files per split and the label names.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = resolution_configs()
  LABELS: tuple[str, ...] = ()
  SPLIT_FILES: dict[str, str] = {}
  IMAGE_FOLDER = "images"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
            "labels": tfds.features.Tensor(shape=(len(self.LABELS),), dtype=np.float32),
            "name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(label_names=list(self.LABELS)),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    missing = [f for f in self.SPLIT_FILES.values() if not (manual_dir / f).exists()]
    if missing:
      raise DataFormatError(
          f"{manual_dir}: missing split list(s) {missing}. "
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    return {split: self._generate_examples(manual_dir, manual_dir / list_file)
            for split, list_file in self.SPLIT_FILES.items()}

  def _generate_examples(self, manual_dir: pathlib.Path,
                         list_path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    size = self.builder_config.image_size
    for entry in read_label_list(list_path, len(self.LABELS)):
      image = load_gray(manual_dir / self.IMAGE_FOLDER / entry.name, size, entry.source)
      yield entry.name, {"image": image, "labels": entry.labels, "name": entry.name}


class PhantomCxr(ListClassificationBuilder):
  """The embedded phantom chest X-ray data set (see medbench_jax.data.phantom)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Generated, not downloaded: medbench_jax.data.phantom.generate(manual_dir) "
      "writes it (main does this automatically on first use).")

  LABELS = phantom.FINDINGS
  SPLIT_FILES = {"train": "phantom_train.txt", "validation": "phantom_val.txt",
                 "test": "phantom_test.txt"}


class Chestxray14(ListClassificationBuilder):
  """NIH ChestX-ray14 with the reference study's official split lists."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold NIH's images extracted into images/ (images_001.tar.gz ...
  images_012.tar.gz from https://nihcc.app.box.com/v/ChestXray-NIHCC) and the study's
  split lists Xray14_train_official.txt, Xray14_val_official.txt and
  Xray14_test_official.txt (published with the study's code,
  https://github.com/jlianglab/BenchmarkTransferLearning, folder dataset/).
  """
  LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
            "Fibrosis", "Pleural_Thickening", "Hernia")
  SPLIT_FILES = {"train": "Xray14_train_official.txt",
                 "validation": "Xray14_val_official.txt",
                 "test": "Xray14_test_official.txt"}


BUILDERS: dict[str, type[ListClassificationBuilder]] = {
    "phantom_cxr": PhantomCxr,
    "chestxray14": Chestxray14,
}


def get_builder(dataset: str, image_size: int, data_dir: str | os.PathLike
                ) -> tfds.core.DatasetBuilder:
  if dataset not in BUILDERS:
    raise ValueError(f"Unknown dataset {dataset!r}; available: {sorted(BUILDERS)}")
  builder_cls = BUILDERS[dataset]
  # A registered config must be passed by name: TFDS re-creates builders from their
  # init arguments in grain workers and refuses an equal-named config object.
  known = {c.image_size: c.name for c in builder_cls.BUILDER_CONFIGS}
  config = known.get(image_size) or ResolutionConfig(image_size=image_size)
  return builder_cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            image_size: int) -> tfds.core.DatasetBuilder:
  """Prepares (once) and returns the builder; a finished preparation is reused."""
  builder = get_builder(dataset, image_size, data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder
