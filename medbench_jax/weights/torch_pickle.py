"""Reads PyTorch .pth/.pt/.bin checkpoints without torch and without running their code.

A .pth written by `torch.save` (zip format, the default since torch 1.6) is a zip holding
`<root>/data.pkl`, one raw little-endian buffer per storage in `<root>/data/<key>` and
`<root>/byteorder`. Unpickling data.pkl can call any importable function, which is how a
malicious checkpoint runs code; here `find_class` only resolves the handful of globals that
torch itself writes for tensors and containers and refuses everything else, and storages
are read as numpy arrays in `persistent_load`. What torch 2.x writes (from pickletools):
  dict/OrderedDict containers, `torch._utils._rebuild_tensor_v2(storage, offset, size,
  stride, requires_grad, hooks[, metadata])` with a legacy typed storage class
  (`torch.FloatStorage`, ...) in the persistent id ('storage', TYPE, key, location, numel);
  `_rebuild_tensor_v3(..., dtype)` with `torch.storage.UntypedStorage` and a dtype global
  (`torch.uint16`, ...) for dtypes without a legacy storage class;
  `_rebuild_parameter(tensor, requires_grad, hooks)` for nn.Parameter.
"""

from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A checkpoint asked the unpickler for a global outside the allow-list."""


class _StorageType:
  """Stands in for a torch storage class or dtype: all the unpickler needs is the dtype."""

  def __init__(self, name: str, dtype: np.dtype | None):
    self.name, self.dtype = name, dtype

  def __repr__(self) -> str:
    return f"torch.{self.name}"


_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
# Legacy storage classes (still written by torch 2.x for the classic dtypes).
_STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# Low-precision floats numpy cannot compute with become float32, exactly.
_WIDEN = {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
          np.dtype(ml_dtypes.float8_e5m2)}


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> np.ndarray:
  del requires_grad, hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for data.pkl resolving only the allow-listed globals."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str, path: str):
    super().__init__(file)
    self._archive, self._root, self._path = archive, root, path
    self._storages: dict[str, np.ndarray] = {}
    byteorder = "little"  # Files from before torch wrote the byteorder record.
    if f"{root}/byteorder" in archive.namelist():
      byteorder = archive.read(f"{root}/byteorder").decode().strip()
    self._swap = byteorder != sys.byteorder

  def find_class(self, module: str, name: str) -> Any:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    }
    if (module, name) in allowed:
      return allowed[module, name]
    if module == "torch" and name in _STORAGE_CLASSES:
      return _StorageType(name, np.dtype(_DTYPES[_STORAGE_CLASSES[name]]))
    if module == "torch" and name in _DTYPES:
      return _StorageType(name, np.dtype(_DTYPES[name]))
    raise UnsafeCheckpointError(
        f"Refusing to load {self._path}: its pickle asks for the global {module}.{name}, "
        "which is not a tensor, storage or container type. A plain state dict never needs "
        "it; if you trust the file, re-save its state_dict (torch.save(obj.state_dict())) "
        "or convert it to .safetensors.")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      buffer = self._archive.read(f"{self._root}/data/{key}")
      self._storages[key] = np.frombuffer(buffer, dtype=storage_type.dtype, count=numel)
    return self._storages[key]

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                         metadata=None) -> np.ndarray:
    del requires_grad, hooks, metadata  # Training-time state, meaningless for numpy.
    return self._to_array(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                         metadata=None) -> np.ndarray:
    del requires_grad, hooks, metadata
    return self._to_array(storage.view(dtype.dtype), offset, size, stride)

  def _to_array(self, storage: np.ndarray, offset: int, size: tuple[int, ...],
                stride: tuple[int, ...]) -> np.ndarray:
    """A tensor view of a storage, bounds-checked: a crafted stride must not read past it."""
    size, stride = tuple(size), tuple(stride)
    if min((*size, *stride, offset), default=0) < 0 or len(size) != len(stride):
      raise pickle.UnpicklingError(
          f"{self._path}: invalid tensor size {size}, stride {stride}, offset {offset}")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
      raise pickle.UnpicklingError(
          f"{self._path}: tensor of size {size}, stride {stride}, offset {offset} exceeds "
          f"its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, [s * storage.itemsize for s in stride], writeable=False)
    array = np.array(view)  # Owns its memory; one storage may back several tensors.
    if self._swap:
      array = array.byteswap()
    return array.astype(np.float32) if array.dtype in _WIDEN else array


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, with tensors as numpy arrays.

  Raises UnsafeCheckpointError if the pickle references any global beyond tensors,
  storages and containers (nothing of it is executed), ValueError for formats other
  than torch's zip format.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path} is not a zip-format PyTorch checkpoint (torch.save default since torch 1.6). "
        "Legacy-format and TorchScript files are not supported: re-save with a recent torch "
        "or convert to .safetensors.")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {pickles}")
    root = pickles[0].split("/")[0]
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, root, path).load()

