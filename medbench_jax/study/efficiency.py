"""What a sweep's runs cost: runs (trials) per device-hour and model FLOPs utilisation
(MFU), per run and over the sweep, from the cost fields of each results.json
(trainer/results.py `efficiency`) and the runner's wall times (status.json).

Per run: the trainer's figures as it recorded them; "not recorded" where its results.json
has none (a run from before they were recorded). Over the sweep: trials / device-hours
summed over the runs that recorded them, by the trainer's wall time (device-hours from
results.json) and by the runner's (status.json wall_s x the run's devices: start-up and
data preparation included); MFU as the mean over the runs that have one.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from medbench_jax.study import runs as runs_lib
from medbench_jax.study import sweep as sweep_lib

NOT_RECORDED = "not recorded"
COLUMNS = ["run", "model", "init", "label_fraction", "trials", "device_kind", "devices",
           "wall_s", "runner_wall_s", "device_hours", "runs_per_device_hour", "mfu",
           "flops_per_step", "peak_flops_source"]


def _number(value: Any) -> float | None:
  return float(value) if isinstance(value, (int, float)) and not isinstance(
      value, bool) else None


def table(collection: runs_lib.Collection) -> pd.DataFrame:
  """One row per finished run (COLUMNS); None where a figure was not recorded."""
  rows = []
  for run in collection.runs:
    results = run.results
    cost = results.get("cost") or {}
    devices = (results.get("provenance") or {}).get("devices") or {}
    status = sweep_lib.read_status(run.workdir) or {}
    rows.append({
        "run": run.name, "model": results["model"], "init": results["init"],
        "label_fraction": results["label_fraction"], "trials": len(results["trials"]),
        "device_kind": devices.get("kind"), "devices": _number(devices.get("count")),
        "wall_s": _number(cost.get("wall_s")), "runner_wall_s": _number(status.get("wall_s")),
        **{key: _number(cost.get(key)) for key in (
            "device_hours", "runs_per_device_hour", "mfu", "flops_per_step")},
        "peak_flops_source": cost.get("peak_flops_source")})
  return pd.DataFrame(rows, columns=COLUMNS)


def totals(frame: pd.DataFrame) -> dict[str, Any]:
  """The sweep's runs per device-hour (trainer's and runner's wall time) and mean MFU,
  each over the runs that recorded what it needs, with those runs' count."""
  recorded = frame.dropna(subset=["device_hours"])
  recorded = recorded[recorded["device_hours"] > 0]
  runner = frame.dropna(subset=["runner_wall_s", "devices"])
  runner_hours = (runner["runner_wall_s"] * runner["devices"]).sum() / 3600
  mfu = frame["mfu"].dropna()
  return {
      "runs": len(frame),
      "recorded": len(recorded),
      "runs_per_device_hour": (recorded["trials"].sum() / recorded["device_hours"].sum()
                               if len(recorded) else None),
      "with_runner_wall": len(runner),
      "runs_per_device_hour_runner": (runner["trials"].sum() / runner_hours
                                      if runner_hours > 0 else None),
      "mfu_runs": len(mfu),
      "mean_mfu": float(mfu.mean()) if len(mfu) else None,
  }


def _cell(value: Any, fmt: str) -> str:
  return NOT_RECORDED if value is None or pd.isna(value) else format(value, fmt)


def _device(row: pd.Series) -> str:
  if pd.isna(row["device_kind"]) or not row["device_kind"]:
    return NOT_RECORDED
  return row["device_kind"] + ("" if pd.isna(row["devices"]) else f" x {row['devices']:.0f}")


def _mfu(row: pd.Series) -> str:
  if pd.isna(row["device_hours"]):
    return NOT_RECORDED  # the run recorded no efficiency at all
  if pd.isna(row["mfu"]):
    source = row["peak_flops_source"]
    return f"none: {'no FLOP count' if pd.isna(source) else source}"
  return f"{row['mfu']:.1%}"


def section(collection: runs_lib.Collection, out) -> list[str]:
  """report.md's section (Markdown lines); writes OUT/efficiency.csv."""
  from medbench_jax.study import tables

  frame = table(collection)
  frame.to_csv(out / "efficiency.csv", index=False)
  lines = ["## Cost: runs per device-hour and MFU", "",
           "Per run, from its results.json: device-hours (the trainer's wall time x its "
           "devices), runs (trials) per device-hour, and model FLOPs utilisation of the "
           "training steps (XLA's FLOP count of the compiled step / (step time x the "
           "device's published peak); none for a CPU). `efficiency.csv` holds every "
           "figure.", ""]
  if frame.empty:
    return lines + ["No finished run.", ""]
  lines += [tables.markdown_table(
      ["run", "trials", "device", "device-hours", "runs / device-hour", "MFU"],
      [[r["run"], str(r["trials"]), _device(r), _cell(r["device_hours"], ".4f"),
        _cell(r["runs_per_device_hour"], ".1f"), _mfu(r)] for _, r in frame.iterrows()]),
            ""]
  t = totals(frame)
  sweep = (f"{t['runs_per_device_hour']:.1f} runs per device-hour over the "
           f"{t['recorded']} of {t['runs']} runs that recorded it (trainer's wall time)"
           if t["runs_per_device_hour"] is not None else
           f"runs per device-hour {NOT_RECORDED} (no run recorded it)")
  if t["runs_per_device_hour_runner"] is not None:
    sweep += (f"; {t['runs_per_device_hour_runner']:.1f} by the runner's wall time "
              f"(status.json, start-up included) over {t['with_runner_wall']} runs")
  sweep += (f"; mean MFU {t['mean_mfu']:.1%} over {t['mfu_runs']} runs"
            if t["mean_mfu"] is not None else f"; MFU {NOT_RECORDED} or without a peak")
  return lines + [f"Sweep: {sweep}.", ""]
