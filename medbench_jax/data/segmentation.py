"""Segmentation data sets in their publishers' on-disk layouts -> image + masks.

Built on builders.ClassificationBuilder (same problem report, --skip_bad, staged
decoding in worker processes, patient checks). Every builder stores, at its
config's resolution S:
  image  uint8 (S, S, C)  C = 1 (radiographs) or 3 (DRIVE's colour fundus photographs)
  mask   uint8 (S, S, K)  one 0/1 channel per class: classes may overlap (a clavicle
                          lies over a lung), which one label map could not hold
  fov    uint8 (S, S, 1)  DRIVE only: the camera's field of view, where Dice is computed
  name   text
Images are resized with an area filter, masks and the FOV with nearest neighbour, so
a stored mask holds only 0 and 1. A mask whose size does not match its image (at the
publisher's mask scale) is a data problem naming the mask file. LABELS are the
class names; the label table (and the prevalence of the summary lines) holds
whether each class is present in the stored mask.

Each class is the union of one or more published structures (`CLASSES`), so one
layout serves several tasks: Montgomery as one "lungs" class or as left and right
lungs, SCR as lungs, heart or clavicles.

Derived splits (the publishers give none; `splits.derive`, seed 0, by patient where
ids exist):
  montgomery*   70/10/20 % of patients (MCUCXR_0001 of MCUCXR_0001_0.png)
  jsrt_*        test = SCR fold2 (official); train/validation = 80/20 % of SCR fold1
  siim_acr_*    70/10/20 % of patients (DICOM PatientID) with a row in train-rle.csv
  drive         test = the official test set; train/validation = 80/20 % of training
  segmentation_folder   70/10/20 % of images
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
from typing import Any, Mapping

import cv2
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from medbench_jax.data import builders
from medbench_jax.data import dicom
from medbench_jax.data import phantom
from medbench_jax.data import splits

DataFormatError = builders.DataFormatError
Problems = builders.Problems
SplitRecords = dict[str, list[builders.Record]]


@dataclasses.dataclass(frozen=True, slots=True)
class SegRecord(builders.Record):
  """A Record with its masks.

  masks: per class, the files whose union is that class. rle: SIIM's rows
  (EncodedPixels, "file:line") of its single class. fov: the FOV mask file, if any.
  """
  masks: tuple[tuple[str, ...], ...] = ()
  rle: tuple[tuple[str, str], ...] = ()
  fov: str = ""


# ---------------------------------------------------------------- decoding


def read_mask(path: str, shape: tuple[int, int], image: str) -> np.ndarray:
  """A binary mask file (any pixel > 0 is inside, as the reference study reads them)."""
  if not pathlib.Path(path).exists():
    raise DataFormatError(f"mask file {path} (for image {image}) does not exist")
  try:
    with PIL.Image.open(path) as m:
      mask = np.asarray(m.convert("L")) > 0
  except (OSError, ValueError) as e:
    raise DataFormatError(f"cannot decode mask {path}: {e}") from None
  if mask.shape != tuple(shape):
    raise DataFormatError(
        f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels, expected "
        f"{shape[1]}x{shape[0]} to match image {image}")
  return mask


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """(H, W, K) 0/1 -> uint8 (size, size, K) by nearest neighbour: no new values."""
  mask = mask.astype(np.uint8)
  if mask.shape[:2] != (size, size):
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
  return mask.reshape(size, size, -1)


def decode_relative_rle(rle: str, shape: tuple[int, int], where: str) -> np.ndarray:
  """SIIM-ACR's run-length encoding (the competition's mask_functions.rle2mask).

  Pairs (gap, length): each gap counts from the end of the previous run, over the
  pixels in column-major order (rle2mask fills a flat array, reshapes it (width,
  height) and the competition's kernels transpose it). "-1" is an empty mask.
  """
  height, width = shape
  if rle.strip() == "-1":
    return np.zeros(shape, bool)
  try:
    values = np.array(rle.split(), np.int64)
  except ValueError:
    raise DataFormatError(f"{where}: EncodedPixels must be integers or -1") from None
  if values.size == 0 or values.size % 2 or (values < 0).any() or (values[1::2] == 0).any():
    raise DataFormatError(f"{where}: EncodedPixels must be pairs of gap >= 0, length > 0")
  gaps, lengths = values[0::2], values[1::2]
  starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
  ends = starts + lengths
  if ends[-1] > height * width:
    raise DataFormatError(f"{where}: runs reach pixel {ends[-1]}, past the {width}x{height} "
                          "image")
  # +1 where a run starts, -1 where it ends: the running sum is 1 inside runs.
  edges = np.zeros(height * width + 1, np.int64)
  np.add.at(edges, starts, 1)
  np.add.at(edges, ends, -1)
  return (np.cumsum(edges[:-1]) > 0).reshape(width, height).T


JSRT_SHAPE = (2048, 2048)
JSRT_MAX = 4095  # 12 bits


def read_jsrt(path: str) -> np.ndarray:
  """A JSRT .IMG (2048x2048 12-bit big-endian words, no header) as uint8, bone white."""
  raw = np.fromfile(path, ">u2")
  if raw.size != math.prod(JSRT_SHAPE):
    raise DataFormatError(f"{path}: {raw.size * 2} bytes; a JSRT image is "
                          f"{JSRT_SHAPE[1]}x{JSRT_SHAPE[0]} 16-bit big-endian words")
  # JSRT keeps the film's convention: larger values are darker. Invert so bone is
  # white, as in MONOCHROME2 and every other data set here. Values beyond 12 bits do
  # not occur in the release; clipping keeps a stray one from wrapping around.
  values = np.minimum(raw.reshape(JSRT_SHAPE), JSRT_MAX)
  return np.rint((JSRT_MAX - values) * (255.0 / JSRT_MAX)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SegDecoder(builders.Decoder):
  """SegRecord -> image, mask (and FOV) channels stacked: (S, S, C + K [+ 1]).

  image_format: "file" (anything OpenCV reads, or DICOM by suffix) or "jsrt".
  mask_scale: published mask size / image size (SCR: 1024 masks on 2048 images).
  """
  num_classes: int = 1
  has_fov: bool = False
  mask_scale: float = 1.0
  image_format: str = "file"

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.size, self.size, self.channels + self.num_classes + int(self.has_fov))

  def _image(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The stored image and the file's own (height, width)."""
    if self.image_format == "jsrt":
      image = read_jsrt(path)
    elif pathlib.Path(path).suffix.lower() in dicom.DICOM_SUFFIXES:
      gray = dicom.read_gray(path)
      return np.repeat(dicom.to_uint8(gray, self.size), self.channels, axis=2), gray.shape
    else:
      image = builders.read_image(path)
    return builders.to_stored(image, self.size, self.channels), image.shape[:2]

  def __call__(self, record: SegRecord) -> np.ndarray:
    image, native = self._image(record.path)
    shape = tuple(int(round(d * self.mask_scale)) for d in native)
    if record.rle:
      classes = [np.logical_or.reduce([decode_relative_rle(rle, shape, where)
                                       for rle, where in record.rle])]
    else:
      classes = [np.logical_or.reduce([read_mask(f, shape, record.path) for f in files])
                 for files in record.masks]
    parts = [image, resize_mask(np.stack(classes, axis=-1), self.size)]
    if self.has_fov:
      parts.append(resize_mask(read_mask(record.fov, native, record.path)[..., None],
                               self.size))
    return np.concatenate(parts, axis=-1)


# ---------------------------------------------------------------- builders


class SegmentationBuilder(builders.ClassificationBuilder, skip_registration=True):
  """Image + per-class masks. Subclasses set CLASSES and implement read_records."""

  TASK = "segmentation"
  # (class name, published structures whose union is that class)
  CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = ()
  HAS_FOV = False
  MASK_SCALE = 1.0
  IMAGE_FORMAT = "file"

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # The class names are the labels (metadata label_names, the label table's columns).
    cls.LABELS = tuple(name for name, _ in cls.CLASSES)

  def features(self) -> dict[str, Any]:
    size = self.builder_config.image_size
    features = {
        "image": tfds.features.Tensor(shape=(size, size, self.CHANNELS), dtype=np.uint8),
        "mask": tfds.features.Tensor(shape=(size, size, len(self.CLASSES)), dtype=np.uint8),
        "name": tfds.features.Text()}
    if self.HAS_FOV:
      features["fov"] = tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8)
    return features

  def decoder(self) -> SegDecoder:
    return SegDecoder(self.builder_config.image_size, self.CHANNELS, len(self.CLASSES),
                      self.HAS_FOV, self.MASK_SCALE, self.IMAGE_FORMAT)

  def example(self, record, array):
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
    for i, array in zip(good, builders.read_scratch(scratch, self.decoder().shape, good)):
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


def _by_split(records: list[SegRecord], fractions: Mapping[str, float]) -> SplitRecords:
  """Derived patient-level splits (a record without a patient id is its own patient)."""
  by_name = {r.name: r for r in records}
  derived = splits.derive(list(by_name), fractions,
                          groups=[r.patient or r.name for r in by_name.values()])
  return {split: [by_name[n] for n in names] for split, names in derived.items()}


class _Montgomery(SegmentationBuilder, skip_registration=True):
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold NLM's Montgomery County set (NLM-MontgomeryCXRSet.zip,
  https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets)
  extracted: CXR_png/*.png and ManualMask/leftMask/*.png, ManualMask/rightMask/*.png
  (the zip's MontgomerySet/ folder above them is fine).
  """
  OFFICIAL_SPLITS = ()

  def read_records(self, manual_dir, problems):
    records = []
    for path in self.find(manual_dir, "CXR_png/*.png", problems):
      masks = path.parent.parent / "ManualMask"
      # MCUCXR_0001_0.png: patient 0001, TB label 0.
      records.append(self.record(path.stem, path, {
          s: masks / s / path.name for s in ("leftMask", "rightMask")},
          patient=path.stem.rsplit("_", 1)[0]))
    return _by_split(records, {"train": 0.7, "validation": 0.1, "test": 0.2})


class MontgomeryLungs(_Montgomery):
  """Montgomery County CXR: both lungs as one class."""
  CLASSES = (("lungs", ("leftMask", "rightMask")),)


class MontgomeryLeftRight(_Montgomery):
  """Montgomery County CXR: the patient's left and right lung as two classes."""
  CLASSES = (("left_lung", ("leftMask",)), ("right_lung", ("rightMask",)))


SCR_STRUCTURES = ("left lung", "right lung", "heart", "left clavicle", "right clavicle")


class _JsrtScr(SegmentationBuilder, skip_registration=True):
  """JSRT radiographs with the SCR database's manual masks."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the JSRT images (JPCLN001.IMG ... JPCNN093.IMG, 2048x2048
  12-bit big-endian raw, http://db.jsrt.or.jp/eng.php) anywhere below it, and the SCR
  masks as SCR publishes them (https://www.isi.uu.nl/Research/Databases/SCR/):
  scratch/fold1/masks/{left lung,right lung,heart,left clavicle,right clavicle}/*.gif
  and the same under fold2 (1024x1024 GIFs).
  """
  IMAGE_FORMAT = "jsrt"
  MASK_SCALE = 0.5  # SCR drew its masks on 1024x1024 copies of the 2048x2048 images
  OFFICIAL_SPLITS = ("test",)

  def read_records(self, manual_dir, problems):
    images = {p.stem: p for p in manual_dir.rglob("*.IMG")}
    masks, fold = collections.defaultdict(dict), {}
    for gif in self.find(manual_dir, "masks/*/*.gif", problems):
      if gif.parent.name in SCR_STRUCTURES:
        masks[gif.stem][gif.parent.name] = gif
        fold[gif.stem] = gif.parent.parent.parent.name  # fold1/masks/heart/X.gif
    bad_folds = sorted(set(fold.values()) - {"fold1", "fold2"})
    if bad_folds:
      problems.fatal(str(manual_dir), f"SCR masks must lie in fold1/masks/ and "
                     f"fold2/masks/, found {bad_folds}")
    by_fold = {"fold1": [], "fold2": []}
    for name in sorted(masks):
      split = "test" if fold[name] == "fold2" else "train"
      where = str(next(iter(masks[name].values())))
      if name not in images:
        problems.add(split, where, f"its JSRT image {name}.IMG is not under {manual_dir}")
        continue
      missing = [s for s in SCR_STRUCTURES if s not in masks[name]]
      if missing:
        problems.add(split, where, f"{name} has no SCR mask for {missing}")
        continue
      if fold[name] in by_fold:
        by_fold[fold[name]].append(self.record(name, images[name], masks[name]))
    result = _by_split(by_fold["fold1"], {"train": 0.8, "validation": 0.2})
    result["test"] = by_fold["fold2"]
    return result


class JsrtLungs(_JsrtScr):
  CLASSES = (("lungs", ("left lung", "right lung")),)


class JsrtHeart(_JsrtScr):
  CLASSES = (("heart", ("heart",)),)


class JsrtClavicles(_JsrtScr):
  CLASSES = (("clavicles", ("left clavicle", "right clavicle")),)


class JsrtScr(_JsrtScr):
  """All five SCR structures, one channel each (they overlap)."""
  CLASSES = tuple((s.replace(" ", "_"), (s,)) for s in SCR_STRUCTURES)


class SiimAcrPneumothorax(SegmentationBuilder):
  """SIIM-ACR Pneumothorax Segmentation (2019), the competition's first-stage release."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the competition's dicom-images-train/ (nested study/series
  folders of <ImageId>.dcm) and train-rle.csv (ImageId, EncodedPixels; several rows
  per image are unioned, -1 is an empty mask). Images without a row (the unlabelled
  test images) are not used.
  """
  CLASSES = (("pneumothorax", ("pneumothorax",)),)
  OFFICIAL_SPLITS = ()

  def read_records(self, manual_dir, problems):
    found = self.find(manual_dir, "train-rle.csv", problems)
    if len(found) > 1:
      problems.fatal(str(manual_dir), f"several train-rle.csv files, keep one: {found}")
    if problems.fatal_errors:
      return {}
    rows = collections.defaultdict(list)
    for where, row in builders.read_csv(found[0], "train", problems,
                                        ("ImageId", "EncodedPixels")):
      rows[row["ImageId"].strip()].append((row["EncodedPixels"], where))
    files = {p.stem: p for p in manual_dir.rglob("*.dcm")}
    records = []
    for name, encoded in rows.items():
      if name not in files:
        problems.add("train", encoded[0][1], f"image {name}.dcm is not under {manual_dir}")
        continue
      try:
        patient = dicom.patient_id(files[name]) or ""
      except DataFormatError as e:
        problems.add("train", encoded[0][1], str(e))
        continue
      records.append(SegRecord(name, str(files[name]), np.full(1, np.nan, np.float32),
                               encoded[0][1], patient, rle=tuple(encoded)))
    return _by_split(records, {"train": 0.7, "validation": 0.1, "test": 0.2})


class DriveVessels(SegmentationBuilder):
  """DRIVE retinal vessels: colour images, first observer's masks, camera FOV."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold DRIVE as published (https://drive.grand-challenge.org/):
  training/{images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif}
  and test/{images/NN_test.tif, 1st_manual/NN_manual1.gif, mask/NN_test_mask.gif}.
  """
  CLASSES = (("vessels", ("1st_manual",)),)
  CHANNELS = 3
  HAS_FOV = True
  OFFICIAL_SPLITS = ("test",)

  def _part(self, root: pathlib.Path, part: str, problems: Problems) -> list[SegRecord]:
    records = []
    for path in self.find(root, f"{part}/images/*_{part}.tif", problems):
      number, folder = path.stem.split("_")[0], path.parent.parent
      records.append(self.record(
          path.stem, path, {"1st_manual": folder / "1st_manual" / f"{number}_manual1.gif"},
          fov=folder / "mask" / f"{number}_{part}_mask.gif"))
    return records

  def read_records(self, manual_dir, problems):
    result = _by_split(self._part(manual_dir, "training", problems),
                       {"train": 0.8, "validation": 0.2})
    result["test"] = self._part(manual_dir, "test", problems)
    return result


class SegmentationFolder(SegmentationBuilder):
  """Any binary segmentation set: images/NAME.ext + masks/NAME.ext (mask > 0 is inside)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold images/ and masks/ with one mask per image under the same name
  (extensions may differ: images/a.dcm + masks/a.png); any image format OpenCV reads,
  or DICOM.
  """
  CLASSES = (("foreground", ("mask",)),)
  OFFICIAL_SPLITS = ()

  def read_records(self, manual_dir, problems):
    masks = {p.stem: p for p in (manual_dir / "masks").glob("*")}
    records = []
    for image in self.find(manual_dir, "images/*", problems):
      if image.stem not in masks:
        problems.add("train", str(image), f"no mask {manual_dir / 'masks' / image.stem}.*")
        continue
      records.append(self.record(image.stem, image, {"mask": masks[image.stem]}))
    return _by_split(records, {"train": 0.7, "validation": 0.1, "test": 0.2})


class PhantomCxrSeg(SegmentationBuilder):
  """The embedded phantom set's anatomy masks (phantom.MASK_CLASSES), its split lists."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = builders.PhantomCxr.MANUAL_DOWNLOAD_INSTRUCTIONS
  CLASSES = tuple((c, (c,)) for c in phantom.MASK_CLASSES)

  def read_records(self, manual_dir, problems):
    result = {}
    for split, list_file in builders.PhantomCxr.SPLIT_FILES.items():
      if not (manual_dir / list_file).exists():
        problems.fatal(str(manual_dir / list_file), "missing split list. "
                       + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        continue
      result[split] = [
          self.record(e.name, manual_dir / "images" / e.name,
                      {c: manual_dir / "masks" / c / e.name for c in phantom.MASK_CLASSES})
          for e in builders.read_label_list(manual_dir / list_file, len(phantom.FINDINGS),
                                            problems, split)]
    return result


BUILDERS = {
    "montgomery": MontgomeryLungs,
    "montgomery_lr": MontgomeryLeftRight,
    "jsrt_lungs": JsrtLungs,
    "jsrt_heart": JsrtHeart,
    "jsrt_clavicles": JsrtClavicles,
    "jsrt_scr": JsrtScr,
    "siim_acr_pneumothorax": SiimAcrPneumothorax,
    "drive": DriveVessels,
    "segmentation_folder": SegmentationFolder,
    "phantom_cxr_seg": PhantomCxrSeg,
}
builders.BUILDERS.update(BUILDERS)
