"""Multi-process runs over 127.0.0.1 (jax.distributed, gloo collectives between CPU
processes): preemption of every process, by hand and through launch/local_multiprocess.sh;
the SLURM script's handling of a preempted run, with stand-ins for srun and scontrol."""

import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import helpers

# 3 epochs of 6 steps; evaluations and `latest` checkpoints every 4 steps.
TINY = f"--config={helpers.TINY}:epochs=3"
SAVED = r"preempted: state saved at step (\d+)"
RUN_TIMEOUT_S = 600


class Output:
  """The output of a running process, read line by line on a thread."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.lines, self._queue = proc, [], queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  @property
  def text(self) -> str:
    return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while (line := self._queue.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
      self.lines.append(line)
      if re.search(pattern, line):
        return
    raise AssertionError(f"ended without {pattern!r}:\n{self.text[-4000:]}")

  def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while (line := self._queue.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
      self.lines.append(line)
    return self.proc.wait(timeout=60)


def _two_processes(workdir, phantom_dir) -> list[Output]:
  address = f"--coordinator_address=127.0.0.1:{helpers.free_port()}"
  return [Output(helpers.main(workdir, phantom_dir, TINY, address, "--num_processes=2",
                              f"--process_id={i}", devices=2, wait=False))
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
  assert statuses == [75, 75], [run.text[-3000:] for run in runs]
  step = _saved_step([run.text for run in runs], workdir)

  reruns = _two_processes(workdir, phantom_dir)
  for rerun in reruns:
    assert rerun.finish() == 0, rerun.text[-4000:]
    assert f"Resuming trial 0 from step {step} " in rerun.text
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
