"""New images for a finished run (explain, predict): which files an `--inputs` names, and each
one read as the prepared data set stores its images.

    files, problems = inputs.list_inputs("scans/")  # a folder, a CSV, a file or a glob
    image = inputs.read_input(path, size=72, channels=1)  # stored and original pixels
    stored = inputs.read_stored(path, size=72, channels=1)  # the stored array alone

`read_stored` (and so `read_input`) goes through the builders' own decoder
(prepare/decoders.py ImageDecoder): PNG and JPEG through OpenCV (16-bit rescaled by its
range), DICOM through the modality LUT, the file's VOI window and MONOCHROME1 inversion,
then resized to the stored resolution.
The run's evaluation preprocessing (config.input.pp_eval) applies to the stored array as to
a stored example. Any failure raises DataFormatError naming the file, so that a caller can
list it as a problem and go on.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import csv
import dataclasses
import glob
import os
import pathlib

import numpy as np

from medbench_jax import paths
from medbench_jax.data.prepare import decoders
from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare import images
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.parsing import Record

SUFFIXES = (".png", ".jpg", ".jpeg", *dicom.DICOM_SUFFIXES)
# Names of the CSV column that holds the files, in the order they are looked for (case
# ignored).
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")


@dataclasses.dataclass
class Problem:
  """A file (or CSV row) that could not be used, and why."""
  path: str
  reason: str


def list_inputs(spec: str) -> tuple[list[str], list[Problem]]:
  """The local files `spec` names, and CSV rows that name none: a folder (every file with
  one of SUFFIXES below it, sorted), a .csv (the first of PATH_COLUMNS it has; paths
  relative to the CSV's folder), one file, or a glob (`**` recursive, sorted)."""
  if paths.is_remote(spec):
    raise ValueError(f"--inputs={spec}: inputs must be local files (the image readers "
                     "open local files); copy them here or mount the bucket.")
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    found = [str(p) for p in pathlib.Path(path).rglob("*")
             if p.is_file() and p.suffix.lower() in SUFFIXES]
    return sorted(found), []
  if path.lower().endswith(".csv") and os.path.isfile(path):
    return _csv_inputs(path)
  if os.path.isfile(path):
    return [path], []
  return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p)), []


def _csv_inputs(path: str) -> tuple[list[str], list[Problem]]:
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.DictReader(f))
  columns = {c.lower(): c for c in (rows[0] if rows else {})}
  column = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
  if column is None:
    raise ValueError(f"--inputs={path}: no column of {list(PATH_COLUMNS)} (case ignored) "
                     f"names the files; its columns are {list(rows[0]) if rows else []}.")
  folder = os.path.dirname(path)
  files, problems = [], []
  for line, row in enumerate(rows, start=2):
    value = (row[column] or "").strip()
    if value:
      files.append(os.path.join(folder, os.path.expanduser(value)))
    else:
      problems.append(Problem(f"{path}:{line}", f"empty {column!r}"))
  return files, problems


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One file read: `stored` as the prepared data set keeps it (uint8 (S, S, channels), or
  within S x S at the file's aspect with keep_aspect); `original` the file's own pixels as
  uint8 (H, W, channels), for drawing on and for the resolution of per-pixel outputs."""
  path: str
  stored: np.ndarray
  original: np.ndarray


def read_stored(path: str | os.PathLike, size: int, channels: int = 1,
                keep_aspect: bool = False) -> np.ndarray:
  """A file as the prepared data set stores it: uint8 (size, size, channels), or within
  size x size at the file's aspect with keep_aspect; DataFormatError if it fails."""
  path = os.fspath(path)
  decoder = decoders.ImageDecoder(size, channels, keep_aspect)
  with _naming(path):
    return decoder.unpack(decoder(Record(name=path, path=path, labels=np.zeros(0),
                                         where=path)))


def read_original(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
  """A file's own pixels as uint8 (H, W, channels) at its own size (DICOMs through the
  same display pipeline as read_stored); DataFormatError if it fails."""
  path = os.fspath(path)
  with _naming(path):
    if pathlib.Path(path).suffix.lower() in dicom.DICOM_SUFFIXES:
      return np.repeat(dicom.to_uint8(dicom.read_gray(path)), channels, axis=2)
    return images.to_channels(images.read_image(path), channels)


def read_input(path: str | os.PathLike, size: int, channels: int = 1,
               keep_aspect: bool = False) -> InputImage:
  """Reads one image or DICOM file (see the module docstring); DataFormatError if it fails."""
  path = os.fspath(path)
  return InputImage(path, read_stored(path, size, channels, keep_aspect),
                    read_original(path, channels))


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
  """Raises any failure of reading `path` as a DataFormatError that names it."""
  try:
    yield
  except DataFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise what their libraries raise (OpenCV, pydicom, numpy): any of it means
    # this file cannot be used, which the caller reports with the file's name.
    raise DataFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from None
