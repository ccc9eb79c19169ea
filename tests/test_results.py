"""trainer/results.py: trial summaries against numpy and scipy; provenance and cost."""

import hashlib
import math

import numpy as np
import pytest
import scipy.stats

from medbench_jax.trainer import results


def test_summary_matches_numpy_and_scipy():
  values = [0.81, 0.79, 0.84, 0.80, math.nan, None]
  s = results.summarize(values)
  finite = np.array(values[:4])
  assert s["n"] == 4
  assert abs(s["mean"] - finite.mean()) < 1e-12
  assert abs(s["std"] - finite.std(ddof=1)) < 1e-12
  assert abs(s["std"] / math.sqrt(4) - scipy.stats.sem(finite)) < 1e-12
  # The reference study prints np.std: the population standard deviation.
  assert abs(s["std_paper"] - np.std(finite)) < 1e-12
  one = results.summarize([0.8])
  assert math.isnan(one["std"]) and one["std_paper"] == 0.0 and one["n"] == 1


def test_weights_file_and_its_hash(tmp_path):
  ckpt = tmp_path / "r50.pth"
  ckpt.write_bytes(b"weights" * 1000)
  assert results.weights_file("random") is None
  assert results.weights_file(str(ckpt)) == str(ckpt)
  assert results.weights_file(f"moco:{ckpt}") == str(ckpt)
  assert results.weights_file(str(tmp_path / "missing.pth")) is None
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text("{}")
  assert results.weights_file(f"run:{tmp_path / 'run'}/trial_1") == str(
      tmp_path / "run" / "results.json")
  assert results.sha256_file(ckpt) == hashlib.sha256(b"weights" * 1000).hexdigest()


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5), ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", "float32", 417.5), ("NVIDIA H200", "bfloat16", 989.5),
    ("NVIDIA A100-SXM4-40GB", "float32", 156.0), ("Tesla V100-PCIE-32GB", "float32", 14.0),
    ("Tesla V100-SXM2-16GB", "float32", 15.7), ("NVIDIA L4", "bfloat16", 121.0),
    ("TPU v4", "bfloat16", 275.0), ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "float32", 459.0), ("TPU v6 lite", "bfloat16", 918.0)])
def test_peak_flops_of_jax_device_kinds(kind, dtype, tflops):
  peak, source = results.peak_flops(kind, dtype)
  assert peak == pytest.approx(tflops * 1e12) and f"{tflops:g} TFLOP/s" in source


def test_no_peak_for_a_cpu_or_v100_in_bfloat16():
  assert results.peak_flops("cpu") == (None, "no published peak for device kind 'cpu'")
  assert results.peak_flops("Tesla V100-SXM2-16GB", "bfloat16")[0] is None
  assert results.peak_flops("NVIDIA GH200 480GB", "bfloat16")[0] is None  # not in the table


def test_efficiency_against_hand_arithmetic():
  # 100 steps of 2 TFLOP in 4 s on one H100 SXM (989.5 TFLOP/s bf16): 5e13 / 9.895e14.
  # 4 trials in 30 min on 2 devices: 1 device-hour.
  e = results.efficiency(flops_per_step=2e12, train_steps=100, train_seconds=4.0,
                         wall_s=1800.0, device_kind="NVIDIA H100 80GB HBM3", num_devices=2,
                         trials=4, dtype="bfloat16")
  assert e["mfu"] == pytest.approx(5e13 / 989.5e12, abs=1e-5)
  assert e["device_hours"] == 1.0 and e["runs_per_device_hour"] == 4.0
  assert e["flops_per_step"] == 2e12 and "H100/H200 SXM bfloat16" in e["peak_flops_source"]
  cpu = results.efficiency(flops_per_step=6.4e9, train_steps=48, train_seconds=160.0,
                           wall_s=360.0, device_kind="cpu", num_devices=1, trials=2)
  assert cpu["mfu"] is None and cpu["runs_per_device_hour"] == 20.0
  assert cpu["peak_flops_source"] == "no published peak for device kind 'cpu'"
  unknown = results.efficiency(flops_per_step=None, train_steps=10, train_seconds=1.0,
                               wall_s=36.0, device_kind="TPU v4", num_devices=4, trials=1)
  assert unknown["mfu"] is None and unknown["runs_per_device_hour"] == 25.0


def test_flops_of_a_compiled_step_and_results_json_cost():
  import jax
  import jax.numpy as jnp

  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert results.flops_of(compiled) == 2 * 64 * 32 * 16
  e = results.efficiency(flops_per_step=1.0, train_steps=1, train_seconds=1.0, wall_s=3.6,
                         device_kind="cpu", num_devices=1, trials=1)
  record = results.assemble(
      task_fields={"task": "classification", "metric": "mean_auc"},
      config={"dataset": {"name": "d", "label_fraction": 1.0}, "model": {"name": "m",
                                                                        "init": "random"}},
      trials=[{"test": {"mean_auc": 0.5}, "cost": {}}], subset={}, skipped_examples=0,
      provenance={}, wall_s=3.6, efficiency=e)
  assert record["cost"]["runs_per_device_hour"] == 1000.0 and record["cost"]["wall_s"] == 3.6
  assert record["cost"]["mfu"] is None
