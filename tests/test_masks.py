"""data/prepare/masks.py: SIIM's run-length encoding and JSRT raw images."""

import numpy as np
import pytest

from medbench_jax.data.prepare import masks
from medbench_jax.data.prepare.errors import DataFormatError
from tests import layouts


def _rle2mask(rle, width, height):
  """mask_functions.rle2mask as the competition published it, then transposed."""
  mask = np.zeros(width * height)
  array = np.asarray([int(x) for x in rle.split()])
  position = 0
  for start, length in zip(array[0::2], array[1::2]):
    position += start
    mask[position:position + length] = 255
    position += length
  return mask.reshape(width, height).T > 0


def test_relative_rle_matches_the_competition_decoder():
  rng = np.random.default_rng(3)
  for shape in ((24, 32), (32, 24), (17, 17)):
    mask = rng.random(shape) < 0.3
    rle = layouts.mask2rle(mask)
    decoded = masks.decode_relative_rle(rle, shape, "x.csv:2")
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(decoded, _rle2mask(rle, shape[1], shape[0]))
  assert not masks.decode_relative_rle(" -1", (4, 4), "x.csv:3").any()
  with pytest.raises(DataFormatError, match=r"x.csv:4: runs reach pixel 20"):
    masks.decode_relative_rle("10 10", (4, 4), "x.csv:4")
  with pytest.raises(DataFormatError, match=r"x.csv:5: EncodedPixels must be pairs"):
    masks.decode_relative_rle("3 4 5", (4, 4), "x.csv:5")


def test_jsrt_raw_of_wrong_size_names_the_file(tmp_path):
  (tmp_path / "JPCLN001.IMG").write_bytes(b"\0" * 100)
  with pytest.raises(DataFormatError, match=r"JPCLN001.IMG: 100 bytes; a JSRT image"):
    masks.read_jsrt(str(tmp_path / "JPCLN001.IMG"))
