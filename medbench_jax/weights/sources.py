"""Where initial weights come from besides a checkpoint file: the Hugging Face hub cache
(`timm:NAME.TAG`), an earlier run of this project (`run:WORKDIR`), and directories written
by `python -m medbench_jax.convert`.

The latter two hold Flax variables already; they are returned flat ('params/fc/kernel'),
ready for the same merge as a converted PyTorch checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from medbench_jax import paths
from medbench_jax.weights import safetensors_file

TIMM_PREFIX = "timm:"
RUN_PREFIX = "run:"
# A directory written by medbench_jax.convert: the flattened Flax variables, and what they are.
CONVERTED_VARIABLES = "variables.safetensors"
CONVERTED_INFO = "model.json"
# Weight files of a timm repository on the hub, preferred first.
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


# --- timm:NAME.TAG ----------------------------------------------------------------------

def hub_cache_dir() -> str:
  """huggingface_hub's cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
  return os.path.join(home, "hub")


def resolve_timm(spec: str) -> str:
  """Local path of the weights of `timm:NAME.TAG` (e.g. timm:resnet50.a1_in1k).

  Looks in the hub cache first (models--timm--NAME.TAG/snapshots/*/), then downloads with
  huggingface_hub unless HF_HUB_OFFLINE is set; failing both, says what to put where.
  """
  repo = spec[len(TIMM_PREFIX):]
  if "." not in repo or "/" in repo:
    raise ValueError(f"{spec!r}: expected timm:NAME.TAG, e.g. timm:resnet50.a1_in1k "
                     "(the names on https://huggingface.co/timm)")
  snapshots = os.path.join(hub_cache_dir(), f"models--timm--{repo}", "snapshots")
  for filename in _TIMM_FILES:
    found = sorted(glob.glob(os.path.join(snapshots, "*", filename)), key=os.path.getmtime)
    if found:
      return found[-1]
  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
  error = None
  if not offline:
    try:
      # Imported only here: offline runs and the other sources never need it.
      import huggingface_hub
      from huggingface_hub import errors
      for filename in _TIMM_FILES:
        try:
          return huggingface_hub.hf_hub_download(f"timm/{repo}", filename,
                                                 cache_dir=hub_cache_dir())
        except errors.EntryNotFoundError:
          continue
    except Exception as e:  # pylint: disable=broad-except
      error = e  # Offline machines fail here in many ways; the message below says what to do.
  raise FileNotFoundError(
      f"No cached weights for {spec}" + (f" and downloading failed ({error})" if error else
                                         " (offline)") +
      f". Download model.safetensors from https://huggingface.co/timm/{repo} and put it at "
      f"{os.path.join(snapshots, 'main', 'model.safetensors')} (or set HF_HUB_CACHE / HF_HOME "
      "to the cache that holds it), or pass the file's path instead.")


# --- run:WORKDIR ------------------------------------------------------------------------

def read_run(spec: str) -> tuple[dict[str, np.ndarray], str]:
  """Flat variables of the best checkpoint of an earlier run, and the checkpoint's path.

  `run:WORKDIR` takes the finished trial with the lowest best validation loss (its
  trial_K/result.json); `run:WORKDIR/trial_K` names the trial.
  """
  target = paths.as_path(spec[len(RUN_PREFIX):])  # a local folder or gs://...
  if target.name.startswith("trial_"):
    trial_dir = target
  else:
    results = {path.parent: json.loads(path.read_text())["best_val_loss"]
               for path in target.glob("trial_*/result.json")}
    if not results:
      raise FileNotFoundError(f"{spec}: no finished trial (trial_K/result.json) in {target}; "
                              "name one with run:WORKDIR/trial_K if it has a best checkpoint.")
    trial_dir = min(results, key=results.get)
    logging.info("%s: using %s (best validation loss %.4f of %d trials)", spec,
                 trial_dir.name, results[trial_dir], len(results))
  best = trial_dir / "ckpt" / "best"
  steps = sorted(int(p.name) for p in best.iterdir() if p.name.isdigit()) if best.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"{spec}: no best checkpoint under {best}")
  path = os.fspath(best / str(steps[-1]) / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata
  wanted = {k: tree[k] for k in ("params", "batch_stats") if k in tree and tree[k]}
  # As numpy: the run may have used other devices than this process has.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))
  return traverse_util.flatten_dict(restored, sep="/"), path


# --- directories written by medbench_jax.convert --------------------------------------

def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONVERTED_INFO))


def read_converted(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(flat variables, info: model, num_classes, source, format) of a convert output."""
  with open(os.path.join(path, CONVERTED_INFO)) as f:
    info = json.load(f)
  return safetensors_file.load(os.path.join(path, CONVERTED_VARIABLES)), info


def write_converted(path: str, variables: dict[str, Any], info: dict[str, Any]) -> None:
  os.makedirs(path, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v))
          for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  safetensors.numpy.save_file(flat, os.path.join(path, CONVERTED_VARIABLES))
  with open(os.path.join(path, CONVERTED_INFO), "w") as f:
    json.dump(info, f, indent=2)
