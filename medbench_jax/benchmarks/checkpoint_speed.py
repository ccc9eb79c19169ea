"""Save-and-verify time of a trial's `latest` checkpoint for a train state of a given size.

  python -m medbench_jax.benchmarks.checkpoint_speed [--params=88e6] [--dir=DIR] [--repeats=2]

The state: `--params` float32 parameters (Swin-B: 88M) in 8 tensors, and Adam's two
moments of each. Prints one JSON line: seconds of the whole save (orbax's write, the
manifest of sizes and hashes, the deletion of the previous checkpoint), of the manifest
alone, and of the check a restore makes (per checking process), best of `--repeats`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

from absl import app
from absl import flags
from etils import epath
import grain
import numpy as np

from medbench_jax.trainer import checkpoints

_PARAMS = flags.DEFINE_float("params", 88e6, "Parameters of the model (Swin-B: 88M).")
_DIR = flags.DEFINE_string("dir", "", "Where to write (default: a new temporary folder).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed saves; the best is reported.")
_TENSORS = 8


def train_state(num_params: int) -> dict:
  """Parameters and Adam's first and second moments, float32, random (incompressible)."""
  rng = np.random.default_rng(0)
  size = num_params // _TENSORS
  return {part: {f"w{i}": rng.standard_normal(size, dtype=np.float32)
                 for i in range(_TENSORS)} for part in ("params", "mu", "nu")}


def main(argv):
  del argv
  root = epath.Path(_DIR.value or tempfile.mkdtemp(prefix="ckpt_speed_"))
  state = train_state(int(_PARAMS.value))
  nbytes = sum(x.nbytes for part in state.values() for x in part.values())
  ckpt = checkpoints.Checkpoints(root / "trial_0" / "ckpt")
  iterator = iter(grain.MapDataset.range(1 << 20).batch(4).to_iter_dataset())
  save, manifest, verify = [], [], []
  for step in range(1, _REPEATS.value + 2):  # the first save warms orbax up: not timed
    start = time.perf_counter()
    ckpt.save_latest(step, state, iterator, {"step": step})
    saved = time.perf_counter() - start
    folder = ckpt.latest.directory / str(step)
    start = time.perf_counter()
    checkpoints.write_manifest(folder)
    written = time.perf_counter() - start
    start = time.perf_counter()
    checkpoints.verify(folder, "")
    verified = time.perf_counter() - start
    if step > 1:
      save.append(saved)
      manifest.append(written)
      verify.append(verified)
  ckpt.close()
  if not _DIR.value:
    shutil.rmtree(root)
  print(json.dumps({"benchmark": "checkpoint_save_verify", "params": int(_PARAMS.value),
                    "checkpoint_gb": round(nbytes / 1e9, 3), "save_s": round(min(save), 2),
                    "manifest_s": round(min(manifest), 2), "verify_s": round(min(verify), 2),
                    "cpus": os.cpu_count(), "machine": platform.machine()}))


if __name__ == "__main__":
  app.run(main)
