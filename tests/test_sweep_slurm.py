"""The SLURM backend: job arrays per dependency wave through submitit, the variables
jax.distributed reads in each task, and a real two-point array on submitit's local
executor."""

import json
import os
import pathlib
import re
import stat

from jax._src import clusters
import pytest
import submitit

from medbench_jax.study import sweep
from medbench_jax.study import sweep_slurm
from tests.helpers import REPO
from tests.helpers import TINY

FAKE_SBATCH = """#!/bin/bash
# Records the submission file and answers as sbatch does.
count_file="{record}/count"
n=$(( $(cat "$count_file" 2>/dev/null || echo 1000) + 1 ))
echo "$n" > "$count_file"
cp "$1" "{record}/sbatch_$n.sh"
echo "Submitted batch job $n"
"""


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("PYTHONPATH", str(REPO))


def _plan(root, phantom_dir, chain=True, **fixed):
  """Two points (seeds 0 and 1) and, with `chain`, one that starts from the first."""
  fixed = {"dataset.manual_dir": str(phantom_dir), **fixed}
  points = sweep.grid(TINY, {"seed": [0, 1]}, fixed=fixed)
  if chain:
    points += sweep.grid(TINY, {"model.init": {"chain": sweep.run_of(points[0])}},
                         fixed=fixed)
  return sweep.plan(sweep.Sweep("slurm", points), root)


def _sbatch_flags(text: str) -> dict[str, str]:
  return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))


def test_waves_are_job_arrays_of_one_point_per_task_chained_by_dependencies(
    tmp_path, phantom_dir, monkeypatch):
  record = tmp_path / "record"
  record.mkdir()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(record=record))
  (bin_dir / "srun").write_text("#!/bin/bash\nexit 1\n")  # submitit looks for it
  for tool in ("sbatch", "srun"):
    (bin_dir / tool).chmod(stat.S_IRWXU)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  plan = _plan(tmp_path / "root", phantom_dir)
  # An allocation of 2 nodes x 4 GPUs: 8 points at once, each one process on one GPU.
  allocation = sweep_slurm.parse_parameters(["slurm_partition=gpu", "nodes=2",
                                             "gpus_per_node=4"])
  assert allocation.parameters["slurm_array_parallelism"] == 8
  assert len(allocation.slots()) == 8
  lines = []
  jobs = sweep_slurm.submit(plan, allocation.parameters, out=lines.append)
  # submitit submits a one-task wave as a plain job.
  assert [j.job_id for j in jobs] == ["1001", "1002_0", "1002_1", "1003"]
  assert lines[1:] == ["job 1001: prepare 1 data set(s)", "wave 1: 2 task(s), job 1002",
                       "wave 2: 1 task(s), job 1003"]

  prepare, wave1, wave2 = (_sbatch_flags((record / f"sbatch_{n}.sh").read_text())
                           for n in (1001, 1002, 1003))
  assert "array" not in prepare and prepare["nodes"] == "1"
  assert prepare["ntasks-per-node"] == "1"
  assert wave1["array"] == "0-1%2" and "array" not in wave2
  for flags in (wave1, wave2):
    assert flags["nodes"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["gpus-per-node"] == "1" and flags["partition"] == "gpu"
    assert flags["job-name"] == "medbench-slurm"
  assert wave1["dependency"] == "afterany:1001" and wave2["dependency"] == "afterany:1002"
  assert "srun" in (record / "sbatch_1002.sh").read_text()

  # One point per array task, in the wave's order, with the workdirs of its dependencies.
  submitted = {}
  for job in jobs[1:]:
    task = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle).args[0]
    submitted[job.job_id] = task
  assert {k: t.point.name for k, t in submitted.items()} == {
      "1002_0": "seed=0", "1002_1": "seed=1", "1003": "init=chain"}
  assert submitted["1003"].dependencies == (("seed=0", str(plan.points[0].workdir)),)
  assert submitted["1002_0"].cwd == str(REPO)
  assert sweep.read_status(plan.by_name()["seed=1"].workdir)["reason"] == "SLURM job 1002_1"


def test_tasks_get_the_flags_for_what_jax_distributed_reads(monkeypatch):
  # Task 5 of 8 on two nodes, as srun starts it (one task per GPU).
  slurm = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[017-018]",
           "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2"}
  for key, value in slurm.items():
    monkeypatch.setenv(key, value)
  assert sweep_slurm.distributed_flags(os.environ, 8, 2, 5, ["gpu017", "gpu018"],
                                       "123456") == ["--multiprocess"]
  # What jax.distributed.initialize() then finds in this environment.
  address, count, process, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None)
  assert (address, count, process, list(local)) == ("gpu017:62016", 8, 5, [1])
  # One task per node: all the node's GPUs stay visible; the coordinator and port are the
  # ones JAX would have chosen.
  assert sweep_slurm.distributed_flags(os.environ, 2, 2, 1, ["gpu017", "gpu018"],
                                       "123456") == [
      f"--coordinator_address={address}", "--num_processes=2", "--process_id=1"]
  assert sweep_slurm.distributed_flags(os.environ, 1, 1, 0, ["gpu017"], "123456") == []


def test_parameters_are_checked():
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    sweep_slurm.parse_parameters(["nodes"])
  assert sweep_slurm.parse_parameters(["gpus_per_node=0"]).parameters["tasks_per_node"] == 1
  with pytest.raises(ValueError, match="a multiple of gpus_per_node"):
    sweep_slurm.parse_parameters(["gpus_per_node=4"], devices_per_point=6)
  with pytest.raises(ValueError, match="needs 2 nodes of 8 GPUs; the allocation has nodes=1"):
    sweep_slurm.parse_parameters(["gpus_per_node=8"], devices_per_point=16)


@pytest.mark.parametrize("per_point,task,at_once", [
    (1, {"nodes": 1, "gpus_per_node": 1, "tasks_per_node": 1}, 32),
    (4, {"nodes": 1, "gpus_per_node": 4, "tasks_per_node": 1}, 8),
    # Larger than a node: one process per GPU over 2 nodes (jax.distributed).
    (16, {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8}, 2)])
def test_each_array_task_asks_for_its_points_gpus(per_point, task, at_once):
  allocation = sweep_slurm.parse_parameters(["nodes=4", "gpus_per_node=8", "timeout_min=60"],
                                            devices_per_point=per_point)
  assert allocation.parameters == {**task, "slurm_array_parallelism": at_once,
                                   "timeout_min": 60}
  assert len(allocation.slots()) == at_once


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_local_executor_runs_a_two_point_array(tmp_path, phantom_dir, monkeypatch):
  monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("XLA_FLAGS", "")
  plan = _plan(tmp_path / "root", phantom_dir, chain=False, **{"train.max_steps": 4})
  jobs = sweep_slurm.submit(plan, sweep_slurm.parse_parameters(
      ["gpus_per_node=0", "timeout_min=60"]).parameters, cluster="local", out=lambda s: None)
  prepare, *points = jobs
  assert prepare.result() is None
  assert [job.result() for job in points] == ["done", "done"]
  # The local executor runs an array's tasks as processes of their own (no scheduler ids).
  assert len({job.job_id for job in points}) == 2
  for job, point in zip(points, plan.points):
    # Each task ran its own point: its output names that workdir only.
    out = pathlib.Path(job.paths.stdout).read_text()
    assert re.findall(r"--workdir=(\S+)", out) == [str(point.workdir)]
    status = sweep.read_status(point.workdir)
    assert status["state"] == "done" and status["job_id"] == job.job_id
    results = json.loads((point.workdir / "results.json").read_text())
    assert results["trials"][0]["seed"] == int(point.name[-1])
