"""runtime.py: the accelerator a run is asked for must be there (its plugin installed), and
a run's first log lines name the backend and its devices."""

import logging
import os
import signal
import subprocess
import sys

import jax
import pytest

from medbench_jax import runtime
from tests import helpers


@pytest.mark.parametrize("platforms,install", [
    ("cuda", "requirements-cuda12.txt"), ("tpu", "requirements-tpu.txt"),
    ("cpu,gpu", "requirements-cuda12.txt")])
def test_an_accelerator_without_its_plugin_is_an_error(platforms, install):
  with pytest.raises(RuntimeError, match=f"JAX_PLATFORMS={platforms} asks for .*{install}"):
    runtime.check_platforms(platforms)


def test_the_cpu_needs_no_plugin():
  for platforms in ("", "cpu", " CPU "):
    runtime.check_platforms(platforms)


def test_main_with_jax_platforms_cuda_fails_naming_the_install_command(tmp_path):
  """Not a silent CPU run: main stops before any work, saying what to install."""
  out = subprocess.run(
      [sys.executable, "-m", "medbench_jax.main", f"--config={helpers.TINY}",
       f"--workdir={tmp_path / 'run'}"], cwd=helpers.REPO, capture_output=True, text=True,
      env=helpers.subprocess_env(JAX_PLATFORMS="cuda"), timeout=120)
  assert out.returncode != 0
  assert ("JAX_PLATFORMS=cuda asks for cuda, but JAX's cuda plugin is not installed"
          in out.stderr)
  assert "pip install -r requirements-cuda12.txt" in out.stderr
  assert not (tmp_path / "run").exists()


def test_the_backend_and_device_counts_are_logged(caplog):
  with caplog.at_level(logging.INFO):
    runtime.log_backend()
  (line,) = [r.getMessage() for r in caplog.records if "JAX backend" in r.getMessage()]
  assert line == (f"JAX backend: cpu (cpu), {jax.local_device_count()} local device(s), "
                  f"{jax.device_count()} global device(s), process 0 of 1.")


# ---------------------------------------------------------------- SLURM


def _initialize_arguments(monkeypatch, **env: str) -> dict:
  """What runtime.join passes to jax.distributed.initialize in a SLURM task with `env`."""
  for name in list(os.environ):
    if name.startswith("SLURM_") or name in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS"):
      monkeypatch.delenv(name)
  for name, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-018]",
                      "SLURM_NTASKS": "2", **env}.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  runtime.join()
  ((args, kwargs),) = calls
  assert args == (None, None, None)  # found by JAX from the SLURM variables
  return kwargs


def _as_jax_completes(local_device_ids) -> tuple:
  """(coordinator, processes, process id, local device ids) as jax.distributed completes
  them from the environment."""
  from jax._src import clusters
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, local_device_ids, None, 300)


def test_slurm_task_alone_on_its_node_uses_all_of_its_gpus(monkeypatch):
  kwargs = _initialize_arguments(
      monkeypatch, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1",
      SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_NTASKS_PER_NODE="1",
      CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert kwargs["local_device_ids"] == list(range(8))
  assert _as_jax_completes(kwargs["local_device_ids"])[1:] == (2, 1, list(range(8)))
  # Left to JAX, the process would see the GPU of its local rank alone.
  assert _as_jax_completes(None)[3] == [0]


def test_slurm_gpus_on_node_counts_when_cuda_visible_devices_is_unset(monkeypatch):
  kwargs = _initialize_arguments(
      monkeypatch, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
      SLURM_STEP_TASKS_PER_NODE="1,4", SLURM_GPUS_ON_NODE="4")
  assert kwargs["local_device_ids"] == [0, 1, 2, 3]


@pytest.mark.parametrize("tasks_per_node,node", [("8(x2)", "1"), ("1,4", "1")])
def test_slurm_task_per_gpu_keeps_the_gpu_of_its_local_rank(monkeypatch, tasks_per_node,
                                                             node):
  kwargs = _initialize_arguments(
      monkeypatch, SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3",
      SLURM_NODEID=node, SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
      CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert kwargs["local_device_ids"] is None
  assert _as_jax_completes(None)[3] == [3]


def test_outside_slurm_jax_decides(monkeypatch):
  assert _initialize_arguments(monkeypatch)["local_device_ids"] is None


# ---------------------------------------------------------------- preemption


def test_a_signal_stops_a_single_process_run_at_the_next_check(monkeypatch):
  # The signal's record is process state: restored afterwards, so later in-process
  # trainings are not told to stop.
  monkeypatch.setattr(runtime, "_preemption_signal", None)
  monkeypatch.setattr(runtime, "_preemption_checks", 0)
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    runtime.watch_for_preemption()
    assert not runtime.preemption_requested()
    signal.raise_signal(signal.SIGTERM)
    assert runtime.preemption_requested()
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
