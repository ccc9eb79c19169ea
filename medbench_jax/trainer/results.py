"""What a run records: each trial's result, the run's results.json, provenance and cost.

results.json (docs/architecture.md) holds the task's fields (task, metric, class names), the
data set and label subset, every trial's test metrics, their summary (mean, std with
ddof=1, std_paper with ddof=0 as the reference study prints it, n), where the numbers
come from (provenance: code version and revision, config hash, initial weights'
sha256, split hashes, devices) and what they cost (wall time, time to first step,
training throughput, peak host memory).
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import json
import math
import os
import pathlib
import resource
import subprocess
from typing import Any

import jax
import numpy as np

import medbench_jax
from medbench_jax import paths
from medbench_jax.weights import sources as weight_sources

_CHUNK = 1 << 20


def json_number(x: Any) -> Any:
  """JSON has no NaN: an undefined metric is written as null."""
  if isinstance(x, float) and math.isnan(x):
    return None
  return x


def summarize(values: Sequence[float | None]) -> dict[str, float | int]:
  """Mean, sample std (ddof=1) and population std (ddof=0, the study's np.std) over trials;
  undefined (None/NaN) trial values are left out and `n` counts the rest."""
  values = np.asarray([math.nan if v is None else v for v in values], np.float64)
  values = values[~np.isnan(values)]
  n = int(values.size)
  return {"mean": float(values.mean()) if n else math.nan,
          "std": float(values.std(ddof=1)) if n > 1 else math.nan,
          "std_paper": float(values.std(ddof=0)) if n else math.nan,
          "n": n}


def trial_record(*, seed: int, best_step: int, best_val_loss: float, skipped_updates: int,
                 test_metrics: dict[str, float], cost: dict[str, Any]) -> dict:
  """skipped_updates: non-finite steps skipped under train.nonfinite="skip"."""
  return {"seed": seed, "best_step": best_step, "best_val_loss": best_val_loss,
          "skipped_updates": skipped_updates,
          "test": {k: json_number(v) for k, v in test_metrics.items()},
          "cost": {k: json_number(v) for k, v in cost.items()}}


def assemble(*, task_fields: dict, config: dict, trials: list[dict], subset: dict,
             skipped_examples: int, provenance: dict, wall_s: float) -> dict:
  """results.json of a run from its trials (the format in docs/architecture.md)."""
  metric = task_fields["metric"]
  summary = summarize([t["test"][metric] for t in trials])
  costs = [t.get("cost", {}) for t in trials]
  rates = [c["train_images_per_s"] for c in costs if c.get("train_images_per_s")]
  first = [c["first_step_s"] for c in costs if c.get("first_step_s") is not None]
  return {
      **task_fields,
      "dataset": config["dataset"]["name"],
      "model": config["model"]["name"],
      "init": config["model"]["init"],
      "label_fraction": float(config["dataset"]["label_fraction"]),
      "label_subset": subset,
      "skipped_examples": skipped_examples,
      "trials": trials,
      "summary": {k: json_number(v) for k, v in summary.items()},
      "provenance": provenance,
      "cost": {"wall_s": round(wall_s, 1),
               "first_step_s": round(first[0], 2) if first else None,
               "train_images_per_s": round(float(np.mean(rates)), 1) if rates else None,
               "peak_rss_mb": peak_rss_mb()},
      "config": config,
  }


def peak_rss_mb() -> float:
  """Peak resident memory of this process (Linux reports KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def sha256_file(path: str | os.PathLike) -> str:
  """The sha256 of a file, local or gs://..."""
  digest = hashlib.sha256()
  with paths.as_path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def weights_file(init: str) -> str | None:
  """The file that holds an `init` source's weights (None for random init or a missing file).

  A run's best checkpoint is a folder: its results.json identifies it instead.
  """
  if init == "random":
    return None
  if init.startswith(weight_sources.RUN_PREFIX):
    # The earlier run may be in a bucket.
    run = paths.as_path(init[len(weight_sources.RUN_PREFIX):].split("/trial_")[0])
    return os.fspath(run / "results.json") if (run / "results.json").exists() else None
  if init.startswith(weight_sources.TIMM_PREFIX):
    path = weight_sources.resolve_timm(init)
  else:
    path = init.partition(":")[2] if ":" in init and not os.path.exists(init) else init
    if os.path.isdir(path):
      path = os.path.join(path, weight_sources.CONVERTED_VARIABLES)
  return path if os.path.isfile(path) else None


def source_revision() -> str | None:
  """The git revision of the package's checkout ('+dirty' when modified), if it is one."""
  root = pathlib.Path(medbench_jax.__file__).resolve().parents[1]
  if not (root / ".git").exists():
    return None
  try:
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                            "medbench_jax", "configs"], capture_output=True, text=True,
                           timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return rev + ("+dirty" if dirty else "")


def provenance(config: dict, split_hashes: dict[str, str]) -> dict[str, Any]:
  weights = weights_file(config["model"]["init"])
  return {
      "version": medbench_jax.__version__,
      "revision": source_revision(),
      "config_sha256": hashlib.sha256(
          json.dumps(config, sort_keys=True).encode()).hexdigest(),
      "weights_file": weights,
      "weights_sha256": sha256_file(weights) if weights else None,
      "splits_sha1": split_hashes,
      "devices": {"platform": jax.devices()[0].platform,
                  "kind": jax.devices()[0].device_kind,
                  "count": jax.device_count(), "processes": jax.process_count()},
  }
