"""Where things live on disk, and how files that others read are written.

A leaf module: it imports nothing of the package, so any module can use it.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Any

# Generated data sets, prepared ArrayRecords and JAX's compilation cache live here unless
# configured otherwise; MEDBENCH_CACHE moves all of them (e.g. to a bucket-backed disk).
CACHE_DIR = os.environ.get("MEDBENCH_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "medbench_jax")
# JAX's persistent compilation cache (main --compilation_cache).
COMPILATION_CACHE_DIR = os.path.join(CACHE_DIR, "xla")


def default_workdir(config_arg: str) -> str:
  """workdirs/<config file name>[_<arg>] for `--config=configs/swin.py:ARG`."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "".join(c if c.isalnum() or c in "-_." else "_" for c in arg)
  return os.path.join("workdirs", name + (f"_{suffix}" if suffix else ""))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes a file so that readers see the old one or the whole new one, never part of it.

  A local file is written beside its final name, flushed to disk (fsync) and renamed over
  it (os.replace); the folder is then synced so the rename survives a power loss too. A
  bucket object (gs://..., through etils.epath) is written whole: object stores publish
  an object only once its upload completes. str is written as UTF-8.
  """
  data = data.encode() if isinstance(data, str) else data
  name = os.fspath(path)
  if "://" in name:
    from etils import epath  # only sweeps over buckets need it
    epath.Path(name).write_bytes(data)
    return
  path = pathlib.Path(name)
  # Unique per writer, so that two processes writing the same file never share one.
  tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  folder = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON (indent 2) with write_atomic: never seen half-written.

  NaN is refused (JSON has none): callers write undefined metrics as null.
  """
  write_atomic(path, json.dumps(obj, indent=2, allow_nan=False))


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file this project wrote; a damaged one is an error naming it."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was cut short or edited. Delete it "
                     "to recompute it (a results.json is rebuilt from the trials).") from None
