"""Slots at device level: TPU slices (libtpu's topology variables), GPU machines, SLURM
allocations, the CPU; and the TPU backend's dry run of a v4-32 slice."""

import math
import os
import shlex
import stat
import subprocess
import sys

import pytest

from medbench_jax.study import planner
from medbench_jax.study import slots
from medbench_jax.study import sweep
from medbench_jax.study import sweep_tpu
from tests.helpers import REPO
from tests.helpers import TINY

# libtpu's variables for a process on part of a TPU host, as documented for running
# several processes on one TPU VM (PyTorch/XLA's PJRT guide and configure_topology, JAX's
# topology gist): name -> what a valid value looks like.
LIBTPU_VARIABLES = ("TPU_VISIBLE_CHIPS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_PROCESS_BOUNDS",
                    "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_PORT", "CLOUD_TPU_TASK_ID")


def _bounds(text):
  dims = [int(d) for d in text.split(",")]
  assert len(dims) == 3 and all(d >= 1 for d in dims), text
  return dims


def check_libtpu_environment(env, chips_per_host):
  """What the documented variables must say for one process alone in its program on
  some chips of its host."""
  assert set(LIBTPU_VARIABLES) <= set(env)
  chips = [int(c) for c in env["TPU_VISIBLE_CHIPS"].split(",")]
  assert chips == sorted(set(chips)) and all(0 <= c < chips_per_host for c in chips)
  # The chips' shape holds exactly the visible chips; the program has one process.
  assert math.prod(_bounds(env["TPU_CHIPS_PER_PROCESS_BOUNDS"])) == len(chips)
  assert _bounds(env["TPU_PROCESS_BOUNDS"]) == [1, 1, 1]
  addresses = env["TPU_PROCESS_ADDRESSES"].split(",")
  assert len(addresses) == math.prod(_bounds(env["TPU_PROCESS_BOUNDS"]))
  # This process's address is its task id's entry, on its own port.
  host, port = addresses[int(env["CLOUD_TPU_TASK_ID"])].rsplit(":", 1)
  assert host == "localhost" and port == env["TPU_PROCESS_PORT"] and int(port) > 1024
  return chips


@pytest.mark.parametrize("accelerator,hosts,chips,kind", [
    ("v4-8", 1, 4, "TPU v4"), ("v4-32", 4, 4, "TPU v4"), ("v3-8", 1, 4, "TPU v3"),
    ("v5p-16", 2, 4, "TPU v5"), ("v5litepod-8", 1, 8, "TPU v5 lite"),
    ("v5litepod-16", 4, 4, "TPU v5 lite"), ("v6e-4", 1, 4, "TPU v6 lite")])
def test_tpu_accelerator_types_give_hosts_and_chips(accelerator, hosts, chips, kind):
  topology = slots.tpu_topology(accelerator)
  assert (topology.hosts, topology.chips_per_host, topology.device_kind) == (hosts, chips,
                                                                            kind)


@pytest.mark.parametrize("bad", ["v4", "v9-8", "v4-3", "tpu-v4-32"])
def test_unknown_tpu_types_are_refused(bad):
  with pytest.raises(ValueError, match="TPU accelerator type"):
    slots.tpu_topology(bad)


def test_a_v4_32_slice_runs_16_single_chip_points_with_libtpus_variables():
  topology = slots.tpu_topology("v4-32")
  found = slots.tpu_slice_slots(topology)
  assert len(found) == 16
  for worker in range(4):
    on_host = [s for s in found if s.worker == worker]
    assert len(on_host) == 4 and {s.host for s in on_host} == {f"worker {worker}"}
    chips = [check_libtpu_environment(s.env, 4) for s in on_host]
    assert sorted(c for group in chips for c in group) == [0, 1, 2, 3]
    assert all(s.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1" for s in on_host)
    # Processes of one host listen on ports of their own.
    assert len({s.env["TPU_PROCESS_PORT"] for s in on_host}) == 4


@pytest.mark.parametrize("per_point,count,bounds", [(2, 8, "1,2,1"), (4, 4, "2,2,1")])
def test_several_chips_per_point_stay_on_one_host(per_point, count, bounds):
  found = slots.tpu_slice_slots(slots.tpu_topology("v4-32"), per_point)
  assert len(found) == count
  for slot in found:
    assert len(check_libtpu_environment(slot.env, 4)) == per_point
    assert slot.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == bounds


def test_a_point_as_large_as_the_slice_runs_on_every_host():
  (whole,) = slots.tpu_slice_slots(slots.tpu_topology("v4-32"), 16)
  assert whole.worker is None and whole.env == {} and len(whole.devices) == 16
  with pytest.raises(ValueError, match="chips of one host .at most 4 on v4-32. or on the "
                     "whole slice"):
    slots.tpu_slice_slots(slots.tpu_topology("v4-32"), 8)
  # A single-host VM: all its chips are still one process's, told so.
  (vm,) = slots.tpu_slice_slots(slots.tpu_topology("v5litepod-8"), 8)
  assert vm.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "2,4,1"


def test_gpu_machines_run_a_point_per_gpu_by_default():
  four = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  assert [s.env for s in slots.local_slots(platform="gpu", environ=four)] == [
      {"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots.local_slots(
      devices_per_point=2, platform="gpu", environ=four)] == ["0,1", "2,3"]
  # --parallel alone splits the devices into that many groups, as it always did.
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots.local_slots(
      2, platform="gpu", environ=four)] == ["0,1", "2,3"]
  # --parallel caps the slots of --devices_per_point.
  assert len(slots.local_slots(3, 1, "gpu", four)) == 3
  with pytest.raises(ValueError, match="--parallel=3 needs at least 3 GPUs; found 2"):
    slots.local_slots(3, platform="gpu", environ={"CUDA_VISIBLE_DEVICES": "4,5"})
  with pytest.raises(ValueError, match="A point on 4 GPUs needs at least 4; found 2"):
    slots.local_slots(devices_per_point=4, platform="gpu",
                      environ={"CUDA_VISIBLE_DEVICES": "4,5"})


def test_a_tpu_vm_here_gets_a_slot_per_chip(monkeypatch):
  monkeypatch.setattr(slots, "tpu_chips", lambda: ["0", "1", "2", "3"])
  found = slots.local_slots(platform="tpu", environ={})
  assert [s.env["TPU_VISIBLE_CHIPS"] for s in found] == ["0", "1", "2", "3"]
  for slot in found:
    check_libtpu_environment(slot.env, 4)
  halves = slots.local_slots(2, platform="tpu", environ={})
  assert [s.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in halves] == ["1,2,1", "1,2,1"]


def test_the_cpu_runs_one_point_unless_told_to_split_its_cores():
  assert slots.local_slots(platform="cpu", environ={}) == [slots.Slot({})]
  two = slots.local_slots(2, platform="cpu", environ={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert [s.env["XLA_FLAGS"] for s in two] == ["--xla_force_host_platform_device_count=4"] * 2


def test_a_slurm_allocation_runs_a_point_per_gpu():
  found = slots.slurm_slots(2, 4)
  assert len(found) == 8
  assert [(s.host, s.env["CUDA_VISIBLE_DEVICES"]) for s in found[3:5]] == [
      ("node 0", "3"), ("node 1", "0")]
  assert len(slots.slurm_slots(2, 4, 2)) == 4
  (spanning,) = slots.slurm_slots(2, 4, 8)
  assert spanning.host == "nodes 0-1"
  with pytest.raises(ValueError, match="multiple of gpus_per_node"):
    slots.slurm_slots(2, 4, 6)


# ---------------------------------------------------------------------- the TPU backend


def _many_points(count):
  return sweep.Sweep("many", sweep.grid(TINY, {"seed": list(range(count))}))


def test_tpu_commands_put_each_point_on_its_host_with_its_chips(tmp_path):
  plan = sweep.plan(_many_points(18), tmp_path, validate=False)
  tpu = sweep_tpu.Slice("t1", "us-central2-b")
  topology = slots.tpu_topology("v4-32")
  found = slots.tpu_slice_slots(topology)
  estimates = [planner.Estimate(p.name, sweep.NEW, 1, 1, seconds=60.0) for p in plan.points]
  order = planner.schedule(plan, estimates, found)
  assert sum(a.start_s == 0 for a in order) == 16  # two wait for a free chip
  assert len({(a.slot.host, a.slot.devices) for a in order[:16]}) == 16
  lines = sweep_tpu.describe(plan, tpu, topology, found).splitlines()
  assert lines[0] == "t1: v4-32, 4 host(s) x 4 chips (TPU v4); 16 slot(s) of 1 chip(s)"
  first = shlex.split(lines[2])
  assert first[:7] == ["bash", sweep_tpu.LAUNCHER, "run", "t1", "--zone=us-central2-b",
                       "--worker=0", "--"]
  env = dict(word.split("=", 1) for word in first[8:first.index("python3")])
  assert first[7] == "env" and env == found[0].env
  assert "--multiprocess" not in first
  whole = sweep_tpu.Slice("t1", "z").command(plan.points[0], slots.tpu_slice_slots(
      topology, 16)[0])
  assert whole[5:7] == ["--", "python3"] and whole[-1] == "--multiprocess"


def test_the_slice_shape_comes_from_gcloud_without_tpu_type(tmp_path, monkeypatch):
  gcloud = tmp_path / "gcloud"
  gcloud.write_text('#!/bin/bash\n[[ "$4 $5" == "describe t1" ]] && echo v4-32\n')
  gcloud.chmod(stat.S_IRWXU)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  assert sweep_tpu.Slice("t1", "z").topology() == slots.tpu_topology("v4-32")
  assert sweep_tpu.Slice("t1", "z").topology("v4-8").hosts == 1


@pytest.mark.timeout(600)
def test_tpu_dry_run_of_a_v4_32_slice_shows_16_points_at_once_and_their_environment(
    tmp_path):
  sweep_file = tmp_path / "many.py"
  sweep_file.write_text(
      "from medbench_jax.study import sweep\n\n\ndef get_sweep(arg=None):\n"
      f"  return sweep.Sweep('many', sweep.grid({TINY!r}, {{'seed': list(range(18))}}))\n")
  out = subprocess.run(
      [sys.executable, "-m", "medbench_jax.sweep", f"--sweep={sweep_file}",
       f"--root={tmp_path / 'root'}", "--backend=tpu", "--tpu=t1", "--zone=z",
       "--tpu_type=v4-32", "--dry_run"], capture_output=True, text=True, cwd=REPO,
      timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "t1: v4-32, 4 host(s) x 4 chips (TPU v4); 16 slot(s) of 1 chip(s)" in text
  assignments = [line for line in text.splitlines() if line.startswith("  seed=")]
  envs = [line.split("env: ", 1)[1] for line in text.splitlines() if "env: " in line]
  assert len(assignments) == 18 and len(envs) == 18
  where = [line.split(" -> ")[1].split(";")[0] for line in assignments]
  assert len(set(where[:16])) == 16 and where[0] == "worker 0, device(s) 0"
  for line in envs:
    check_libtpu_environment(dict(word.split("=", 1) for word in line.split()), 4)
  assert "Cost: 18 point(s) to run, 16 at once on 16 slot(s)" in text
