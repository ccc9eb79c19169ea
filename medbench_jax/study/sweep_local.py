"""Runs a sweep on this machine: points one after another, or several at once on
disjoint devices (`--parallel=N`).

Each point runs `python -m medbench_jax.main` in its own process (its own session, so a
Ctrl-C in the terminal reaches the runner only), with output appended to WORKDIR/log.txt
and its state in WORKDIR/status.json. A point starts once every point it depends on has
finished; one whose dependency failed (or is blocked) is marked blocked with the reason.
SIGTERM or Ctrl-C stops the sweep: running points get SIGTERM, save their state and exit
with status 75 (preempted); a second signal kills them. Rerunning the same command skips
finished points and resumes the others.

Devices for `--parallel=N` (the visible devices split into N equal groups):
  GPU  CUDA_VISIBLE_DEVICES per run;
  TPU  TPU_VISIBLE_CHIPS (and the bounds and ports a process on part of a TPU VM needs);
  CPU  XLA's simulated devices (--xla_force_host_platform_device_count) split the same
       way, and the CPU cores split between the runs (affinity).
Child processes share main's persistent JAX compilation cache (under MEDBENCH_CACHE,
default ~/.cache/medbench_jax/xla), so a model compiles once per sweep.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import dataclasses
import datetime
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from etils import epath

from medbench_jax.study import sweep as sweep_lib

_XLA_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
# TPU_CHIPS_PER_PROCESS_BOUNDS for a process holding part of a TPU VM's chips.
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}
_TPU_FIRST_PORT = 8476
_POLL_S = 0.5


# ---------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one of the parallel runs goes: environment, CPU cores, a description."""
  env: dict[str, str]
  cores: tuple[int, ...] = ()
  description: str = "all devices"


def _split(items: Sequence[Any], parts: int, what: str) -> list[list[Any]]:
  if len(items) < parts:
    raise ValueError(f"--parallel={parts} needs at least {parts} {what}; found {len(items)}")
  size = len(items) // parts
  return [list(items[i * size:(i + 1) * size]) for i in range(parts)]


def _gpu_ids(environ: Mapping[str, str]) -> list[str]:
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def _tpu_chips() -> list[str]:
  accel = sorted(glob.glob("/dev/accel[0-9]*"), key=lambda p: int(re.sub(r"\D", "", p)))
  vfio = sorted(glob.glob("/dev/vfio/[0-9]*"), key=lambda p: int(os.path.basename(p)))
  return [str(i) for i in range(len(accel or vfio))]


def detect_platform(environ: Mapping[str, str] = os.environ) -> str:
  """gpu, tpu or cpu: what this machine's runs will use."""
  if _gpu_ids(environ):
    return "gpu"
  if _tpu_chips():
    return "tpu"
  return "cpu"


def device_slots(parallel: int, platform: str = "auto",
                 environ: Mapping[str, str] = os.environ) -> list[Slot]:
  """`parallel` slots on disjoint devices of `platform` (auto: detected)."""
  if parallel < 1:
    raise ValueError(f"--parallel={parallel} must be at least 1")
  if parallel == 1:
    return [Slot({})]
  platform = detect_platform(environ) if platform == "auto" else platform
  slots = []
  if platform == "gpu":
    for ids in _split(_gpu_ids(environ), parallel, "GPUs"):
      slots.append(Slot({"CUDA_VISIBLE_DEVICES": ",".join(ids)},
                        description=f"GPU {','.join(ids)}"))
  elif platform == "tpu":
    for i, chips in enumerate(_split(_tpu_chips(), parallel, "TPU chips")):
      if len(chips) not in _TPU_BOUNDS:
        raise ValueError(f"--parallel={parallel} gives {len(chips)} TPU chips per run; "
                         f"a process can hold {sorted(_TPU_BOUNDS)} chips of a TPU VM")
      port = str(_TPU_FIRST_PORT + i)
      visible = ",".join(chips)
      slots.append(Slot({
          "TPU_VISIBLE_CHIPS": visible, "TPU_VISIBLE_DEVICES": visible,
          "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[len(chips)],
          "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": port,
          "TPU_PROCESS_ADDRESSES": f"localhost:{port}", "CLOUD_TPU_TASK_ID": "0",
          "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
          "TPU_MESH_CONTROLLER_PORT": port}, description=f"TPU chips {visible}"))
  elif platform == "cpu":
    # Simulated devices are not shared between processes; the cores are.
    flags = environ.get("XLA_FLAGS", "")
    match = _XLA_DEVICES.search(flags)
    per_run = max(1, (int(match.group(1)) if match else 1) // parallel)
    other_flags = _XLA_DEVICES.sub("", flags).strip()
    cores = sorted(os.sched_getaffinity(0))
    core_groups = (_split(cores, parallel, "cores") if len(cores) >= parallel
                   else [cores] * parallel)
    for own_cores in core_groups:
      slots.append(Slot(
          {"XLA_FLAGS": f"{other_flags} --xla_force_host_platform_device_count={per_run}"
                        .strip()},
          cores=tuple(own_cores),
          description=f"{per_run} CPU device(s), cores {','.join(map(str, own_cores))}"))
  else:
    raise ValueError(f"Unknown platform {platform!r}; allowed: auto, gpu, tpu, cpu")
  return slots


def child_env(slot_env: Mapping[str, str], environ: Mapping[str, str] = os.environ
              ) -> dict[str, str]:
  """The environment of a point's process: ours, the slot's devices, unbuffered output
  (the log shows progress as it happens)."""
  env = dict(environ)
  env["PYTHONUNBUFFERED"] = "1"
  env.update(slot_env)
  return env


# ---------------------------------------------------------------------- one attempt


def main_command(point: sweep_lib.PlannedPoint) -> list[str]:
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


def run(plan: sweep_lib.Plan, slots: Sequence[Slot], *,
        command: Callable[[sweep_lib.PlannedPoint], list[str]] = main_command,
        environ: Mapping[str, str] = os.environ,
        out: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, str]:
  """Runs every unfinished point of `plan`, at most len(slots) at once; returns the
  outcome per point name (done, failed, blocked, preempted, or new if never started)."""
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
          running[free[0]] = Attempt(point, command(point), child_env(slot.env, environ),
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
