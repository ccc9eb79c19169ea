"""study/efficiency.py: runs per device-hour and MFU per run and per sweep, in the report."""

import json

import pytest

from medbench_jax.study import efficiency
from medbench_jax.study import report
from medbench_jax.study import runs
from medbench_jax.study import sweep
from tests import study_sweep


def _run(root, name, *, model, seeds, cost=None, devices=None, runner_wall_s=None):
  trials = [{"seed": s, "best_step": 1, "best_val_loss": 0.1,
             "test": {"mean_auc": 0.8 + 0.01 * s}} for s in seeds]
  workdir = root / name
  study_sweep.write_results(workdir, task="classification", dataset="d", model=model,
                            init="random", fraction=1.0, trials=trials, num_trials=len(seeds))
  results = json.loads((workdir / "results.json").read_text())
  if cost is not None:
    results["cost"] = cost
  if devices is not None:
    results["provenance"] = {"devices": devices}
  (workdir / "results.json").write_text(json.dumps(results))
  if runner_wall_s is not None:
    sweep.write_status(workdir, sweep.DONE, wall_s=runner_wall_s)


def _root(tmp_path):
  # cpu: 2 trials in 180 s on 1 device (0.05 h, 40 runs/h), no peak; the runner saw 200 s.
  _run(tmp_path, "cpu_run", model="resnet18", seeds=[0, 1], runner_wall_s=200.0,
       devices={"kind": "cpu", "count": 1},
       cost={"wall_s": 180.0, "device_hours": 0.05, "runs_per_device_hour": 40.0,
             "mfu": None, "flops_per_step": 6.4e9,
             "peak_flops_source": "no published peak for device kind 'cpu'"})
  # Two H100s: 2 trials in 180 s (0.1 device-h, 20 runs/h), MFU 25%; the runner saw 360 s.
  _run(tmp_path, "gpu_run", model="resnet50", seeds=[0, 1], runner_wall_s=360.0,
       devices={"kind": "NVIDIA H100 80GB HBM3", "count": 2},
       cost={"wall_s": 180.0, "device_hours": 0.1, "runs_per_device_hour": 20.0,
             "mfu": 0.25, "flops_per_step": 1e12, "peak_flops_source": "H100"})
  # A run from before the fields were recorded.
  _run(tmp_path, "old_run", model="densenet121", seeds=[0, 1, 2])


def test_efficiency_table_and_sweep_totals(tmp_path):
  _root(tmp_path)
  frame = efficiency.table(runs.collect(tmp_path)).set_index("run")
  assert frame.loc["gpu_run", "devices"] == 2 and frame.loc["gpu_run", "mfu"] == 0.25
  assert frame.loc["cpu_run", "runner_wall_s"] == 200.0
  assert frame.loc["old_run"][["device_hours", "mfu", "runner_wall_s"]].isna().all()
  totals = efficiency.totals(frame.reset_index())
  # Trainer's wall time: 4 trials / 0.15 device-h; runner's: 4 trials / ((200 x 1 + 360 x 2)
  # / 3600) device-h; MFU: the GPU run's alone.
  assert totals["recorded"] == 2 and totals["runs"] == 3
  assert totals["runs_per_device_hour"] == pytest.approx(4 / 0.15)
  assert totals["runs_per_device_hour_runner"] == pytest.approx(4 / (920 / 3600))
  assert totals["mean_mfu"] == 0.25 and totals["mfu_runs"] == 1


def test_report_shows_efficiency_per_run_and_per_sweep(tmp_path):
  _root(tmp_path / "root")
  report.build(tmp_path / "root", tmp_path / "out", num_resamples=0, with_plots=False)
  text = (tmp_path / "out" / "report.md").read_text()
  section = text[text.index("## Cost: runs per device-hour and MFU"):]
  assert "| gpu_run | 2 | NVIDIA H100 80GB HBM3 x 2 | 0.1000 | 20.0 | 25.0% |" in section
  assert ("| cpu_run | 2 | cpu x 1 | 0.0500 | 40.0 | none: no published peak for device "
          "kind 'cpu' |") in section
  assert "| old_run | 3 | not recorded | not recorded | not recorded | not recorded |" in section
  assert (f"Sweep: {4 / 0.15:.1f} runs per device-hour over the 2 of 3 runs that recorded "
          f"it (trainer's wall time); {4 / (920 / 3600):.1f} by the runner's wall time "
          "(status.json, start-up included) over 2 runs; mean MFU 25.0% over 1 runs.") in section
  csv = (tmp_path / "out" / "efficiency.csv").read_text().splitlines()
  assert csv[0].split(",") == efficiency.COLUMNS and len(csv) == 4
