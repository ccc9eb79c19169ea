"""What a run records: each trial's result, the run's results.json, provenance and cost.

results.json (docs/architecture.md) holds the task's fields (task, metric, class names), the
data set and label subset, every trial's test metrics, their summary (mean, std with
ddof=1, std_paper with ddof=0 as the reference study prints it, n), where the numbers
come from (provenance: code version and revision, config hash, initial weights'
sha256, split hashes, devices) and what they cost (wall time, time to first step,
training throughput, peak host memory, and with `efficiency` runs per device-hour and
model FLOPs utilisation).
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import json
import math
import os
import pathlib
import re
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
             skipped_examples: int, provenance: dict, wall_s: float,
             efficiency: dict[str, Any] | None = None) -> dict:
  """results.json of a run from its trials (the format in docs/architecture.md);
  `efficiency` (the function's result) joins its cost."""
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
               "peak_rss_mb": peak_rss_mb(), **(efficiency or {})},
      **post_hoc_summary(trials),
      "config": config,
  }


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
  return {k: json_number(v) for k, v in summarize(values).items()}


def post_hoc_summary(trials: Sequence[dict]) -> dict[str, Any]:
  """{"post_hoc": ...}: the trials' Task.post_hoc records summarised (summarize) over the
  trials that have them: "operating_points" per class and metric of the test values at
  the validation thresholds (with the "rule"), "calibration" the temperature and each
  "before"/"after" headline number, "surface" each pooled distance. {} where no trial
  has any (runs finished before trials recorded them)."""
  summary: dict[str, Any] = {}
  points = [t["operating_points"] for t in trials if t.get("operating_points")]
  if points:
    classes = {}
    for name, record in points[0]["classes"].items():
      metrics = [k for k, v in record.items() if isinstance(v, dict) and "value" in v]
      classes[name] = {
          "threshold": _summary([p["classes"][name]["threshold"] for p in points]),
          **{m: _summary([p["classes"][name][m]["value"] for p in points]) for m in metrics}}
    rules = [t["thresholds"]["rule"] for t in trials if t.get("thresholds")]
    summary["operating_points"] = {"rule": rules[0] if rules else None, "classes": classes}
  calibrations = [t["calibration"] for t in trials if t.get("calibration")]
  if calibrations:
    summary["calibration"] = {"temperature": _summary([c["temperature"] for c in calibrations])}
    for when in ("before", "after"):
      summary["calibration"][when] = {k: _summary([c[when][k] for c in calibrations])
                                      for k in ("ece_uniform", "ece_quantile", "brier")}
  surfaces = [t["surface"] for t in trials if t.get("surface")]
  if surfaces:
    summary["surface"] = {k: _summary([s[k] for s in surfaces])
                          for k in ("hd95", "assd", "mean_hd95", "mean_assd")}
  return {"post_hoc": summary} if summary else {}


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


# ---------------------------------------------------------------------- efficiency

# Peak dense TFLOP/s per device (a TPU chip, a GPU) as the vendors publish them, for
# bfloat16 and float32 compute; (pattern of JAX's device_kind, name, bf16, fp32). NVIDIA
# prints tensor-core figures "with sparsity": dense is half of those.
#   H100 / H200 datasheets (nvidia.com/en-us/data-center/h100/, .../h200/): SXM BF16
#     1,979*, TF32 989*; PCIe BF16 1,513*, TF32 756*; NVL BF16 1,671*, TF32 835*.
#   A100 datasheet (nvidia.com/en-us/data-center/a100/): BF16 312, TF32 156 (dense).
#   V100 datasheet (nvidia.com/en-us/data-center/v100/): FP32 15.7 (SXM2), 14 (PCIe); no
#     bfloat16 tensor cores, so no bf16 peak.
#   L4 datasheet (nvidia.com/en-us/data-center/l4/): BF16 242*, TF32 120*.
#   Cloud TPU system architecture (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): bf16 per
#     chip v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
# float32: on Ampere and later GPUs XLA runs float32 matmuls and convolutions on TF32
# tensor cores at JAX's default precision, and on TPUs as single bfloat16 passes, so
# those peaks are the float32 ones; V100 has FP32 units only.
PEAK_TFLOPS = (
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 756.5, 378.0),
    (r"H100.*NVL|H200.*NVL", "NVIDIA H100/H200 NVL", 835.5, 417.5),
    (r"H100|\bH200", "NVIDIA H100/H200 SXM", 989.5, 494.5),
    (r"A100", "NVIDIA A100", 312.0, 156.0),
    (r"V100.*PCI", "NVIDIA V100 PCIe", None, 14.0),
    (r"V100", "NVIDIA V100 SXM2", None, 15.7),
    (r"\bL4\b", "NVIDIA L4", 121.0, 60.0),
    (r"^TPU v4", "TPU v4", 275.0, 275.0),
    (r"^TPU v5 ?lite|^TPU v5e", "TPU v5e", 197.0, 197.0),
    (r"^TPU v5p?$", "TPU v5p", 459.0, 459.0),
    (r"^TPU v6", "TPU v6e", 918.0, 918.0),
)


def peak_flops(device_kind: str, dtype: str = "float32") -> tuple[float | None, str]:
  """The peak dense FLOP/s of one device of `device_kind` at `dtype` (bfloat16 or
  float32 compute), and where the figure comes from; None where none is published
  (a CPU: its FLOP/s depend on the host's processor and load)."""
  for pattern, name, bf16, fp32 in PEAK_TFLOPS:
    if re.search(pattern, device_kind):
      tflops = bf16 if dtype == "bfloat16" else fp32
      if tflops is None:
        return None, f"{name} has no published {dtype} peak"
      return tflops * 1e12, f"{name} {dtype} peak {tflops:g} TFLOP/s (vendor datasheet)"
  return None, f"no published peak for device kind {device_kind!r}"


def flops_of(compiled: Any) -> float | None:
  """FLOPs of one run of a compiled step by XLA's cost analysis (`jax.jit(f).lower(...)
  .compile()`): per device for a program partitioned over several. None where the
  backend has no cost analysis. Older JAX returns a list with one dict per computation."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def efficiency(*, flops_per_step: float | None, train_steps: int, train_seconds: float,
               wall_s: float, device_kind: str, num_devices: int, trials: int,
               dtype: str = "float32") -> dict[str, Any]:
  """The figure of merit of a run: runs (trials) per device-hour, and the model FLOPs
  utilisation (MFU) of its training steps.

  flops_per_step: XLA's count for one train step (flops_of; per device when the step is
  partitioned over devices, as every device runs the same program), None if unknown.
  train_steps, train_seconds: timed training steps and their seconds (the compiling first
  step and evaluations left out). wall_s: the run's wall time; device-hours are wall_s x
  num_devices; trials: the trials (runs) it trained, packed or one after another.
  mfu = flops_per_step x train_steps / (train_seconds x one device's peak) (null where
  the peak or the FLOPs are unknown, e.g. a CPU)."""
  peak, source = peak_flops(device_kind, dtype)
  if not flops_per_step:
    source = f"no FLOP count of the step; {source}"
  mfu = None
  if peak and flops_per_step and train_steps > 0 and train_seconds > 0:
    mfu = flops_per_step * train_steps / (train_seconds * peak)
  device_hours = wall_s * num_devices / 3600
  return {"flops_per_step": flops_per_step,
          "mfu": round(mfu, 5) if mfu is not None else None,
          "runs_per_device_hour": round(trials / device_hours, 3) if device_hours > 0 else None,
          "device_hours": round(device_hours, 6),
          "peak_flops_source": source}
