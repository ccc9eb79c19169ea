"""The common TFDS builder: publishers' on-disk layouts -> ArrayRecord, read back by grain.

Images are stored decoded (uint8) at the builder config's resolution, so training
never decodes a PNG, JPEG or DICOM per step: the input pipeline only crops, flips
and rotates arrays it reads by random access. The default resolution is 256 px
(`config.dataset.image_size`): the study resizes to 256 and crops 224, so 256 keeps
every pixel the crops see, while a ChestX-ray14 copy takes 7 GB instead of the
117 GB it would take at the published 1024 px. Every pixel array (image, mask, FOV)
is stored as raw bytes (`pixel_tensor`).

How one preparation runs (`PreparedBuilder.prepare_once`, or TFDS's
`download_and_prepare`):
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
4. Patients: no patient may sit in two splits (`splits.check_patients`: a logged
   warning between two of the publisher's official splits, an error otherwise).
5. TFDS writes the ArrayRecords in record order (shuffling disabled: training
   shuffles anyway) and `label_table.npz`: per split the raw labels, patient ids and
   frontal flags, which data/sources.py reads for label policies, label fractions
   and statistics without touching an image.
A finished preparation is reused; an interrupted one leaves only TFDS's incomplete
directory, which the next `prepare_once` deletes before it starts again.

Two siblings share this machinery: `ClassificationBuilder` (image, labels) and
`SegmentationBuilder` (image, per-class masks, FOV where the data set has one).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import hashlib
import os
import pathlib
import shutil
from typing import Any
import zipfile

from absl import logging
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare import staging
from medbench_jax.data.prepare.decoders import ImageDecoder
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.masks import SegDecoder
from medbench_jax.data.prepare.masks import SegRecord
from medbench_jax.data.prepare.parsing import Record

SPLITS = splits_lib.SPLITS
LABEL_TABLE = "label_table.npz"


class ResolutionConfig(tfds.core.BuilderConfig):
  """One prepared copy of a data set per stored resolution.

  keep_aspect: images keep their own aspect ratio, shrunk only until their longer side
  fits image_size (classification sets; prepare/decoders.py).
  """

  def __init__(self, *, image_size: int, keep_aspect: bool = False, **kwargs):
    super().__init__(
        name=f"{image_size}px" + ("_aspect" if keep_aspect else ""),
        description=(f"Images within {image_size}x{image_size} at their own aspect ratio."
                     if keep_aspect else f"Images stored at {image_size}x{image_size}."),
        **kwargs)
    self.image_size = image_size
    self.keep_aspect = keep_aspect


def resolution_configs(sizes: Sequence[int] = (144, 224, 256, 512)) -> list[ResolutionConfig]:
  return [ResolutionConfig(image_size=s) for s in sizes]


def pixel_tensor(shape: tuple[int, ...]) -> tfds.features.Tensor:
  """A uint8 array feature (image, mask, FOV) stored as raw bytes.

  TFDS's default encoding widens uint8 to int64 varints, which made reading an
  example 4x slower than augmenting it; raw bytes parse as one copy.
  """
  return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                              encoding=tfds.features.Encoding.BYTES)


class PreparedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What every data set's builder shares (see the module docstring).

  Class attributes: LABELS (stored label order; segmentation: class names),
  EVAL_LABELS (labels the publisher evaluates on; default all), TASK (one of
  registry.TASKS; "multi-class" labels are stored one-hot), CHANNELS (1 gray, 3 RGB),
  OFFICIAL_SPLITS (splits whose patients the publisher assigned), TAKES_OPTIONS
  (the layout is described by options, as csv_folder's), CAN_KEEP_ASPECT (a
  keep-aspect copy can be prepared). Instance attributes set by
  `prepare_once`: skip_bad, workers.
  """

  BUILDER_CONFIGS = resolution_configs()
  LABELS: tuple[str, ...] = ()
  EVAL_LABELS: tuple[str, ...] = ()
  TASK = ""
  CHANNELS = 1
  OFFICIAL_SPLITS: tuple[str, ...] = SPLITS
  TAKES_OPTIONS = False
  CAN_KEEP_ASPECT = False
  skip_bad = False
  workers = 1

  @classmethod
  def config_for(cls, image_size: int, options: Mapping[str, Any] | None = None,
                 keep_aspect: bool = False) -> tfds.core.BuilderConfig | str:
    """The builder config of a stored resolution (options: TAKES_OPTIONS builders)."""
    del options
    if keep_aspect and not cls.CAN_KEEP_ASPECT:
      raise ValueError(f"{cls.__name__} stores square images only; keep_aspect is for "
                       "classification sets of image or DICOM files")
    # A registered config must be passed by name: TFDS re-creates builders from their
    # init arguments in grain workers and refuses an equal-named config object.
    known = {(c.image_size, c.keep_aspect): c.name for c in cls.BUILDER_CONFIGS}
    return known.get((image_size, keep_aspect)) or ResolutionConfig(
        image_size=image_size, keep_aspect=keep_aspect)

  def prepare_once(self, manual_dir: str | os.PathLike, *, skip_bad: bool = False,
                   workers: int | None = None) -> PreparedBuilder:
    """Prepares from manual_dir unless a finished copy exists; returns the builder.

    An interrupted preparation (killed: TFDS had no chance to clean up) leaves an
    `incomplete.*` directory; it is deleted here and the preparation starts over.
    Run one preparation of a data set and resolution at a time.
    """
    if self.is_prepared():
      return self
    data_path = pathlib.Path(self.data_path)
    for stale in data_path.parent.glob(
        f"{tfds.core.constants.INCOMPLETE_PREFIX}*_{data_path.name}"):
      logging.info("Removing an interrupted preparation: %s", stale)
      shutil.rmtree(stale)
    self.skip_bad = skip_bad
    self.workers = workers or staging.default_workers()
    self.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return self

  # ---------------------------------------------------------------- per data set

  def read_records(self, manual_dir: pathlib.Path, problems: Problems
                   ) -> dict[str, list[Record]]:
    """The publisher's files -> records per split (bad rows go to `problems`)."""
    raise NotImplementedError

  def features(self) -> dict[str, Any]:
    raise NotImplementedError

  def decoder(self) -> staging.Decoder:
    """A picklable Decoder: record -> the uint8 array staged for it."""
    raise NotImplementedError

  def example(self, record: Record, array: np.ndarray) -> dict[str, Any]:
    """A record and its staged array -> the stored example."""
    raise NotImplementedError

  def stage_images(self, split: str, records: list[Record], scratch: pathlib.Path,
                   problems: Problems) -> None:
    staging.stage_records(records, self.decoder(), scratch, split, problems, self.workers)

  # ---------------------------------------------------------------- prepared copy

  def label_table(self, split: str) -> dict[str, np.ndarray]:
    """Raw labels (N, K), patient ids (N,) and frontal flags (N,) of a prepared split."""
    path = pathlib.Path(self.data_dir) / LABEL_TABLE
    try:
      with np.load(path, allow_pickle=False) as table:
        return {key: table[f"{split}/{key}"] for key in ("labels", "patient", "frontal")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      raise DataFormatError(f"Prepared file {path} is damaged ({type(e).__name__}: {e}). "
                            f"{self._prepare_again()}") from None

  def check_prepared_files(self) -> None:
    """Every ArrayRecord shard opens and holds as many examples as the preparation
    wrote, so a shard cut short (a full disk, a partial copy) fails here, naming
    itself, instead of in a reader deep inside training."""
    for split, info in self.info.splits.items():
      for path, expected in zip(info.filepaths, info.shard_lengths):
        try:
          reader = array_record_module.ArrayRecordReader(os.fspath(path),
                                                         "readahead_buffer_size:0")
          try:
            found = reader.num_records()
          finally:
            reader.close()
        except (OSError, RuntimeError, ValueError) as e:
          problem = f"{type(e).__name__}: {e}"
        else:
          if found == expected:
            continue
          problem = f"{found} examples where {expected} were written"
        raise DataFormatError(f"Prepared {split} shard {path} is damaged ({problem}): cut "
                              f"short or modified after preparation. {self._prepare_again()}")

  def _prepare_again(self) -> str:
    return (f"Delete {self.data_dir} and prepare the data set again (python -m "
            "medbench_jax.prepare, or the training command, which prepares it first).")

  # ---------------------------------------------------------------- TFDS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(self.features()),
        metadata=tfds.core.MetadataDict(
            label_names=list(self.LABELS),
            eval_label_names=list(self.EVAL_LABELS or self.LABELS), task=self.TASK),
        # Examples stay in record order, so row i of the label table is example i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    problems = Problems()
    records_of = self.read_records(manual_dir, problems)
    problems.raise_fatal()
    unknown = sorted(set(records_of) - set(SPLITS))
    if unknown:
      raise ValueError(f"{self.name}: read_records returned splits {unknown}; the splits "
                       f"are {SPLITS}")
    # During preparation data_dir is TFDS's incomplete directory: the scratch files
    # vanish with it if anything fails.
    scratch_dir = pathlib.Path(self.data_dir)
    staged = {}
    for split in (s for s in SPLITS if s in records_of):
      records = records_of[split]
      scratch = scratch_dir / f"{split}.scratch"
      self.stage_images(split, records, scratch, problems)
      slots = [i for i, r in enumerate(records) if not problems.is_bad(split, r.where)]
      staged[split] = (scratch, [records[i] for i in slots], slots)
    problems.check(self.skip_bad)
    for split, (_, kept, _) in staged.items():
      if not kept:
        raise DataFormatError(f"{self.name}: no usable examples left in split {split!r}")
    warnings = splits_lib.check_patients(
        {s: (r.patient for r in kept) for s, (_, kept, _) in staged.items()},
        self.OFFICIAL_SPLITS)
    write_label_table(scratch_dir / LABEL_TABLE, {s: kept for s, (_, kept, _) in staged.items()})
    skipped = problems.skipped()
    self.info.metadata.update(
        skipped={s: skipped.get(s, 0) for s in staged}, patient_warnings=warnings,
        official_splits=[s for s in staged if s in self.OFFICIAL_SPLITS],
        examples={s: len(kept) for s, (_, kept, _) in staged.items()},
        split_sha1={s: split_sha1(r.name for r in kept) for s, (_, kept, _) in staged.items()},
        prevalence={s: prevalence(np.stack([r.labels for r in kept]), self.LABELS)
                    for s, (_, kept, _) in staged.items()})
    return {split: self._generate_examples(*args) for split, args in staged.items()}

  def _generate_examples(self, scratch: pathlib.Path, records: list[Record],
                         slots: list[int]) -> Iterator[tuple[int, dict]]:
    shape = self.decoder().shape
    try:
      for i, (record, array) in enumerate(zip(records, staging.read_scratch(scratch, shape,
                                                                            slots))):
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


# ---------------------------------------------------------------- the two siblings


class ClassificationBuilder(PreparedBuilder, skip_registration=True):
  """Image classification: image (S, S, CHANNELS), labels float32 (K,), name.

  Keep-aspect copies store each image at its own (H, W) within S (decoders.py).
  """

  VERSION = tfds.core.Version("2.1.0")
  RELEASE_NOTES = {"2.0.0": "Staged decoding, label table, problem report.",
                   "2.1.0": "Images stored as raw bytes (4x faster reads)."}
  TASK = "multi-label"
  CAN_KEEP_ASPECT = True

  def features(self) -> dict[str, Any]:
    side = None if self.keep_aspect else self.builder_config.image_size
    return {"image": pixel_tensor((side, side, self.CHANNELS)),
            "labels": tfds.features.Tensor(shape=(len(self.LABELS),), dtype=np.float32),
            "name": tfds.features.Text()}

  @property
  def keep_aspect(self) -> bool:
    return getattr(self.builder_config, "keep_aspect", False)

  def decoder(self) -> ImageDecoder:
    return ImageDecoder(self.builder_config.image_size, self.CHANNELS, self.keep_aspect)

  def example(self, record: Record, array: np.ndarray) -> dict[str, Any]:
    return {"image": self.decoder().unpack(array), "labels": record.labels,
            "name": record.name}


class SegmentationBuilder(PreparedBuilder, skip_registration=True):
  """Image + per-class masks, at the config's resolution S:

    image  uint8 (S, S, C)  C = 1 (radiographs) or 3 (colour fundus photographs)
    mask   uint8 (S, S, K)  one 0/1 channel per class: classes may overlap (a
                            clavicle lies over a lung), which one label map could not hold
    fov    uint8 (S, S, 1)  HAS_FOV only: the camera's field of view, where Dice counts
    name   text

  Each class is the union of one or more published structures (`CLASSES`), so one
  layout serves several tasks: Montgomery as one "lungs" class or as left and right
  lungs, SCR as lungs, heart or clavicles. LABELS are the class names; the label
  table (and the prevalence of the summary lines) holds whether each class is
  present in the stored mask. Subclasses set CLASSES and implement read_records.
  """

  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {
      "2.0.0": "Staged decoding, label table, problem report.",
      "2.1.0": "Same storage as 2.0.0.",
      "3.0.0": "Image, mask and FOV stored as raw bytes (3x faster reads). Splits the "
               "publisher does not give are drawn by a salted hash of each patient id "
               "(data/splits.py) instead of a seeded shuffle of all of them: they change "
               "once, then stay put when a data set gains images."}
  TASK = "segmentation"
  # (class name, published structures whose union is that class)
  CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = ()
  HAS_FOV = False
  MASK_SCALE = 1.0
  IMAGE_FORMAT = "file"

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.LABELS = tuple(name for name, _ in cls.CLASSES)

  def features(self) -> dict[str, Any]:
    size = self.builder_config.image_size
    features = {"image": pixel_tensor((size, size, self.CHANNELS)),
                "mask": pixel_tensor((size, size, len(self.CLASSES))),
                "name": tfds.features.Text()}
    if self.HAS_FOV:
      features["fov"] = pixel_tensor((size, size, 1))
    return features

  def decoder(self) -> SegDecoder:
    return SegDecoder(self.builder_config.image_size, self.CHANNELS, len(self.CLASSES),
                      self.HAS_FOV, self.MASK_SCALE, self.IMAGE_FORMAT)

  def example(self, record: Record, array: np.ndarray) -> dict[str, Any]:
    channels, classes = self.CHANNELS, len(self.CLASSES)
    example = {"image": array[..., :channels], "name": record.name,
               "mask": array[..., channels:channels + classes]}
    if self.HAS_FOV:
      example["fov"] = array[..., channels + classes:]
    return example

  def stage_images(self, split, records, scratch, problems):
    super().stage_images(split, records, scratch, problems)
    # Class presence is known once the masks are decoded: it replaces the records'
    # NaN placeholder labels (each record owns its array) before the label table.
    good = [i for i, r in enumerate(records) if not problems.is_bad(split, r.where)]
    start, stop = self.CHANNELS, self.CHANNELS + len(self.CLASSES)
    for i, array in zip(good, staging.read_scratch(scratch, self.decoder().shape, good)):
      records[i].labels[:] = array[..., start:stop].any(axis=(0, 1))

  def record(self, name: str, image: pathlib.Path, structures: Mapping[str, pathlib.Path],
             patient: str = "", fov: pathlib.Path | None = None) -> SegRecord:
    """A record whose classes are unions of the named structure files."""
    return SegRecord(
        name, str(image), np.full(len(self.CLASSES), np.nan, np.float32), str(image),
        patient, masks=tuple(tuple(str(structures[s]) for s in parts)
                             for _, parts in self.CLASSES),
        fov=str(fov) if fov else "")

  def find(self, root: pathlib.Path, pattern: str, problems: Problems) -> list[pathlib.Path]:
    found = sorted(root.rglob(pattern))
    if not found:
      problems.fatal(str(root), f"no files match {pattern}. "
                     f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    return found


def split_sha1(names: Iterator[str]) -> str:
  """Identity of a split: sha1 of its example names in stored order, one per line."""
  return hashlib.sha1("\n".join(names).encode()).hexdigest()
