"""DICOM -> grayscale as a radiology viewer shows it, through pydicom.

The display pipeline of DICOM PS3.4 N.2: stored values -> Modality LUT (rescale
slope/intercept or a LUT table: CT in Hounsfield units) -> VOI (the publisher's
window centre/width or VOI LUT table: which value range is worth looking at) ->
polarity (MONOCHROME1 shows its smallest value as white). pydicom does each step;
this module chooses the steps, maps the VOI step's own output range to [0, 1] so
that "below the window" is exactly black and "above" exactly white, and names the
file in every error.

Presentation LUT Shape is not applied: X-ray IODs pair MONOCHROME1 with INVERSE
to describe the same inversion, so applying both would undo it.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import apply_voi
from pydicom.pixels import apply_windowing

from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.images import MAX_IMAGE_PIXELS

# auto: the VOI LUT table if present, else the window, else the image's own range.
# window: the window even where a VOI LUT table is present. minmax: ignore the VOI.
VOI_MODES = ("auto", "window", "minmax")
DICOM_SUFFIXES = (".dcm", ".dicom")


class DicomError(DataFormatError):
  """A DICOM file that cannot be read or shown as a grayscale image (file named)."""


def read_dataset(path: str | os.PathLike) -> pydicom.Dataset:
  try:
    return pydicom.dcmread(path)
  except (OSError, InvalidDicomError) as e:
    raise DicomError(f"{path}: not a readable DICOM file: {e}") from None


def patient_id(path: str | os.PathLike) -> str | None:
  """PatientID of a file, read without its pixel data (None where it is absent or empty)."""
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
  except (OSError, InvalidDicomError) as e:
    raise DicomError(f"{path}: not a readable DICOM file: {e}") from None
  return str(ds.get("PatientID") or "") or None


def decode_pixels(ds: pydicom.Dataset, path: str | os.PathLike) -> np.ndarray:
  """Stored pixel values; a file that cannot be decoded says why and what to install."""
  if "PixelData" not in ds:
    raise DicomError(f"{path}: the DICOM file has no pixel data")
  try:
    shape = [int(ds.get(key) or 1) for key in ("Rows", "Columns", "NumberOfFrames",
                                               "SamplesPerPixel")]
  except (TypeError, ValueError) as e:
    raise DicomError(f"{path}: malformed image dimensions ({e})") from None
  if math.prod(shape) > MAX_IMAGE_PIXELS:
    # Decoders allocate what the header declares before they look at the data.
    raise DicomError(f"{path}: declares {' x '.join(map(str, shape))} (rows, columns, "
                     f"frames, samples) pixels, more than the {MAX_IMAGE_PIXELS:,} an image "
                     "may have; refused without decoding it")
  syntax = ds.file_meta.get("TransferSyntaxUID")
  try:
    return ds.pixel_array
  except Exception as e:  # pydicom raises bare RuntimeError/ValueError/NotImplementedError
    hint = ""
    if syntax is not None and syntax.is_compressed:
      # pydicom lists the plugins it tried; these are the ones requirements.txt pins.
      hint = (" Compressed pixel data needs a decoder plugin: pip install pylibjpeg "
              "pylibjpeg-libjpeg (JPEG, JPEG-LS, lossless JPEG) or pylibjpeg-openjpeg "
              "(JPEG 2000); a file that these fail on is damaged.")
    name = syntax.name if syntax is not None else "unknown transfer syntax"
    raise DicomError(f"{path}: cannot decode its pixel data ({name}): {e}.{hint}") from None


def _voi(values: np.ndarray, ds: pydicom.Dataset, voi: str, index: int,
         path: str | os.PathLike) -> tuple[np.ndarray, float, float]:
  """Applies the VOI step; returns the result and the step's output range."""
  if voi == "auto" and ds.get("VOILUTSequence"):
    items = ds.VOILUTSequence
    if index >= len(items):
      raise DicomError(f"{path}: VOI LUT {index} requested, the file has {len(items)}")
    entries, first, _ = items[index].LUTDescriptor
    # The table's own extremes, not its nominal bit depth: tables often use 12 of 16 bits.
    table = apply_voi(np.arange(first, first + (entries or 2 ** 16)), ds, index)
    # A rescaled (float) input is rounded: the table is indexed by integers.
    out = apply_voi(np.rint(values).astype(np.int64), ds, index)
    return out, float(table.min()), float(table.max())
  if voi in ("auto", "window") and "WindowCenter" in ds and "WindowWidth" in ds:
    count = ds["WindowCenter"].VM
    if index >= count:
      raise DicomError(f"{path}: window {index} requested, the file has {count}")
    try:
      out = apply_windowing(values, ds, index)
      # pydicom's output range (it depends on bit depth, sign and rescale): the
      # images of -inf and +inf, which every VOI function maps to its extremes.
      low, high = apply_windowing(np.array([-np.inf, np.inf]), ds, index)
    except ValueError as e:  # width < 1, unknown VOI LUT Function
      raise DicomError(f"{path}: {e}") from None
    return out, float(low), float(high)
  return values, float(values.min()), float(values.max())


def to_gray(ds: pydicom.Dataset, path: str | os.PathLike, *, voi: str = "auto",
            window_index: int = 0) -> np.ndarray:
  """float32 (H, W) in [0, 1] from a read dataset; 1 is white (bone on a radiograph)."""
  if voi not in VOI_MODES:
    raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
  photometric = ds.get("PhotometricInterpretation")
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise DicomError(f"{path}: PhotometricInterpretation {photometric!r} is not "
                     "grayscale (MONOCHROME1 or MONOCHROME2)")
  frames = int(ds.get("NumberOfFrames") or 1)
  if frames != 1:
    raise DicomError(f"{path}: {frames} frames; a radiograph has one")
  values = apply_modality_lut(decode_pixels(ds, path), ds)
  values, low, high = _voi(values, ds, voi, window_index, path)
  if high > low:
    gray = np.clip((np.asarray(values, np.float64) - low) / (high - low), 0.0, 1.0)
  else:  # a constant image has no contrast to stretch
    gray = np.zeros(values.shape)
  if photometric == "MONOCHROME1":
    gray = 1.0 - gray
  return gray.astype(np.float32)


def read_gray(path: str | os.PathLike, *, voi: str = "auto",
              window_index: int = 0) -> np.ndarray:
  """Reads a DICOM file as float32 (H, W) in [0, 1], 1 = white. See `to_gray`."""
  return to_gray(read_dataset(path), path, voi=voi, window_index=window_index)


def to_uint8(gray: np.ndarray, size: int | None = None) -> np.ndarray:
  """[0, 1] float (H, W) -> uint8 (size, size, 1), resized before quantisation."""
  if size is not None and gray.shape != (size, size):
    interpolation = cv2.INTER_AREA if gray.shape[0] > size else cv2.INTER_CUBIC
    gray = np.clip(cv2.resize(gray, (size, size), interpolation=interpolation), 0.0, 1.0)
  return np.rint(gray * 255.0).astype(np.uint8)[..., None]


def load_gray(path: str | os.PathLike, size: int, *, voi: str = "auto",
              window_index: int = 0) -> np.ndarray:
  """A DICOM file as the builders store images: uint8 (size, size, 1)."""
  return to_uint8(read_gray(path, voi=voi, window_index=window_index), size)
