"""Where things live on disk, and how files that others read are written.

A leaf module: it imports nothing of the package, so any module can use it.

Every path a run, a sweep, evaluate, report or probe reads or writes may be a local
path or a URL (gs://BUCKET/...): they go through etils.epath (`as_path`), the layer
orbax and TFDS use, never os.path, open or pathlib, which would take "gs://B/x" for
the local folder "gs:/B/x".
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import threading
from typing import Any

from etils import epath

# Generated data sets, prepared ArrayRecords and JAX's compilation cache live here unless
# configured otherwise; MEDBENCH_CACHE moves all of them (e.g. to a bucket-backed disk).
CACHE_DIR = os.environ.get("MEDBENCH_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "medbench_jax")
# JAX's persistent compilation cache (main --compilation_cache).
COMPILATION_CACHE_DIR = os.path.join(CACHE_DIR, "xla")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://..., any scheme epath reads) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as it is, a local path absolute and `~` expanded.

  orbax requires absolute paths and users type relative ones; a URL is already
  absolute (epath's own `resolve` would turn "gs://B/x" into "<cwd>/gs:/B/x").
  """
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


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
  if is_remote(name):
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


def copy_tree(local: str | os.PathLike, target: str | os.PathLike) -> list[epath.Path]:
  """Copies every file under the local folder `local` to the same relative path under
  `target` (a local path or a URL), creating folders; returns the copies.

  For what can write local files only, or writes URLs through a client of its own: JAX's
  profiler (its trace goes through XLA's built-in GCS client, which always reaches
  www.googleapis.com) traces to a local folder that is then copied here.
  """
  local = pathlib.Path(local)
  root = as_path(target)
  copies = []
  for path in sorted(p for p in local.rglob("*") if p.is_file()):
    copy = root / path.relative_to(local).as_posix()
    copy.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as source, copy.open("wb") as sink:
      shutil.copyfileobj(source, sink, 1 << 24)
    copies.append(copy)
  return copies


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON (indent 2) with write_atomic: never seen half-written.

  NaN is refused (JSON has none): callers write undefined metrics as null.
  """
  write_atomic(path, json.dumps(obj, indent=2, allow_nan=False))


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file this project wrote (local or URL); a damaged one is an error naming
  it."""
  path = as_path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was cut short or edited. Delete it "
                     "to recompute it (a results.json is rebuilt from the trials).") from None
