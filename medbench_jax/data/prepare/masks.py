"""Segmentation examples' files -> stored image + mask (+ FOV) channels.

Masks come as binary image files (any pixel > 0 is inside), SIIM-ACR's run-length
encoding, or on another scale than their image (SCR: 1024 px masks on 2048 px JSRT
raw images). Images are resized with an area filter, masks and the FOV with nearest
neighbour, so a stored mask holds only 0 and 1. A mask whose size does not match its
image (at the publisher's mask scale) is a data problem naming the mask file.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import cv2
import numpy as np
import PIL.Image

from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.images import read_image
from medbench_jax.data.prepare.images import to_stored
from medbench_jax.data.prepare.parsing import Record
from medbench_jax.data.prepare.staging import Decoder


@dataclasses.dataclass(frozen=True, slots=True)
class SegRecord(Record):
  """A Record with its masks.

  masks: per class, the files whose union is that class. rle: SIIM's rows
  (EncodedPixels, "file:line") of its single class. fov: the FOV mask file, if any.
  """
  masks: tuple[tuple[str, ...], ...] = ()
  rle: tuple[tuple[str, str], ...] = ()
  fov: str = ""


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
class SegDecoder(Decoder):
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
      image = read_image(path)
    return to_stored(image, self.size, self.channels), image.shape[:2]

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
