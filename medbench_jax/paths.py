"""Where things live on disk, and how files that others read are written.

A leaf module: it imports nothing of the package, so any module can use it.
"""

from __future__ import annotations

import json
import os
import pathlib
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON so that readers see the old file or the whole new one, never half of it.

  NaN is refused (JSON has none): callers write undefined metrics as null.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    f.write(json.dumps(obj, indent=2, allow_nan=False))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file this project wrote; a damaged one is an error naming it."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was cut short or edited. Delete it "
                     "to recompute it (a results.json is rebuilt from the trials).") from None
