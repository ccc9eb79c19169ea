"""TFDS builders: publishers' on-disk layouts -> ArrayRecord, read back by grain.

Images are stored decoded (uint8) at the builder config's resolution, so training
never decodes a PNG, JPEG or DICOM per step: the input pipeline only crops, flips
and rotates arrays it reads by random access. The default resolution is 256 px
(`config.dataset.image_size`): the study resizes to 256 and crops 224, so 256 keeps
every pixel the crops see, while a ChestX-ray14 copy takes 7 GB instead of the
117 GB it would take at the published 1024 px.

How one preparation runs (`prepare`, or TFDS's `download_and_prepare`):
1. `read_records` parses the publisher's label and split files into `Record`s. A bad
   row (wrong number of fields, a non-numeric label, an image it names that is not
   there) goes to a `Problems` report naming file and line; parsing goes on.
2. `stage_images` decodes and resizes every image once, in a process pool, into a
   scratch file inside TFDS's incomplete directory (so preparing needs about twice
   the prepared size in free disk for a while); every missing, truncated or
   undecodable file (and whatever a `Decoder` checks, e.g. a mask of another size
   than its image) joins the same report.
3. The report: `DataFormatError` listing every problem, or with `skip_bad` the bad
   rows are dropped, listed in the log and counted (metadata "skipped", which
   reaches results.json's `skipped_examples`).
4. Patients: no patient may sit in two splits (`check_patients`: a logged warning
   between two of the publisher's official splits, an error otherwise).
5. TFDS writes the ArrayRecords in record order (shuffling disabled: training
   shuffles anyway) and `label_table.npz`: per split the raw labels, patient ids and
   frontal flags, which sources.py reads for label policies, label fractions and
   statistics without touching an image.
A finished preparation is reused; an interrupted one leaves only TFDS's incomplete
directory, which the next `prepare` deletes before it starts again.

Data sets here: phantom_cxr, chestxray14 (the study's lists), chestxray14_nih (NIH's
CSV and lists), shenzhen_cxr, csv_folder (any folder + CSV, described by options:
CsvConfig). In their own modules, which add themselves to BUILDERS: chexpert.py
(chexpert, mimic_cxr_jpg), medmnist.py (medmnist_<flag>, MedMNIST v2/+), dicom_sets.py
(VinDr-CXR, RSNA Pneumonia), segmentation.py.

For another data set: subclass `ClassificationBuilder`, set LABELS (and
EVAL_LABELS, TASK, CHANNELS, OFFICIAL_SPLITS where they differ), implement
`read_records` (report bad rows with `Problems.add`; `read_csv`, `read_label_list`,
`parse_number`, `ImageIndex`, `patient_holdout` help), optionally replace
`decoder()` (a picklable `Decoder`; raise DataFormatError for a bad example, e.g. a
mask whose size differs from its image's) / `example()` / `features()`, and add the
class to `BUILDERS` (name -> builder class). `prepare`, `split_summaries` and the
prepare CLI then work for it unchanged.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import shutil
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medbench_jax.data import phantom

SPLITS = ("train", "validation", "test")
LABEL_TABLE = "label_table.npz"
# Share of a publisher's training patients held out for validation where the
# publisher gives no validation split (CheXpert, NIH's ChestX-ray14 lists).
VALIDATION_FRACTION = 0.1


class DataFormatError(ValueError):
  """A data set file that does not follow its published format (file and line named)."""


# ---------------------------------------------------------------- reporting


class Problems:
  """Every data problem of one preparation, so that a single report lists them all.

  `add(split, where, message)`: a bad row or image ("file:line"); `--skip_bad`
  drops it and counts it under its split. `fatal(where, message)`: something no
  row can be skipped over (a missing label file, a missing CSV column).
  """

  def __init__(self):
    self.rows: dict[str, dict[str, str]] = {}
    self.fatal_errors: list[str] = []

  def add(self, split: str, where: str, message: str) -> None:
    split_rows = self.rows.setdefault(split, {})
    # One entry per row: a row is skipped once however many problems it has.
    split_rows[where] = split_rows[where] + "; " + message if where in split_rows else message

  def fatal(self, where: str, message: str) -> None:
    self.fatal_errors.append(f"{where}: {message}")

  def is_bad(self, split: str, where: str) -> bool:
    return where in self.rows.get(split, {})

  def skipped(self) -> dict[str, int]:
    return {split: len(rows) for split, rows in self.rows.items()}

  def report(self) -> str:
    lines = list(self.fatal_errors)
    lines += [f"{where}: {message}" for rows in self.rows.values()
              for where, message in rows.items()]
    return f"{len(lines)} data problem(s):\n" + "\n".join("  " + line for line in lines)

  def raise_fatal(self) -> None:
    if self.fatal_errors:
      raise DataFormatError(self.report())

  def check(self, skip_bad: bool) -> None:
    """Raises the report unless skip_bad, in which case it is logged and counted."""
    self.raise_fatal()
    if not self.rows:
      return
    if not skip_bad:
      raise DataFormatError(self.report() + "\nFix these files, or pass --skip_bad to "
                            "prepare the rest and record the skipped count.")
    logging.warning("Skipping %d example(s) (--skip_bad): %s",
                    sum(self.skipped().values()), self.report())


class RowError(ValueError):
  """Raised while parsing one row; the row loop turns it into a `Problems` entry."""


def parse_number(value: str, column: str, blank: float | None = None) -> float:
  """A label field as float; an empty field is `blank` (an error when None)."""
  value = value.strip()
  if not value:
    if blank is None:
      raise RowError(f"empty value in column {column!r}")
    return blank
  try:
    return float(value)
  except ValueError:
    raise RowError(f"non-numeric value {value!r} in column {column!r}") from None


def _open_text(path: pathlib.Path):
  if path.suffix == ".gz":
    return gzip.open(path, "rt", newline="")
  return open(path, newline="")


def find_file(folder: pathlib.Path, name: str, problems: Problems) -> pathlib.Path | None:
  """`folder/name`, or its gzipped copy (PhysioNet serves CSVs either way)."""
  for candidate in (folder / name, folder / (name + ".gz")):
    if candidate.exists():
      return candidate
  problems.fatal(str(folder / name), "file not found (nor its .gz)")
  return None


def read_csv(path: pathlib.Path, split: str, problems: Problems,
             required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
  """Yields ("file:line", row dict) for every well-formed row of a CSV (or .csv.gz).

  A row with another number of fields than the header goes to `problems`. A header
  ending in a comma (NIH's Data_Entry_2017.csv) may be matched with or without the
  empty last field.
  """
  with _open_text(path) as f:
    reader = csv.reader(f)
    header = next(reader, [])
    names = list(header)
    while names and not names[-1].strip():
      names.pop()
    names = [n.strip() for n in names]
    missing = [c for c in required if c not in names]
    if missing:
      problems.fatal(f"{path}:1", f"missing column(s) {missing}; the header is {names}")
      return
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if not any(field.strip() for field in row):
        continue
      if len(row) not in (len(names), len(header)):
        problems.add(split, where, f"expected {len(names)} fields as in the header, "
                     f"got {len(row)}")
        continue
      yield where, dict(zip(names, row))


@dataclasses.dataclass(frozen=True)
class ListEntry:
  name: str
  labels: np.ndarray
  source: str  # "file:line", for error messages


def read_label_list(path: str | os.PathLike, num_labels: int,
                    problems: Problems | None = None, split: str = "",
                    separator: str | None = None) -> list[ListEntry]:
  """Parses `name l1 ... lK` lines (ChestX-ray14 lists; `name,label` with separator=",").

  Returns an entry per good line. Without `problems`, the first bad
  line raises; with it, every bad line is recorded and parsing goes on.
  """
  own = problems is None
  problems = Problems() if own else problems
  entries = []
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      fields = [x.strip() for x in line.split(separator)] if line.strip() else []
      if not fields:
        continue
      where = f"{path}:{line_no}"
      if len(fields) != num_labels + 1:
        problems.add(split, where, f"expected an image name and {num_labels} labels, got "
                     f"{len(fields)} fields: {line.strip()!r}")
        continue
      try:
        labels = np.array([float(v) for v in fields[1:]], np.float32)
      except ValueError:
        problems.add(split, where, f"labels must be numbers, got {line.strip()!r}")
        continue
      entries.append(ListEntry(fields[0], labels, where))
  if not entries and not problems.rows.get(split):
    problems.fatal(str(path), "the list is empty")
  if own and (problems.rows or problems.fatal_errors):
    raise DataFormatError(problems.report())
  return entries


# ---------------------------------------------------------------- records and images


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
  """One example as the publisher's files describe it.

  labels: float32 (K,) as published: 1 positive, 0 negative, and where the data set
  has them -1 uncertain and NaN blank (sources.py applies the label policy).
  patient: "" where the data set has no patient ids. where: "file:line".
  """
  name: str
  path: str
  labels: np.ndarray
  where: str
  patient: str = ""
  frontal: bool = True


def _check_complete(data: bytes) -> str | None:
  """Why an encoded PNG/JPEG is truncated (decoders often return half an image)."""
  if data.startswith(b"\x89PNG"):
    return None if b"IEND" in data[-12:] else "truncated PNG (no IEND chunk at the end)"
  if data.startswith(b"\xff\xd8"):
    return None if b"\xff\xd9" in data.rstrip(b"\x00")[-2:] else (
        "truncated JPEG (no end-of-image marker)")
  return None


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file as stored (gray or colour, 8 or 16 bit)."""
  try:
    data = pathlib.Path(path).read_bytes()
  except FileNotFoundError:
    raise DataFormatError(f"image file {path} does not exist") from None
  except OSError as e:
    raise DataFormatError(f"cannot read image file {path}: {e}") from None
  if not data:
    raise DataFormatError(f"image file {path} is empty")
  truncated = _check_complete(data)
  if truncated:
    raise DataFormatError(f"{truncated}: {path}")
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise DataFormatError(f"cannot decode image {path}")
  return image


def to_stored(image: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
  """Any decoded image -> uint8 (size, size, channels), area filter when shrinking."""
  if image.ndim == 3 and image.shape[2] == 4:
    image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
  if channels == 1 and image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
  elif channels == 3 and image.ndim == 2:
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  elif channels == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  if image.dtype != np.uint8:
    # 16-bit PNGs (some CXR releases) are rescaled by their own range.
    lo, hi = float(image.min()), float(image.max())
    image = ((image - lo) * (255.0 / max(hi - lo, 1.0))).round().astype(np.uint8)
  if image.shape[:2] != (size, size):
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    image = cv2.resize(image, (size, size), interpolation=interpolation)
  return image.reshape(size, size, channels)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Record -> the fixed-shape uint8 array kept for it; runs in pool workers.

  Must be picklable (a dataclass of plain fields with a module-level class). Raise
  DataFormatError for a bad example: its message joins the report. Segmentation
  builders return image and mask channels together and check their sizes here.
  """
  size: int
  channels: int = 1

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.size, self.size, self.channels)

  def __call__(self, record: Record) -> np.ndarray:
    return to_stored(read_image(record.path), self.size, self.channels)


def _worker_init() -> None:
  # One process per core already; cv2's own threads would oversubscribe.
  cv2.setNumThreads(1)


def _stage_chunk(decoder: Decoder, scratch: str, items: list[tuple[int, Record]]
                 ) -> list[tuple[int, str]]:
  """Decodes records into their slots of the scratch file; returns (slot, error)s."""
  nbytes = math.prod(decoder.shape)
  errors = []
  fd = os.open(scratch, os.O_WRONLY)
  try:
    for slot, record in items:
      try:
        array = np.ascontiguousarray(decoder(record), np.uint8)
        if array.shape != decoder.shape:
          raise DataFormatError(f"decoded to shape {array.shape}, expected {decoder.shape}")
      except DataFormatError as e:
        errors.append((slot, str(e)))
        continue
      except Exception as e:  # pylint: disable=broad-except
        # A decoder library failing on a file is a data problem of that file.
        errors.append((slot, f"cannot decode {record.path}: {type(e).__name__}: {e}"))
        continue
      os.pwrite(fd, array.tobytes(), slot * nbytes)
  finally:
    os.close(fd)
  return errors


# Starting a worker process costs about a second: below this many images the
# preparation decodes in-process.
POOL_MIN_RECORDS = 512


def default_workers() -> int:
  return len(os.sched_getaffinity(0))


def stage_records(records: Sequence[Record], decoder: Decoder, scratch: pathlib.Path,
                  split: str, problems: Problems, workers: int) -> None:
  """Decodes every record into `scratch` (slot i = record i) in a process pool."""
  nbytes = math.prod(decoder.shape)
  with open(scratch, "wb") as f:
    f.truncate(len(records) * nbytes)
  items = list(enumerate(records))
  chunk = max(1, min(256, math.ceil(len(items) / (4 * max(workers, 1)))))
  chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
  pool = None
  if workers <= 1 or len(chunks) <= 1 or len(records) < POOL_MIN_RECORDS:
    results: Iterable[list[tuple[int, str]]] = (
        _stage_chunk(decoder, str(scratch), c) for c in chunks)
  else:
    # spawn, not fork: the parent may already run TF/JAX threads, which fork breaks.
    pool = concurrent.futures.ProcessPoolExecutor(
        min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init)
    results = pool.map(_stage_chunk, [decoder] * len(chunks), [str(scratch)] * len(chunks),
                       chunks)
  try:
    for i, errors in enumerate(results, start=1):
      for slot, error in errors:
        problems.add(split, records[slot].where, error)
      if i % max(1, len(chunks) // 10) == 0:
        logging.info("%s: decoded %d/%d images", split, min(i * chunk, len(items)),
                     len(items))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)


def read_scratch(scratch: pathlib.Path, shape: tuple[int, ...], slots: Sequence[int]
                 ) -> Iterator[np.ndarray]:
  nbytes = math.prod(shape)
  with open(scratch, "rb") as f:
    for slot in slots:
      f.seek(slot * nbytes)
      yield np.frombuffer(f.read(nbytes), np.uint8).reshape(shape)


class ImageIndex:
  """File name -> path over the folders a publisher's archives extract to."""

  def __init__(self, root: pathlib.Path, patterns: Sequence[str]):
    self.root = root
    self.patterns = patterns
    self._paths: dict[str, str] = {}
    for pattern in patterns:
      for folder in sorted(glob.glob(str(root / pattern))):
        with os.scandir(folder) as entries:
          for entry in entries:
            self._paths.setdefault(entry.name, entry.path)

  def find(self, name: str) -> str | None:
    return self._paths.get(name)

  def missing(self, name: str) -> str:
    return (f"image file {name} not found in "
            f"{', '.join(str(self.root / p) for p in self.patterns)}")


# ---------------------------------------------------------------- splits and patients


def patient_holdout(records: Sequence[Record], fraction: float, salt: str
                    ) -> tuple[list[Record], list[Record]]:
  """Splits records by patient (hash of the id: stable whatever the row order)."""
  kept, held = [], []
  for record in records:
    key = record.patient or record.name
    digest = hashlib.sha1(f"{salt}:{key}".encode()).digest()
    (held if int.from_bytes(digest[:8], "big") < fraction * 2**64 else kept).append(record)
  return kept, held


def check_patients(patients: Mapping[str, Iterable[str]], official: Collection[str]
                   ) -> list[str]:
  """No patient may appear in two splits.

  An overlap between two of the publisher's official splits is the publisher's
  choice: returned as a warning. One involving a split made here or by the user
  is an error (a DataFormatError naming the splits and some patients).
  """
  sets = {split: {p for p in ids if p} for split, ids in patients.items()}
  warnings, errors = [], []
  names = list(sets)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      shared = sorted(sets[a] & sets[b])
      if not shared:
        continue
      message = (f"{len(shared)} patient(s) appear in both {a!r} and {b!r}, e.g. "
                 f"{shared[:5]}")
      (warnings if a in official and b in official else errors).append(message)
  if errors:
    raise DataFormatError("Patient-level leakage between splits:\n  " + "\n  ".join(errors))
  for message in warnings:
    logging.warning("Official splits share patients (kept as published): %s", message)
  return warnings


# ---------------------------------------------------------------- builders


class ResolutionConfig(tfds.core.BuilderConfig):
  """One prepared copy of a data set per stored resolution."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f"{image_size}px",
                     description=f"Images stored at {image_size}x{image_size}.",
                     **kwargs)
    self.image_size = image_size


def resolution_configs(sizes: Sequence[int] = (144, 224, 256, 512)) -> list[ResolutionConfig]:
  return [ResolutionConfig(image_size=s) for s in sizes]


def pixel_tensor(shape: tuple[int, ...]) -> tfds.features.Tensor:
  """A uint8 array feature (image, mask) stored as raw bytes.

  TFDS's default encoding widens uint8 to int64 varints, which made reading an
  example 4x slower than augmenting it; raw bytes parse as one copy.
  """
  return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                              encoding=tfds.features.Encoding.BYTES)


class ClassificationBuilder(tfds.core.GeneratorBasedBuilder):
  """Image classification from a publisher's layout (see the module docstring).

  Class attributes: LABELS (stored label order), EVAL_LABELS (labels the
  publisher evaluates on; default all), TASK ("multi-label", "multi-class" with
  one-hot labels, or "binary"), CHANNELS (1 gray, 3 RGB), OFFICIAL_SPLITS (splits
  whose patients the publisher assigned). Instance attributes set by `prepare`:
  skip_bad, workers.
  """

  VERSION = tfds.core.Version("2.1.0")
  RELEASE_NOTES = {"2.0.0": "Staged decoding, label table, problem report.",
                   "2.1.0": "Images stored as raw bytes (4x faster reads)."}
  BUILDER_CONFIGS = resolution_configs()
  LABELS: tuple[str, ...] = ()
  EVAL_LABELS: tuple[str, ...] = ()
  TASK = "multi-label"
  CHANNELS = 1
  OFFICIAL_SPLITS: tuple[str, ...] = SPLITS
  skip_bad = False
  workers = 1

  def features(self) -> dict[str, Any]:
    size = self.builder_config.image_size
    return {"image": pixel_tensor((size, size, self.CHANNELS)),
            "labels": tfds.features.Tensor(shape=(len(self.LABELS),), dtype=np.float32),
            "name": tfds.features.Text()}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(self.features()),
        metadata=tfds.core.MetadataDict(
            label_names=list(self.LABELS),
            eval_label_names=list(self.EVAL_LABELS or self.LABELS), task=self.TASK),
        # Examples stay in record order, so row i of the label table is example i.
        disable_shuffling=True,
    )

  def read_records(self, manual_dir: pathlib.Path, problems: Problems
                   ) -> dict[str, list[Record]]:
    raise NotImplementedError

  def decoder(self) -> Decoder:
    return Decoder(self.builder_config.image_size, self.CHANNELS)

  def example(self, record: Record, array: np.ndarray) -> dict[str, Any]:
    return {"image": array, "labels": record.labels, "name": record.name}

  def stage_images(self, split: str, records: list[Record], scratch: pathlib.Path,
                   problems: Problems) -> None:
    stage_records(records, self.decoder(), scratch, split, problems, self.workers)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    problems = Problems()
    splits = self.read_records(manual_dir, problems)
    problems.raise_fatal()
    # During preparation data_dir is TFDS's incomplete directory: the scratch files
    # vanish with it if anything fails.
    scratch_dir = pathlib.Path(self.data_dir)
    staged = {}
    for split, records in splits.items():
      scratch = scratch_dir / f"{split}.scratch"
      self.stage_images(split, records, scratch, problems)
      slots = [i for i, r in enumerate(records) if not problems.is_bad(split, r.where)]
      staged[split] = (scratch, [records[i] for i in slots], slots)
    problems.check(self.skip_bad)
    for split, (_, kept, _) in staged.items():
      if not kept:
        raise DataFormatError(f"{self.name}: no usable examples left in split {split!r}")
    warnings = check_patients({s: (r.patient for r in kept)
                               for s, (_, kept, _) in staged.items()}, self.OFFICIAL_SPLITS)
    write_label_table(scratch_dir / LABEL_TABLE, {s: kept for s, (_, kept, _) in staged.items()})
    skipped = problems.skipped()
    self.info.metadata.update(
        skipped={s: skipped.get(s, 0) for s in staged}, patient_warnings=warnings,
        official_splits=[s for s in staged if s in self.OFFICIAL_SPLITS],
        examples={s: len(kept) for s, (_, kept, _) in staged.items()},
        prevalence={s: prevalence(np.stack([r.labels for r in kept]), self.LABELS)
                    for s, (_, kept, _) in staged.items()})
    return {split: self._generate_examples(*args) for split, args in staged.items()}

  def _generate_examples(self, scratch: pathlib.Path, records: list[Record],
                         slots: list[int]) -> Iterator[tuple[int, dict]]:
    shape = self.decoder().shape
    try:
      for i, (record, array) in enumerate(zip(records, read_scratch(scratch, shape, slots))):
        yield i, self.example(record, array)
    finally:
      scratch.unlink(missing_ok=True)


def prevalence(labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  """Share of examples labelled positive (exactly 1) per label."""
  positive = (np.asarray(labels) == 1).mean(axis=0) if len(labels) else np.zeros(len(names))
  return {name: round(float(p), 4) for name, p in zip(names, positive)}


def write_label_table(path: pathlib.Path, splits: Mapping[str, Sequence[Record]]) -> None:
  arrays = {}
  for split, records in splits.items():
    arrays[f"{split}/labels"] = np.stack([r.labels for r in records]).astype(np.float32)
    arrays[f"{split}/patient"] = np.array([r.patient for r in records], dtype=str)
    arrays[f"{split}/frontal"] = np.array([r.frontal for r in records], dtype=bool)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def label_table(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
  """Raw labels (N, K), patient ids (N,) and frontal flags (N,) of a prepared split."""
  with np.load(pathlib.Path(builder.data_dir) / LABEL_TABLE) as table:
    return {key: table[f"{split}/{key}"] for key in ("labels", "patient", "frontal")}


# ---------------------------------------------------------------- list data sets


class ListClassificationBuilder(ClassificationBuilder):
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
  """The embedded phantom chest X-ray data set (see medbench_jax.data.phantom)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Generated, not downloaded: medbench_jax.data.phantom.generate(manual_dir) "
      "writes it (main does this automatically on first use).")
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
    splits = {}
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
    splits["train"], splits["validation"] = patient_holdout(
        splits["train"], VALIDATION_FRACTION, "chestxray14_nih")
    return {s: splits[s] for s in SPLITS}


# ---------------------------------------------------------------- generic CSV


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

  def __init__(self, *, image_size: int, **options):
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
    super().__init__(name=f"{image_size}px_{digest}", description=json.dumps(settings))
    self.image_size = image_size
    self.settings = settings


class CsvFolder(ClassificationBuilder):
  """Any image folder + CSV(s): a column of relative paths, label columns by name.

  Label values are numbers (0/1; -1 and blank are kept as uncertain/blank for the
  label policy). Splits are the user's: a patient in two splits is an error.
  """

  BUILDER_CONFIGS = []
  OFFICIAL_SPLITS = ()
  MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir holds the images and the CSV(s); see CsvConfig."

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


# ---------------------------------------------------------------- registry


BUILDERS: dict[str, type[ClassificationBuilder]] = {
    "phantom_cxr": PhantomCxr,
    "chestxray14": Chestxray14,
    "chestxray14_nih": Chestxray14Nih,
    "shenzhen_cxr": ShenzhenCxr,
    "csv_folder": CsvFolder,
}


def takes_options(dataset: str) -> bool:
  """Whether a data set's layout is described by options (csv_folder)."""
  return issubclass(BUILDERS[dataset], CsvFolder)


def get_builder(dataset: str, image_size: int, data_dir: str | os.PathLike,
                options: Mapping[str, Any] | None = None) -> tfds.core.DatasetBuilder:
  """The builder of a BUILDERS name at a stored resolution.

  options: the layout description of builders that take one (csv_folder: see
  CsvConfig); an error for the others.
  """
  if dataset not in BUILDERS:
    raise ValueError(f"Unknown dataset {dataset!r}; available: {sorted(BUILDERS)}")
  builder_cls = BUILDERS[dataset]
  if builder_cls is CsvFolder:
    config = CsvConfig(image_size=image_size, **(options or {}))
  else:
    if options:
      raise ValueError(f"Dataset {dataset!r} takes no options, got {dict(options)}")
    # A registered config must be passed by name: TFDS re-creates builders from their
    # init arguments in grain workers and refuses an equal-named config object.
    known = {c.image_size: c.name for c in builder_cls.BUILDER_CONFIGS}
    config = known.get(image_size) or ResolutionConfig(image_size=image_size)
  return builder_cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            image_size: int, *, skip_bad: bool = False, workers: int | None = None,
            options: Mapping[str, Any] | None = None) -> tfds.core.DatasetBuilder:
  """Prepares (once) and returns the builder; a finished preparation is reused.

  An interrupted preparation (killed: TFDS had no chance to clean up) leaves an
  `incomplete.*` directory; it is deleted here and the preparation starts over.
  Run one preparation of a data set and resolution at a time.
  """
  builder = get_builder(dataset, image_size, data_dir, options)
  if builder.is_prepared():
    return builder
  data_path = pathlib.Path(builder.data_path)
  for stale in data_path.parent.glob(f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{data_path.name}"):
    logging.info("Removing an interrupted preparation: %s", stale)
    shutil.rmtree(stale)
  builder.skip_bad = skip_bad
  builder.workers = workers or default_workers()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def registry_name(builder: tfds.core.DatasetBuilder) -> str:
  """The BUILDERS name of a builder (TFDS's own name may differ)."""
  return next((name for name, cls in BUILDERS.items() if cls is type(builder)), builder.name)


def split_summaries(builder: tfds.core.DatasetBuilder) -> list[dict[str, Any]]:
  """One summary per split (examples, skipped, prevalence) from the prepared metadata."""
  meta = builder.info.metadata
  return [{"dataset": registry_name(builder), "split": split, "examples": meta["examples"][split],
           "skipped": meta["skipped"][split], "prevalence": meta["prevalence"][split]}
          for split in meta["examples"]]


def summary_lines(builder: tfds.core.DatasetBuilder) -> str:
  return "\n".join(json.dumps(s) for s in split_summaries(builder))


# Builders kept in their own modules import this one and add themselves to BUILDERS
# when imported, so they are imported here, last.
from medbench_jax.data import chexpert, dicom_sets, medmnist, segmentation  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
