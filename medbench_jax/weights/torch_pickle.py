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
Training checkpoints add plain data around the state dict (optimizer and scheduler state,
`argparse.Namespace` arguments in DINO/MAE, the yacs `CfgNode` config of Swin/SimMIM, with
a `set` inside, numpy scalars): the Namespace and the CfgNode become inert records and
numpy values are rebuilt through `numpy_global`, never with object dtypes.

Files written with torch < 1.6 (or `_use_new_zipfile_serialization=False`; MoCo, PCL and
SwAV published such files) are a sequence of pickles instead: magic number, protocol
version 1001, system info, the object with storages as persistent ids ('storage', TYPE,
key, location, numel, view_metadata), the list of storage keys, then for each key an int64
element count and the raw little-endian data. Tensors are rebuilt once the data is read.
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
import re
import sys
from typing import Any
import zipfile

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
# Storage keys torch writes: "0", "1", ... (a file name inside <root>/data/).
_STORAGE_KEY = re.compile(r"\w+")
# Low-precision floats numpy cannot compute with become float32, exactly.
_WIDEN = {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
          np.dtype(ml_dtypes.float8_e5m2)}


def _no_objects(dtype: np.dtype, path: str) -> np.dtype:
  if dtype.hasobject:
    raise UnsafeCheckpointError(f"Refusing to load {path}: it holds a numpy array of Python "
                                "objects, which unpickling would have to construct.")
  return dtype


def numpy_global(module: str, name: str, path: str) -> Any | None:
  """Safe stand-ins for the globals pickled numpy arrays and scalars need (protocol 2:
  `_reconstruct`, `ndarray`, `dtype`, `scalar`, `_codecs.encode` for their bytes), or None.
  Object dtypes are refused, so no pickled object can hide in an array."""
  if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    if name == "_reconstruct":
      def reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:
          raise UnsafeCheckpointError(f"{path}: array subclass {subtype!r} refused")
        return np.ndarray(shape, _no_objects(np.dtype(dtype), path))
      return reconstruct
    if name == "scalar":
      return lambda dtype, data: np.frombuffer(data, _no_objects(dtype, path), count=1)[0]
  if (module, name) == ("numpy", "ndarray"):
    return np.ndarray
  if (module, name) == ("numpy", "dtype"):
    return lambda spec, align=False, copy=True: _no_objects(np.dtype(spec, align, copy), path)
  if (module, name) == ("_codecs", "encode"):
    def encode(text, encoding="utf-8"):
      if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafeCheckpointError(f"{path}: unexpected _codecs.encode({encoding!r})")
      return text.encode("latin-1")
    return encode
  return None


class Namespace:
  """Inert stand-in for the argparse.Namespace of training arguments (DINO, MAE): only
  its attributes are restored."""

  def __repr__(self) -> str:
    return f"Namespace({vars(self)})"


class ConfigNode(dict):
  """Inert stand-in for yacs.config.CfgNode, the `config` entry of Microsoft's Swin and
  SimMIM training checkpoints: a dict of its entries; its flags (__immutable__, ...) become
  attributes, as unpickling a dict subclass restores them."""


class _PendingTensor:
  """A tensor of a legacy-format file whose storage data follows the pickle."""

  def __init__(self, storage: _PendingStorage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _PendingStorage:

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> np.ndarray:
  del requires_grad, hooks
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for data.pkl (or a legacy file's main pickle, `archive` None) resolving
  only the allow-listed globals."""

  def __init__(self, file, archive: zipfile.ZipFile | None, root: str, path: str):
    super().__init__(file)
    self._archive, self._root, self._path = archive, root, path
    self._storages: dict[str, Any] = {}
    byteorder = "little"  # Legacy files, and zip files before torch wrote the record.
    if archive is not None and f"{root}/byteorder" in archive.namelist():
      byteorder = archive.read(f"{root}/byteorder").decode().strip()
    self._swap = byteorder != sys.byteorder

  def find_class(self, module: str, name: str) -> Any:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
        ("argparse", "Namespace"): Namespace,
        ("yacs.config", "CfgNode"): ConfigNode,
        # Protocol 2 spells the module of builtins the Python 2 way.
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,
    }
    if (module, name) in allowed:
      return allowed[module, name]
    numpy_stand_in = numpy_global(module, name, self._path)
    if numpy_stand_in is not None:
      return numpy_stand_in
    if module == "torch" and name in _STORAGE_CLASSES:
      return _StorageType(name, np.dtype(_DTYPES[_STORAGE_CLASSES[name]]))
    if module == "torch" and name in _DTYPES:
      return _StorageType(name, np.dtype(_DTYPES[name]))
    raise UnsafeCheckpointError(
        f"Refusing to load {self._path}: its pickle asks for the global {module}.{name}, "
        "which is not a tensor, storage or container type. A plain state dict never needs "
        "it; if you trust the file, re-save its state_dict (torch.save(obj.state_dict())) "
        "or convert it to .safetensors.")

  def persistent_load(self, pid: Any) -> Any:
    legacy = self._archive is None
    if not (isinstance(pid, tuple) and len(pid) == (6 if legacy else 5)
            and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
    _, storage_type, key, _, numel = pid[:5]
    if legacy and pid[5] is not None:
      raise pickle.UnpicklingError(f"{self._path}: storage views ({pid[5]!r}) of torch < 0.4 "
                                   "files are not supported; re-save with a recent torch.")
    if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key) and isinstance(numel, int)
            and numel >= 0):
      raise pickle.UnpicklingError(f"{self._path}: malformed storage reference {pid!r}")
    if key not in self._storages:
      if legacy:
        self._storages[key] = _PendingStorage(key, storage_type.dtype, numel)
      else:
        self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
    return self._storages[key]

  def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """The storage's bytes, exactly as many as the pickle claims (no more is inflated)."""
    name = f"{self._root}/data/{key}"
    nbytes = numel * dtype.itemsize
    try:
      with self._archive.open(name) as f:
        buffer = f.read(nbytes)
    except KeyError:
      raise pickle.UnpicklingError(f"{self._path}: storage {key!r} is missing from the "
                                   "archive") from None
    if len(buffer) != nbytes:
      raise pickle.UnpicklingError(f"{self._path}: storage {key!r} holds {len(buffer)} bytes, "
                                   f"its tensors claim {numel} x {dtype} ({nbytes} bytes)")
    return np.frombuffer(buffer, dtype=dtype)

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                         metadata=None) -> np.ndarray:
    del requires_grad, hooks, metadata  # Training-time state, meaningless for numpy.
    return self._to_array(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                         metadata=None) -> np.ndarray:
    del requires_grad, hooks, metadata
    if isinstance(storage, _PendingStorage):
      raise pickle.UnpicklingError(f"{self._path}: untyped storages in a legacy-format file")
    return self._to_array(storage.view(dtype.dtype), offset, size, stride)

  def _to_array(self, storage: np.ndarray | _PendingStorage, offset: int,
                size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray | _PendingTensor:
    """A tensor view of a storage, bounds-checked: a crafted stride must not read past it."""
    if isinstance(storage, _PendingStorage):
      return _PendingTensor(storage, offset, size, stride)
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


class _NoGlobals(pickle.Unpickler):
  """For the plain header pickles of legacy files: numbers, strings, dicts only."""

  def find_class(self, module: str, name: str) -> Any:
    raise UnsafeCheckpointError(f"Refusing the global {module}.{name} in a checkpoint header")


def _unsafe_member(name: str) -> bool:
  """An archive member that would land outside a folder it were extracted to."""
  parts = name.replace("\\", "/").split("/")
  return name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(f, path: str) -> Any:
  if _NoGlobals(f).load() != _LEGACY_MAGIC:
    raise ValueError(f"{path} is neither a zip-format nor a legacy-format PyTorch checkpoint. "
                     "TorchScript and torch < 0.4 (tar) files are not supported: re-save "
                     "with a recent torch or convert to .safetensors.")
  if _NoGlobals(f).load() != _LEGACY_PROTOCOL:
    raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
  sys_info = _NoGlobals(f).load()
  unpickler = _RestrictedUnpickler(f, None, "", path)
  unpickler._swap = (not sys_info.get("little_endian", True)) != (sys.byteorder == "big")
  obj = unpickler.load()
  keys = _NoGlobals(f).load()
  data = {}
  for key in keys:
    pending = unpickler._storages.get(key)
    if pending is None:
      raise pickle.UnpicklingError(f"{path}: storage {key!r} is not referenced by any tensor")
    numel = int.from_bytes(f.read(8), "little")
    nbytes = numel * pending.dtype.itemsize
    # Checked before reading: a crafted count must not make read() allocate it.
    if numel != pending.numel or nbytes > os.fstat(f.fileno()).st_size - f.tell():
      raise pickle.UnpicklingError(f"{path}: storage {key!r} is truncated or inconsistent")
    buffer = f.read(nbytes)
    data[key] = np.frombuffer(buffer, dtype=pending.dtype)

  def resolve(o: Any) -> Any:
    if isinstance(o, _PendingTensor):
      return unpickler._to_array(data[o.storage.key], o.offset, o.size, o.stride)
    if isinstance(o, dict):
      for k, v in o.items():
        o[k] = resolve(v)
    elif isinstance(o, list):
      o[:] = [resolve(v) for v in o]
    elif isinstance(o, tuple):
      return type(o)(resolve(v) for v in o)
    elif isinstance(o, Namespace):
      vars(o).update({k: resolve(v) for k, v in vars(o).items()})
    return o
  return resolve(obj)


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path`, with tensors as numpy arrays.

  Raises UnsafeCheckpointError if the pickle references any global beyond tensors,
  storages, containers and numpy data (nothing of it is executed), ValueError for files
  that are neither torch's zip format nor its legacy format.
  """
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      try:
        return _load_legacy(f, path)
      except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, UnsafeCheckpointError):
          raise
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({e}). Zip-format "
                         "(torch >= 1.6) and legacy-format files are supported; for "
                         "TorchScript or other formats re-save the state_dict with a recent "
                         "torch or convert to .safetensors.") from e
  with zipfile.ZipFile(path) as archive:
    unsafe = [name for name in archive.namelist() if _unsafe_member(name)]
    if unsafe:
      # Nothing here extracts archives, but such a member has no place in what torch.save
      # writes: the file was crafted.
      raise UnsafeCheckpointError(
          f"Refusing to load {path}: archive member(s) {unsafe[:5]} are absolute or climb "
          "out of the archive with '..' (path traversal); torch.save never writes those.")
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {pickles}")
    root = pickles[0].split("/")[0]
    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, archive, root, path).load()
