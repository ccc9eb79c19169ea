"""Image files -> the uint8 arrays the builders store, and finding them by file name."""

from __future__ import annotations

from collections.abc import Sequence
import glob
import io
import os
import pathlib
import warnings

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


def to_channels(image: np.ndarray, channels: int = 1) -> np.ndarray:
  """Any decoded image -> uint8 (H, W, channels) at its own size (1 gray, 3 RGB)."""
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
  return image.reshape(*image.shape[:2], channels)


def to_stored(image: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
  """Any decoded image -> uint8 (size, size, channels), area filter when shrinking."""
  image = to_channels(image, channels)
  if image.shape[:2] != (size, size):
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    image = cv2.resize(image, (size, size), interpolation=interpolation)
  return image.reshape(size, size, channels)


def fit_within(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W[, C]) -> shrunk by an area filter until neither side exceeds `size`.

  Keeps the aspect ratio and never enlarges: an image that fits is returned as it is,
  so a copy stored at its publisher's resolution holds the original pixels.
  """
  height, width = image.shape[:2]
  scale = size / max(height, width)
  if scale >= 1.0:
    return image
  target = (max(1, round(width * scale)), max(1, round(height * scale)))
  out = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
  return out.reshape(target[1], target[0], *image.shape[2:])


# A keep-aspect slot: height and width (big-endian uint16), then the pixels, zero-padded
# to the slot of the largest image the size allows.
_SLOT_HEADER = 4


def slot_shape(size: int, channels: int) -> tuple[int]:
  """Shape of the fixed staging slot that holds any image fitting within `size`."""
  return (_SLOT_HEADER + size * size * channels,)


def pack_slot(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, C) with H, W <= size -> its staging slot (see `unpack_slot`)."""
  height, width, channels = image.shape
  if max(height, width) > size:
    raise DataFormatError(f"a {width}x{height} image does not fit a {size} px slot")
  slot = np.zeros(slot_shape(size, channels), np.uint8)
  slot[:_SLOT_HEADER] = np.frombuffer(np.array([height, width], ">u2").tobytes(), np.uint8)
  slot[_SLOT_HEADER:_SLOT_HEADER + image.size] = image.reshape(-1)
  return slot


def unpack_slot(slot: np.ndarray, channels: int) -> np.ndarray:
  """A staging slot -> the uint8 (H, W, channels) image packed in it."""
  height, width = np.frombuffer(slot[:_SLOT_HEADER].tobytes(), ">u2")
  pixels = int(height) * int(width) * channels
  return slot[_SLOT_HEADER:_SLOT_HEADER + pixels].reshape(int(height), int(width), channels)


class ImageIndex:
  """File name -> path over the folders a publisher's archives extract to."""

  def __init__(self, root: pathlib.Path, patterns: Sequence[str]):
    self.root = root
    self.patterns = patterns
    self._paths: dict[str, str] = {}
    for pattern in patterns:
      for folder in sorted(glob.glob(str(root / pattern))):
        if not os.path.isdir(folder):  # a pattern such as "*" also matches files
          continue
        with os.scandir(folder) as entries:
          for entry in entries:
            self._paths.setdefault(entry.name, entry.path)

  def find(self, name: str) -> str | None:
    return self._paths.get(name)

  def missing(self, name: str) -> str:
    return (f"image file {name} not found in "
            f"{', '.join(str(self.root / p) for p in self.patterns)}")
