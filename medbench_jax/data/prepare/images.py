"""Image files -> the uint8 arrays the builders store, and finding them by file name."""

from __future__ import annotations

import glob
import io
import os
import pathlib
import warnings
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from medbench_jax.data.prepare.errors import DataFormatError

# The most pixels an image file may declare: 10,000 x 10,000, five times a large
# mammogram. PNG and JPEG shrink a blank image a thousandfold, so a file of a few hundred
# kilobytes can declare gigabytes; such a file is refused before anything is decoded.
MAX_IMAGE_PIXELS = 100_000_000


def _check_complete(data: bytes) -> str | None:
  """Why an encoded PNG/JPEG is truncated (decoders often return half an image)."""
  if data.startswith(b"\x89PNG"):
    return None if b"IEND" in data[-12:] else "truncated PNG (no IEND chunk at the end)"
  if data.startswith(b"\xff\xd8"):
    return None if b"\xff\xd9" in data.rstrip(b"\x00")[-2:] else (
        "truncated JPEG (no end-of-image marker)")
  return None


def check_declared_size(data: bytes, path: str | os.PathLike) -> None:
  """Refuses an encoded image whose header declares more than MAX_IMAGE_PIXELS."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
  except Image.DecompressionBombError as e:  # PIL's own, higher limit
    raise DataFormatError(f"image file {path} is too large to decode ({e}); refused") from None
  except Exception:  # pylint: disable=broad-except
    return  # a format PIL does not read: OpenCV judges it (and caps it at 2^30 pixels)
  if width * height > MAX_IMAGE_PIXELS:
    raise DataFormatError(
        f"image file {path} declares {width} x {height} pixels, more than the "
        f"{MAX_IMAGE_PIXELS:,} an image may have (a decompression bomb, or not a "
        "radiograph); refused without decoding it")


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
  check_declared_size(data, path)
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
