"""Multi-process runs over 127.0.0.1 (jax.distributed, gloo collectives between CPU
processes): preemption of every process, by hand and through launch/local_multiprocess.sh;
the SLURM script's handling of a preempted run, with stand-ins for srun and scontrol."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import time

import pytest

from tests import helpers

# 3 epochs of 6 steps; evaluations and `latest` checkpoints every 4 steps.
TINY = f"--config={helpers.TINY}:epochs=3"
SAVED = r"preempted: state saved at step (\d+)"
RUN_TIMEOUT_S = 600


def _two_processes(workdir, phantom_dir) -> list[helpers.ProcessOutput]:
  address = f"--coordinator_address=127.0.0.1:{helpers.free_port()}"
  return [helpers.ProcessOutput(
      helpers.main(workdir, phantom_dir, TINY, address, "--num_processes=2",
                   f"--process_id={i}", devices=2, wait=False),
      wait_timeout=RUN_TIMEOUT_S, finish_timeout=RUN_TIMEOUT_S)
          for i in range(2)]


def _saved_step(outputs: list[str], workdir: pathlib.Path) -> int:
  """The step every process saved at when preempted (the same for all), checked on disk."""
  steps = {int(re.search(SAVED, out).group(1)) for out in outputs}
  assert len(steps) == 1, steps
  (step,) = steps
  assert 5 <= step < 18
  from medbench_jax.trainer import checkpoints
  assert (workdir / "trial_0" / "ckpt" / "latest" / str(step) / checkpoints.MANIFEST).is_file()
  assert not (workdir / "results.json").exists()
  return step


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_sigterm_to_every_process_saves_one_step_exits_75_and_the_rerun_resumes(
    tmp_path, phantom_dir):
  """As a preempted TPU slice or SLURM job: SIGTERM reaches each process on its own."""
  workdir = tmp_path / "run"
  runs = _two_processes(workdir, phantom_dir)
  runs[0].wait_for(r"\] step 5/18 ")
  for run in runs:
    run.proc.send_signal(signal.SIGTERM)
  statuses = [run.finish() for run in runs]
  assert statuses == [75, 75], [run.output[-3000:] for run in runs]
  step = _saved_step([run.output for run in runs], workdir)

  reruns = _two_processes(workdir, phantom_dir)
  for rerun in reruns:
    assert rerun.finish() == 0, rerun.output[-4000:]
    assert f"Resuming trial 0 from step {step} " in rerun.output
  assert (workdir / "results.json").is_file()


def _launch_local(logs: pathlib.Path, workdir, phantom_dir) -> subprocess.Popen:
  # Its own session, as a terminal's foreground job: Ctrl-C reaches the whole group.
  return subprocess.Popen(
      ["bash", str(helpers.REPO / "launch" / "local_multiprocess.sh"), f"--logs={logs}", "--",
       TINY, f"--workdir={workdir}", f"--config.dataset.manual_dir={phantom_dir}"],
      cwd=helpers.REPO, env=helpers.subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_in_log(path: pathlib.Path, pattern: str, proc: subprocess.Popen) -> None:
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while not (path.exists() and re.search(pattern, path.read_text())):
    assert proc.poll() is None, proc.stdout.read()
    assert time.monotonic() < deadline, f"no {pattern!r} in {path}"
    time.sleep(1)


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_ctrl_c_to_local_multiprocess_saves_exits_75_and_the_rerun_resumes(
    tmp_path, phantom_dir):
  workdir = tmp_path / "run"
  launcher = _launch_local(tmp_path / "logs", workdir, phantom_dir)
  _wait_in_log(tmp_path / "logs" / "process_0.log", r"\] step 5/18 ", launcher)
  os.killpg(launcher.pid, signal.SIGINT)
  out, _ = launcher.communicate(timeout=RUN_TIMEOUT_S)
  assert launcher.returncode == 75, out
  assert "preempted with its state saved" in out
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  step = _saved_step(logs, workdir)
  assert "SIGINT received: saving a checkpoint" in logs[0]

  rerun = _launch_local(tmp_path / "logs2", workdir, phantom_dir)
  out, _ = rerun.communicate(timeout=RUN_TIMEOUT_S)
  assert rerun.returncode == 0, out
  for i in range(2):
    assert (f"Resuming trial 0 from step {step} "
            in (tmp_path / "logs2" / f"process_{i}.log").read_text())
  assert (workdir / "results.json").is_file()


# ---------------------------------------------------------------- SLURM requeue

# srun as SLURM runs it: each task in turn (SLURM_PROCID); with --kill-on-bad-exit=1 the
# first task to exit non-zero gets the others killed (status 128 + SIGKILL), and srun
# exits with the highest status.
FAKE_SRUN = """kill_on_bad_exit=0
while [[ "$1" == -* ]]; do [[ "$1" != --kill-on-bad-exit=1 ]] || kill_on_bad_exit=1; shift; done
status=0; killed=0
for ((i = 0; i < SLURM_NTASKS; i++)); do
  if ((killed)); then s=137; else SLURM_PROCID=$i "$@"; s=$?; fi
  ((s == 0 || !kill_on_bad_exit)) || killed=1
  ((s <= status)) || status=$s
done
exit $status
"""
# medbench_jax.main, exiting with $FAKE_STATUS.
FAKE_MAIN = 'echo "task $SLURM_PROCID: $*" >> "$FAKE_LOG"; exit "$FAKE_STATUS"\n'


def _sbatch(tmp_path, tasks: int, status: int) -> tuple[subprocess.CompletedProcess, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in {"srun": FAKE_SRUN, "main": FAKE_MAIN,
                     "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"\n'}.items():
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.txt"
  log.touch()
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "main",
         "FAKE_LOG": str(log), "FAKE_STATUS": str(status), "TMPDIR": str(tmp_path),
         "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_NTASKS": str(tasks)}
  out = subprocess.run(["bash", str(helpers.REPO / "launch" / "slurm_multinode.sbatch"),
                        "--workdir=/w"], capture_output=True, text=True, env=env, timeout=60)
  return out, log.read_text()


@pytest.mark.parametrize("tasks", [2, 1])
def test_slurm_script_requeues_a_preempted_run_and_does_not_fail(tmp_path, tasks):
  """Every task exits with 75: each one counts as a success for srun (no task is killed
  while it exits), the job is requeued and the script ends with 0."""
  out, calls = _sbatch(tmp_path, tasks, 75)
  assert out.returncode == 0, out.stderr
  assert calls.splitlines()[:tasks] == [
      f"task {i}: -m medbench_jax.main --workdir=/w" + (" --multiprocess" if tasks > 1 else "")
      for i in range(tasks)]
  assert calls.splitlines()[tasks:] == ["scontrol requeue 77"]
  assert "requeueing job 77 to resume" in out.stderr
  assert not list(tmp_path.glob("medbench_preempted_*"))  # the marks are cleaned up


@pytest.mark.parametrize("status", [0, 1])
def test_slurm_script_neither_requeues_a_finished_nor_a_failed_run(tmp_path, status):
  out, calls = _sbatch(tmp_path, 2, status)
  assert "scontrol" not in calls
  assert (out.returncode == 0) == (status == 0)


def test_slurm_task_survives_the_signal_and_reports_the_preemption(tmp_path):
  """SLURM signals every process of a task: the wrapper shell outlives the signal, waits
  for main to save and exit with 75, and then reports it."""
  out = subprocess.run(["bash", str(helpers.REPO / "launch" / "slurm_multinode.sbatch"),
                        "--workdir=/w"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "77",
                            "SLURM_JOB_NODELIST": "gpu1", "SLURM_NTASKS": "1"})
  wrapper = shlex.split(out.stdout)[1:4]  # bash -c SCRIPT
  main = "trap 'sleep 1; exit 75' TERM; echo ready; while :; do sleep 0.1; done"
  task = subprocess.Popen([*wrapper, "medbench_task", str(tmp_path), "bash", "-c", main],
                          stdout=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, "SLURM_PROCID": "3"})
  assert task.stdout.readline() == "ready\n"
  os.killpg(task.pid, signal.SIGTERM)
  assert task.wait(timeout=30) == 0
  assert (tmp_path / "task_3").is_file()


# ---------------------------------------------------------------- another process count


def test_resuming_with_another_process_count_stops_naming_both_counts(tmp_path):
  """A `latest` checkpoint saved by 2 processes (grain's data/process_I-of-2.json, made
  here from a 1-process save) is refused before anything is restored."""
  from etils import epath
  import grain
  import numpy as np

  from medbench_jax.trainer import checkpoints
  trial = tmp_path / "trial_0"
  ckpt = checkpoints.Checkpoints(epath.Path(trial / "ckpt"))
  iterator = iter(grain.MapDataset.range(16).batch(4).to_iter_dataset())
  ckpt.save_latest(4, {"w": np.ones(8, np.float32)}, iterator, {"step": 4})
  ckpt.close()
  folder = trial / "ckpt" / "latest" / "4"
  saved = folder / "data" / "process_0-of-1.json"
  for i in range(2):
    (folder / "data" / f"process_{i}-of-2.json").write_bytes(saved.read_bytes())
  saved.unlink()
  checkpoints.write_manifest(epath.Path(folder))
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.Checkpoints(epath.Path(trial / "ckpt")).restore_latest(None, None)
  assert (f"Checkpoint {folder} was saved by 2 process(es), and this run has 1"
          in str(error.value))
  assert f"Resume with 2 process(es), or delete {trial}" in str(error.value)
