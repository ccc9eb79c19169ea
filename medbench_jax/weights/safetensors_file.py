"""Reads .safetensors files whose header may lie about shapes or offsets.

A .safetensors file is an 8-byte little-endian header length, a JSON header (tensor
name -> dtype, shape and `data_offsets` [begin, end) into the byte buffer that follows;
"__metadata__" -> strings) and that buffer. The header is checked against the file
before any tensor is read: every dtype known, every shape's byte size equal to the span
of its offsets, the spans inside the buffer and tiling it without overlap. A truncated
or crafted file is refused naming the file and the tensor, instead of failing inside
the reader.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import safetensors.numpy

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# The reader's own limit on the header (100 MB).
_MAX_HEADER_BYTES = 100_000_000
_METADATA = "__metadata__"


def _entry_span(path: str, name: str, entry: object, buffer_bytes: int) -> tuple[int, int]:
  """[begin, end) of one tensor after checking its entry against the buffer."""
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
    raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in _DTYPE_BYTES:
    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}; known: "
                     f"{', '.join(_DTYPE_BYTES)}")
  if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise ValueError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of sizes")
  if not (isinstance(offsets, list) and len(offsets) == 2 and
          all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
    raise ValueError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
  begin, end = offsets
  if not 0 <= begin <= end <= buffer_bytes:
    raise ValueError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                     f"{buffer_bytes}-byte data buffer (the file is truncated or its header "
                     "lies)")
  nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
  if end - begin != nbytes:
    raise ValueError(f"{path}: tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, "
                     f"but its data_offsets [{begin}, {end}] span {end - begin}: the header "
                     "lies about its shape or offsets")
  return begin, end


def check_header(path: str | os.PathLike) -> None:
  """Raises ValueError naming the file and tensor if the header does not fit the file."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path} is not a safetensors file: {size} bytes, fewer than the "
                       "8-byte header length")
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
      raise ValueError(f"{path}: its header claims {header_bytes} bytes, but the file holds "
                       f"{size - 8} after the length field (truncated, or not safetensors)")
    try:
      header = json.loads(f.read(header_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: its header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: its header is a {type(header).__name__}, not a JSON object")
  buffer_bytes = size - 8 - header_bytes
  spans = sorted((*_entry_span(path, name, entry, buffer_bytes), name)
                 for name, entry in header.items() if name != _METADATA)
  position = 0
  for begin, end, name in spans:
    if begin != position:
      raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data buffer, "
                       f"where byte {position} was expected: tensors overlap or leave gaps")
    position = end
  if position != buffer_bytes:
    raise ValueError(f"{path}: the tensors cover {position} of the {buffer_bytes} bytes of "
                     "the data buffer")


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file, after `check_header`."""
  check_header(path)
  try:
    return safetensors.numpy.load_file(os.fspath(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{os.fspath(path)} is not a readable safetensors file: {e}") from None
