"""Runs a sweep on this machine: points one after another, or several at once on
disjoint devices (`--parallel=N`).

Each point runs `python -m medbench_jax.main` in its own process (its own session, so a
Ctrl-C in the terminal reaches the runner only), with output appended to WORKDIR/log.txt
and its state in WORKDIR/status.json. A point starts once every point it depends on has
finished; one whose dependency failed (or is blocked) is marked blocked with the reason.
SIGTERM or Ctrl-C stops the sweep: running points get SIGTERM, save their state and exit
with status 75 (preempted); a second signal kills them. Rerunning the same command skips
finished points and resumes the others.

Where points run is medbench_jax/study/slots.py's: one per GPU or TPU chip of this
machine by default (`--devices_per_point=K` for more each, `--parallel=N` at most N at
once), one at a time on the CPU unless `--parallel=N` splits its cores.
Child processes share main's persistent JAX compilation cache (under MEDBENCH_CACHE,
default ~/.cache/medbench_jax/xla), so a model compiles once per sweep.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import datetime
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from etils import epath

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep as sweep_lib

_POLL_S = 0.5


def child_env(slot_env: Mapping[str, str], environ: Mapping[str, str] = os.environ
              ) -> dict[str, str]:
  """The environment of a point's process: ours, the slot's devices, unbuffered output
  (the log shows progress as it happens)."""
  env = dict(environ)
  env["PYTHONUNBUFFERED"] = "1"
  env.update(slot_env)
  return env


# ---------------------------------------------------------------------- one attempt


def main_command(point: sweep_lib.PlannedPoint, slot: slots_lib.Slot | None = None) -> list[str]:
  """medbench_jax.main for `point` in this Python (the slot's devices are in its env)."""
  del slot
  return [sys.executable, "-m", "medbench_jax.main", *point.main_args()]


class Attempt:
  """One run of a point's command: its process, its log (WORKDIR/log.txt, appended) and
  status.json."""

  def __init__(self, point: sweep_lib.PlannedPoint, command: Sequence[str],
               env: Mapping[str, str], *, cwd: str | None = None, cores: Sequence[int] = (),
               preexec: Callable[[], None] | None = None,
               status_fields: Mapping[str, Any] | None = None):
    self.point = point
    self.start = time.monotonic()
    workdir = point.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # A workdir in a bucket gets the log when the attempt ends.
    self._bucket_log = workdir / sweep_lib.LOG_FILE if "://" in str(workdir) else None
    self._log = (tempfile.NamedTemporaryFile(prefix="medbench_log_", delete=False)
                 if self._bucket_log else open(workdir / sweep_lib.LOG_FILE, "ab"))
    now = datetime.datetime.now().isoformat(timespec="seconds")
    self._log.write(f"\n===== {now}: {shlex.join(command)}\n".encode())
    self._log.flush()

    def prepare_child() -> None:
      if cores:
        os.sched_setaffinity(0, cores)
      if preexec:
        preexec()

    self.process = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
        list(command), stdout=self._log, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
        start_new_session=True, preexec_fn=prepare_child if cores or preexec else None)
    self._fields = dict(status_fields or {})  # where it ran: kept in every later status
    sweep_lib.write_status(workdir, sweep_lib.RUNNING, pid=self.process.pid,
                           command=list(command), **self._fields)

  def poll(self) -> int | None:
    return self.process.poll()

  def signal(self, signum: int) -> None:
    """SIGTERM reaches the run itself (its data workers stop with it); SIGKILL its group."""
    with contextlib.suppress(ProcessLookupError):
      if signum == signal.SIGKILL:
        os.killpg(self.process.pid, signum)
      else:
        self.process.send_signal(signum)

  def finish(self, returncode: int) -> str:
    """Records the outcome in status.json: done, preempted or failed (with the log's tail)."""
    from medbench_jax import runtime
    self._log.close()
    if self._bucket_log:
      earlier = self._bucket_log.read_bytes() if self._bucket_log.exists() else b""
      with open(self._log.name, "rb") as f:
        self._bucket_log.write_bytes(earlier + f.read())
      os.remove(self._log.name)
    wall_s = round(time.monotonic() - self.start, 1)
    workdir = self.point.workdir
    if returncode == 0 and (workdir / "results.json").exists():
      sweep_lib.write_status(workdir, sweep_lib.DONE, wall_s=wall_s, **self._fields)
      return sweep_lib.DONE
    if returncode == runtime.EXIT_PREEMPTED:
      sweep_lib.write_status(workdir, sweep_lib.PREEMPTED,
                             "stopped by a signal after saving its state; rerun the sweep "
                             "to resume", wall_s=wall_s, **self._fields)
      return sweep_lib.PREEMPTED
    reason = sweep_lib.failure_reason(returncode, workdir)
    if returncode == 0:
      reason = "exited without writing results.json; " + reason
    sweep_lib.write_status(workdir, sweep_lib.FAILED, reason, returncode=returncode,
                           wall_s=wall_s, **self._fields)
    return sweep_lib.FAILED


# ---------------------------------------------------------------------- the sweep


class _Stop:
  """SIGTERM/SIGINT while the sweep runs: first stop cleanly, then kill."""

  def __init__(self, running: dict[int, Attempt]):
    self.running = running
    self.signals = 0

  def __call__(self, signum, frame) -> None:
    del frame
    self.signals += 1
    forward = signal.SIGTERM if self.signals == 1 else signal.SIGKILL
    print(f"{signal.Signals(signum).name}: sending {forward.name} to {len(self.running)} "
          "running point(s); rerun the same command to resume.", flush=True)
    for attempt in self.running.values():
      attempt.signal(forward)

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def run(plan: sweep_lib.Plan, slots: Sequence[slots_lib.Slot], *,
        command: Callable[[sweep_lib.PlannedPoint, slots_lib.Slot], list[str]] = main_command,
        environ: Mapping[str, str] = os.environ,
        out: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, str]:
  """Runs every unfinished point of `plan`, at most len(slots) at once, each with the
  command `command(point, slot)`; returns the outcome per point name (done, failed,
  blocked, preempted, or new if never started). A slot on a remote host (slot.worker)
  keeps its environment for the remote process: the command carries it there."""
  outcome: dict[str, str] = {}
  pending = []
  for point in plan.points:
    if sweep_lib.workdir_state(point.workdir) == sweep_lib.DONE:
      outcome[point.name] = sweep_lib.DONE
    else:
      pending.append(point)
  out(f"{len(plan.points)} points: {len(plan.points) - len(pending)} done, "
      f"{len(pending)} to run on {len(slots)} slot(s).")
  total, started = len(pending), 0
  running: dict[int, Attempt] = {}
  stop = _Stop(running)
  with stop.installed():
    while pending or running:
      for point in [] if stop.signals else list(pending):  # stopping: start nothing new
        free = [i for i in range(len(slots)) if i not in running]
        if not free:
          break
        reason = sweep_lib.blocked_reason(point, outcome)
        if reason:
          sweep_lib.write_status(point.workdir, sweep_lib.BLOCKED, reason)
          outcome[point.name] = sweep_lib.BLOCKED
          pending.remove(point)
          out(f"blocked  {point.name}: {reason}")
        elif all(outcome.get(d) == sweep_lib.DONE for d in point.depends_on):
          slot = slots[free[0]]
          started += 1
          env = child_env(slot.env if slot.worker is None else {}, environ)
          running[free[0]] = Attempt(point, command(point, slot), env,
                                     cores=slot.cores, status_fields={"slot": slot.description})
          pending.remove(point)
          out(f"[{started}/{total}] started {point.name} ({slot.description}); log: "
              f"{point.workdir / sweep_lib.LOG_FILE}")
      if stop.signals and not running:
        break
      time.sleep(_POLL_S)
      for index, attempt in list(running.items()):
        returncode = attempt.poll()
        if returncode is not None:
          del running[index]
          state = outcome[attempt.point.name] = attempt.finish(returncode)
          detail = "" if state == sweep_lib.DONE else ": " + sweep_lib.first_line(
              (sweep_lib.read_status(attempt.point.workdir) or {}).get("reason", ""))
          out(f"{state:<8} {attempt.point.name} after "
              f"{time.monotonic() - attempt.start:.0f} s{detail}")
  for point in pending:
    outcome.setdefault(point.name, sweep_lib.workdir_state(point.workdir))
  return outcome


def summary(outcome: Mapping[str, str]) -> str:
  counts = collections.Counter(outcome.values())
  return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


@contextlib.contextmanager
def root_lock(root: epath.Path) -> Iterator[None]:
  """One runner per sweep root at a time (two would start the same points twice)."""
  import fcntl
  root.mkdir(parents=True, exist_ok=True)
  with open(root / ".sweep.lock", "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise RuntimeError(f"Another sweep runner is working on {root}; wait for it or stop "
                         "it first.") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
