"""Classification images -> the stored array: square, or at the image's own aspect ratio.

A square copy (the default) resizes every image to size x size. A keep-aspect copy
(`config.dataset.keep_aspect`) shrinks an image only as far as needed for its longer
side to fit `size` and never enlarges it, so that a copy at the publisher's
resolution (1024 px for ChestX-ray14) holds the original pixels and training crops
are drawn from them with the original aspect ratio, as the reference study's
RandomResizedCrop on the full image does. Staging slots have one fixed size, so a
keep-aspect image travels packed with its height and width (images.pack_slot); the
builder stores it unpacked, at its own shape.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare import images
from medbench_jax.data.prepare.parsing import Record
from medbench_jax.data.prepare.staging import Decoder


@dataclasses.dataclass(frozen=True)
class ImageDecoder(Decoder):
  """An image file OpenCV reads, or a DICOM file by its suffix (.dcm, .dicom).

  DICOMs go through dicom.read_gray (modality LUT, the file's VOI window, MONOCHROME1
  inversion) and are resized before they are quantised to 8 bits.
  """
  keep_aspect: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    if self.keep_aspect:
      return images.slot_shape(self.size, self.channels)
    return super().shape

  def __call__(self, record: Record) -> np.ndarray:
    if pathlib.Path(record.path).suffix.lower() in dicom.DICOM_SUFFIXES:
      gray = dicom.read_gray(record.path)
      if self.keep_aspect:
        image = dicom.to_uint8(np.clip(images.fit_within(gray, self.size), 0.0, 1.0))
      else:
        image = dicom.to_uint8(gray, self.size)
      image = np.repeat(image, self.channels, axis=2)
    elif self.keep_aspect:
      image = images.fit_within(images.to_channels(images.read_image(record.path),
                                                   self.channels), self.size)
    else:
      return images.to_stored(images.read_image(record.path), self.size, self.channels)
    return images.pack_slot(image, self.size) if self.keep_aspect else image

  def unpack(self, array: np.ndarray) -> np.ndarray:
    """The staged array -> the image to store."""
    return images.unpack_slot(array, self.channels) if self.keep_aspect else array
