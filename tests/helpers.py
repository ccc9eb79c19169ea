"""Helpers shared by the test files: the repository root, the tests' tiny configs, and the
ways tests start runs of the command lines."""

import os
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.py"
TINY_SEGMENTATION = "tests/configs/tiny_segmentation.py"


def load_tiny(arg: str | None = None, manual_dir: str | os.PathLike | None = None,
              ) -> ml_collections.ConfigDict:
  """The tests' tiny classification config (tests/configs/tiny.py) for `arg`; with
  `manual_dir`, on the phantom set there."""
  from tests.configs import tiny
  config = tiny.get_config(arg or None)
  if manual_dir is not None:
    config.dataset.manual_dir = str(manual_dir)
  return config


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a command line a test starts: `devices` simulated CPU devices,
  unbuffered output, the package importable from the repository."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **extra)


def run_module(module: str, *args: str, devices: int = 1, wait: bool = True,
               timeout: float = 1200) -> str | subprocess.Popen:
  """`python -m module args` from the repository root as a user runs it: its output
  (stdout and stderr) once it succeeded, or the running process (wait=False)."""
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                          env=subprocess_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def main(workdir: os.PathLike, phantom_dir: os.PathLike, config: str, *extra: str,
         devices: int = 1, wait: bool = True) -> str | subprocess.Popen:
  """`python -m medbench_jax.main` of `config` (a --config= flag) on the phantom set."""
  return run_module("medbench_jax.main", config, f"--workdir={workdir}",
                    f"--config.dataset.manual_dir={phantom_dir}", *extra, devices=devices,
                    wait=wait)


def free_port() -> int:
  """A TCP port of 127.0.0.1 nobody listens on (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def scalars(event_dir: os.PathLike, tag: str) -> list[float]:
  """The values of a TensorBoard scalar a run wrote, in step order."""
  import tensorflow as tf
  values = {}
  for path in pathlib.Path(event_dir).glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tf.make_ndarray(v.tensor))
  return [values[k] for k in sorted(values)]


def tags(event_dir: os.PathLike) -> set[str]:
  """Every tag (scalars, images, ...) a run wrote to TensorBoard."""
  import tensorflow as tf
  return {v.tag for path in pathlib.Path(event_dir).glob("events.out.tfevents.*")
          for event in tf.compat.v1.train.summary_iterator(str(path))
          for v in event.summary.value}


class ProcessOutput:
  """The output of a running process (stdout with stderr merged), read line by line on a
  thread, so that a test can wait for a line while the process goes on."""

  def __init__(self, proc: subprocess.Popen, wait_timeout: float = 600,
               finish_timeout: float = 1800):
    self.proc, self.lines, self._queue = proc, [], queue.Queue()
    self.wait_timeout, self.finish_timeout = wait_timeout, finish_timeout
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float | None = None) -> re.Match:
    """Reads output until a line matches `pattern`; fails if the process ends first."""
    deadline = time.monotonic() + (timeout or self.wait_timeout)
    while True:
      line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.1))
      assert line is not None, f"ended without {pattern!r}:\n{self.output[-4000:]}"
      self.lines.append(line)
      match = re.search(pattern, line)
      if match:
        return match

  def finish(self, timeout: float | None = None) -> int:
    """Waits for the end of the process; its exit status."""
    deadline = time.monotonic() + (timeout or self.finish_timeout)
    while (line := self._queue.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
      self.lines.append(line)
    return self.proc.wait(timeout=60)
