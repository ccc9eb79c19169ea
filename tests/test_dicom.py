"""DICOM -> grayscale: checked against pydicom's own LUT functions on its bundled files."""

import warnings

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import apply_voi
from pydicom.pixels import apply_voi_lut
from pydicom.sequence import Sequence
import pytest

from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare.errors import DataFormatError


def _testdata(name: str) -> str:
  path = get_testdata_file(name)
  assert path is not None, f"{name} is not in this pydicom wheel"
  return path


def _read(name: str) -> pydicom.Dataset:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # some bundled files carry deliberate oddities
    return pydicom.dcmread(_testdata(name))


def _window_range(ds: pydicom.Dataset) -> tuple[float, float]:
  """PS3.3 C.11.2.1.2: the window's output range, written out from the standard."""
  bits = ds.BitsStored
  low, high = ((0, 2 ** bits - 1) if ds.PixelRepresentation == 0
               else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
  if "RescaleSlope" in ds:
    low = low * ds.RescaleSlope + ds.RescaleIntercept
    high = high * ds.RescaleSlope + ds.RescaleIntercept
  return low, high


@pytest.mark.parametrize("name,index", [
    ("MR_small.dcm", 0),            # 16-bit signed, one window
    ("examples_overlay.dcm", 0),    # 12-bit unsigned, two windows (multi-valued)
    ("examples_overlay.dcm", 1),
    ("693_J2KI.dcm", 0),            # JPEG 2000, 14-bit signed, rescale + window
    ("J2K_pixelrep_mismatch.dcm", 0),
])
def test_window_matches_pydicom(name, index):
  ds = _read(name)
  reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=index)
  low, high = _window_range(ds)
  expected = (reference - low) / (high - low)
  gray = dicom.read_gray(_testdata(name), window_index=index)
  assert gray.dtype == np.float32 and gray.shape == ds.pixel_array.shape
  np.testing.assert_allclose(gray, expected, atol=1e-6)
  assert 0.0 <= gray.min() and gray.max() <= 1.0


def test_windows_of_a_multi_valued_file_differ():
  path = _testdata("examples_overlay.dcm")
  assert not np.array_equal(dicom.read_gray(path, window_index=0),
                            dicom.read_gray(path, window_index=1))
  with pytest.raises(dicom.DicomError, match=r"examples_overlay.dcm: window 2 requested, "
                                             r"the file has 2"):
    dicom.read_gray(path, window_index=2)


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPGExtended.dcm"])
def test_no_voi_scales_the_rescaled_range(name):
  # CT_small: rescale to HU, no window. JPGExtended: 12-bit JPEG (needs pylibjpeg).
  ds = _read(name)
  assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
  values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
  expected = (values - values.min()) / (values.max() - values.min())
  np.testing.assert_allclose(dicom.read_gray(_testdata(name)), expected, atol=1e-6)


def test_minmax_mode_ignores_the_window():
  ds = _read("MR_small.dcm")
  values = ds.pixel_array.astype(np.float64)
  expected = (values - values.min()) / (values.max() - values.min())
  np.testing.assert_allclose(dicom.read_gray(_testdata("MR_small.dcm"), voi="minmax"),
                             expected, atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm"])
def test_lossless_encodings_decode_to_the_same_image(name):
  np.testing.assert_array_equal(dicom.read_gray(_testdata(name)),
                                dicom.read_gray(_testdata("MR_small.dcm")))


def test_monochrome1_is_inverted(tmp_path):
  # pydicom ships no MONOCHROME1 image: relabel MR_small, keeping its pixels.
  ds = _read("MR_small.dcm")
  ds.PhotometricInterpretation = "MONOCHROME1"
  path = tmp_path / "mono1.dcm"
  ds.save_as(path)
  np.testing.assert_allclose(dicom.read_gray(path),
                             1.0 - dicom.read_gray(_testdata("MR_small.dcm")), atol=1e-7)


def _with_voi_lut(tmp_path):
  """CT_small (rescaled to HU, 16-bit) with a 12-bit VOI LUT table added."""
  ds = _read("CT_small.dcm")
  first, entries = -1000, 2048  # HU -1000 .. 1047
  item = Dataset()
  # The descriptor is SS here: the table's first input value is negative.
  item.add_new(0x00283002, "SS", [entries, first, 16])  # LUT Descriptor
  table = (np.sqrt(np.linspace(0.0, 1.0, entries)) * 4000 + 50).astype(np.uint16)
  item.add_new(0x00283006, "US", table.tolist())  # LUT Data
  ds.VOILUTSequence = Sequence([item])
  ds.WindowCenter, ds.WindowWidth = 40, 400
  path = tmp_path / "voi_lut.dcm"
  ds.save_as(path)
  return path, table


def test_voi_lut_table_matches_pydicom(tmp_path):
  path, table = _with_voi_lut(tmp_path)
  ds = pydicom.dcmread(path)
  hu = apply_modality_lut(ds.pixel_array, ds)
  expected = (apply_voi(np.rint(hu).astype(np.int64), ds).astype(np.float64) - 50.0) / (
      table.max() - 50.0)
  gray = dicom.read_gray(path)
  np.testing.assert_allclose(gray, expected, atol=1e-6)
  # The table is preferred; voi="window" asks for the window instead.
  np.testing.assert_allclose(
      dicom.read_gray(path, voi="window"),
      (apply_voi_lut(hu, ds, prefer_lut=False) - _window_range(ds)[0])
      / np.subtract(*_window_range(ds)[::-1]), atol=1e-6)


def test_load_gray_is_uint8_at_the_requested_size():
  image = dicom.load_gray(_testdata("MR_small.dcm"), 32)
  assert image.shape == (32, 32, 1) and image.dtype == np.uint8
  full = dicom.load_gray(_testdata("MR_small.dcm"), 64)
  np.testing.assert_array_equal(full[..., 0],
                                np.rint(dicom.read_gray(_testdata("MR_small.dcm")) * 255))


def test_truncated_file_names_the_file(tmp_path):
  data = open(_testdata("CT_small.dcm"), "rb").read()
  path = tmp_path / "cut.dcm"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(dicom.DicomError, match=r"cut.dcm: cannot decode its pixel data "
                                             r"\(Explicit VR Little Endian\)"):
    dicom.read_gray(path)


def test_undecodable_compressed_file_names_file_and_decoders():
  # JPEG-lossy.dcm carries a misplaced marker that pydicom's plugins reject.
  with pytest.raises(dicom.DicomError) as error:
    dicom.read_gray(_testdata("JPEG-lossy.dcm"))
  message = str(error.value)
  assert "JPEG-lossy.dcm: cannot decode its pixel data (JPEG Extended" in message
  assert "pylibjpeg-libjpeg" in message


def test_bad_inputs_name_the_file(tmp_path):
  not_dicom = tmp_path / "notes.dcm"
  not_dicom.write_text("not a DICOM file")
  with pytest.raises(DataFormatError, match=r"notes.dcm: not a readable DICOM"):
    dicom.read_gray(not_dicom)
  with pytest.raises(dicom.DicomError,
                     match=r"SC_rgb_small_odd.dcm: PhotometricInterpretation 'RGB' is not "
                           r"grayscale"):
    dicom.read_gray(_testdata("SC_rgb_small_odd.dcm"))
  with pytest.raises(ValueError, match="voi must be one of"):
    dicom.read_gray(_testdata("MR_small.dcm"), voi="soft")
