"""Writes small DICOM files for the builder tests (pydicom, no network)."""

import pathlib

import numpy as np
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid
from pydicom.uid import SecondaryCaptureImageStorage


def write(path: pathlib.Path, pixels: np.ndarray, patient: str = "",
          photometric: str = "MONOCHROME2", bits: int = 8) -> pathlib.Path:
  """An uncompressed single-frame grayscale file holding `pixels` (uint8 or uint16)."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  if patient:
    ds.PatientID = patient
  ds.set_pixel_data(pixels, photometric, bits)
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path
