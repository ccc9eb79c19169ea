"""Process start-up and coordination, shared by every entry point.

`start()` checks that the platforms JAX_PLATFORMS names have their plugins installed,
keeps TensorFlow (there only for TFDS and TensorBoard writers) off the accelerators,
quietens libraries' INFO chatter, joins a multi-process run and logs the backend and its
devices first thing;
`is_lead()` picks the process that writes shared files; `barrier(name)` waits for
all processes on the coordination service (not a device collective, whose timeout
is far shorter than, say, preparing a data set).

A process of a multi-process run that loses another (killed, preempted, its host
gone) does not wait in a collective forever: JAX's coordination service declares a
process dead after `heartbeat_timeout_s` without heartbeats (HEARTBEAT_TIMEOUT_S by
default) and then ends every other process ("Terminating process because the JAX
distributed service detected fatal errors ... another task died"); losing process 0,
which hosts the service, ends them at once. A process that fails with an error waits
at most SHUTDOWN_TIMEOUT_S for the others at exit. Rerunning every process resumes
from the last checkpoint.

Preemption (`watch_for_preemption`, `preemption_requested`): SIGTERM, what TPU and SLURM
preemption send, and SIGINT (Ctrl-C) make the training loop save and stop at a step
boundary. In a multi-process run that step must be the same for every process, whichever
process got the signal and whenever: JAX's preemption service (installed by
jax.distributed.initialize) catches SIGTERM, tells every process, and they agree on the
next check that none has passed yet. SIGINT is handed to it as a SIGTERM.
"""

from __future__ import annotations

from collections.abc import Callable
import gc
import importlib.util
import logging as py_logging
import os
import re
import signal

from absl import logging
import jax
import numpy as np

# How long processes wait at a barrier for the others (data preparation is the longest).
BARRIER_TIMEOUT_S = 24 * 3600
# Seconds without heartbeats after which a process of a multi-process run counts as
# dead (JAX's default: 100); main's --heartbeat_timeout.
HEARTBEAT_TIMEOUT_S = 60
# Seconds a process leaving a multi-process run waits for the others (JAX's: 300).
SHUTDOWN_TIMEOUT_S = 60
# Exit status of a run that was preempted after saving its state (EX_TEMPFAIL: run the
# same command again to resume). The sweep runner reads it as "resumable".
EXIT_PREEMPTED = 75

# The longest answer (bytes) lead_decides hands to the other processes.
_ANSWER_BYTES = 4096
_decisions = 0  # calls of lead_decides (each has a barrier of its own)
# The preemption signal this process received (single-process runs decide by it).
_preemption_signal: str | None = None
# Calls of preemption_requested so far: the counter on which the processes of a
# multi-process run agree (the same sequence of checks in each, across trials too).
_preemption_checks = 0

# Accelerator platforms (JAX_PLATFORMS names) -> the modules of their PJRT plugins (any one
# will do) and how to install them at the pins of requirements.txt.
ACCELERATOR_PLUGINS = {
    "cuda": (("jax_cuda12_plugin", "jax_cuda13_plugin"),
             "pip install -r requirements-cuda12.txt (or pip install -e '.[cuda12]')"),
    "tpu": (("libtpu",), "pip install -r requirements-tpu.txt (or pip install -e '.[tpu]')"),
    "rocm": (("jax_rocm7_plugin",), "pip install 'jax[rocm7-local]' at the jax pin of "
             "requirements.txt"),
}
# Device files of accelerators that JAX without their plugin would leave idle.
_ACCELERATOR_DEVICE_FILES = {"cuda": "/dev/nvidia0", "tpu": "/dev/accel0"}


class Preempted(Exception):
  """Raised at a step boundary after the state was saved because SIGTERM/SIGINT came."""


class _QuietLibraries(py_logging.Filter):
  """Keeps the run's own progress readable: libraries' INFO chatter is dropped."""
  _LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/jax/", "/clu/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or
            not any(lib in record.pathname for lib in self._LIBRARIES))


def check_platforms(platforms: str | None = None) -> None:
  """Fails, naming the install command, when `platforms` (JAX_PLATFORMS by default, a
  comma-separated list) names an accelerator whose JAX plugin is not installed: without it
  JAX would fail with an unhelpful error, or run on the CPU."""
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
  for platform in filter(None, (p.strip().lower() for p in platforms.split(","))):
    if platform == "gpu":
      platform = "cuda"
    if platform not in ACCELERATOR_PLUGINS:
      continue
    modules, install = ACCELERATOR_PLUGINS[platform]
    if not any(importlib.util.find_spec(m) for m in modules):
      raise RuntimeError(
          f"JAX_PLATFORMS={platforms} asks for {platform}, but JAX's {platform} plugin is not "
          f"installed (none of {', '.join(modules)}): {install}. Unset JAX_PLATFORMS (or set "
          "it to cpu) to run on the CPU.")


def log_backend() -> None:
  """The first log lines of a run: the backend and how many devices it computes on."""
  try:
    devices = jax.devices()
  except RuntimeError as e:
    raise RuntimeError(f"JAX found no usable backend (JAX_PLATFORMS="
                       f"{os.environ.get('JAX_PLATFORMS', '')!r}): {e}") from e
  backend = jax.default_backend()
  logging.info("JAX backend: %s (%s), %d local device(s), %d global device(s), process %d "
               "of %d.", backend, devices[0].device_kind, jax.local_device_count(),
               jax.device_count(), jax.process_index(), jax.process_count())
  if backend == "cpu":
    for platform, device_file in _ACCELERATOR_DEVICE_FILES.items():
      if os.path.exists(device_file):
        logging.warning("This host has %s (%s) but JAX runs on the CPU: %s, or set "
                        "JAX_PLATFORMS=%s to make this an error.", platform, device_file,
                        ACCELERATOR_PLUGINS[platform][1], platform)


def keep_tensorflow_off_accelerators() -> None:
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")


def start(*, coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, multiprocess: bool = False,
          compilation_cache_dir: str = "",
          heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """Prepares this process; joins a multi-process run when asked to.

  coordinator_address (+ num_processes, process_id): processes started by hand, e.g. over
  loopback; multiprocess: TPU pods and SLURM, where jax.distributed finds the rest itself.
  compilation_cache_dir: JAX's persistent compilation cache ("" = off), so a second run of
  the same model and shapes skips most of the compilation. heartbeat_timeout_s: how soon
  the loss of another process ends this one (module docstring).
  """
  check_platforms()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  keep_tensorflow_off_accelerators()
  use_compilation_cache(compilation_cache_dir)
  if coordinator_address or multiprocess:
    join(coordinator_address, num_processes, process_id, heartbeat_timeout_s)
  log_backend()
  if jax.process_count() > 1:
    logging.info("Process %d of %d: if another process is lost, this one stops within "
                 "%d s; rerun every process to resume from the last checkpoint.",
                 jax.process_index(), jax.process_count(), heartbeat_timeout_s)


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S
         ) -> None:
  """Joins a multi-process run: the given coordinator (processes started by hand, e.g.
  over loopback), or the one jax.distributed finds itself (TPU pods, SLURM)."""
  if coordinator_address:
    # Collectives between CPU processes (simulated multi-host runs); GPUs/TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  local_device_ids = slurm_node_device_ids()
  if local_device_ids is not None:
    logging.info("SLURM: this process is the only task on its node: it uses the node's %d "
                 "GPU(s).", len(local_device_ids))
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)


def _tasks_on_this_node() -> int | None:
  """How many tasks of this SLURM job step run on this node (None outside SLURM).

  SLURM_STEP_TASKS_PER_NODE reads e.g. "2(x3),1": 2 tasks on each of the first three
  nodes, 1 on the fourth; SLURM_NODEID is this node's position.
  """
  if "SLURM_LOCALID" not in os.environ:
    return None
  counts = []
  for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE",
                             os.environ.get("SLURM_TASKS_PER_NODE", "")).split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match:
      counts += [int(match[1])] * int(match[2] or 1)
  node = int(os.environ.get("SLURM_NODEID", "0"))
  if node < len(counts):
    return counts[node]
  per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
  return int(per_node) if per_node.isdigit() else None


def slurm_node_device_ids() -> list[int] | None:
  """The local GPU ids of a process that runs alone on its SLURM node: all of the node's
  (those SLURM gave the job); None otherwise (JAX decides).

  jax.distributed.initialize otherwise gives a SLURM task only the GPU of its local
  rank (SLURM_LOCALID), which suits one task per GPU but leaves all but one GPU of the
  node idle when one task drives the whole node.
  """
  if _tasks_on_this_node() != 1:
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
  count = len([d for d in visible.split(",") if d.strip()]) if visible else 0
  if not count and os.environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
    count = int(os.environ["SLURM_GPUS_ON_NODE"])
  # Ids count the devices CUDA shows this process (SLURM renumbers them from 0).
  return list(range(count)) if count else None


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` ("" = leave it off): a later run of
  the same program on the same backend loads its executable instead of compiling it."""
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)


def freeze_heap() -> None:
  """Collects garbage once, then hides every object alive now from the collector until
  `thaw_heap()`: for tracing and compiling a first step.

  Tracing allocates objects fast enough to trigger full collections, and each walks
  everything imported (JAX, Flax, TensorFlow); with them frozen a cached first step
  starts about 20% sooner. Thawed afterwards, so that the run's own objects are
  collected as usual.
  """
  gc.collect()
  gc.freeze()


def thaw_heap() -> None:
  gc.unfreeze()


def stop() -> None:
  """Leaves a multi-process run together with the others.

  Process 0 hosts the coordination service: a process that finds it gone before its own
  shutdown aborts.
  """
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def is_lead() -> bool:
  """Whether this process writes the files all processes share (results, configs)."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process has reached the barrier `name` (no-op for one process)."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp
  ocp.multihost.get_barrier_sync_fn()(key=f"medbench_{name}", timeout_ms=int(timeout_s * 1000))


def lead_decides(name: str, decide: Callable[[], str]) -> str:
  """The lead process runs `decide()` alone; every process gets its answer.

  For checks that every process would otherwise repeat (reading the same files). The
  others wait on the coordination service (not a device collective, which would time
  out first), then receive the answer from the lead.
  """
  if jax.process_count() == 1:
    return decide()
  global _decisions
  _decisions += 1
  answer = decide() if is_lead() else ""
  barrier(f"{name}_{_decisions}")
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(answer.encode()[:_ANSWER_BYTES].ljust(_ANSWER_BYTES, b"\0"),
                          np.uint8)
  return bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b"\0").decode(
      errors="replace")


def _on_signal(signum, frame) -> None:
  del frame
  global _preemption_signal
  name = signal.Signals(signum).name
  if _preemption_signal == name == "SIGINT":
    raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
  _preemption_signal = name
  logging.warning("%s received: saving a checkpoint at the next step boundary, then "
                  "exiting with status %d (rerun the command to resume).", name,
                  EXIT_PREEMPTED)
  if _uses_preemption_service():
    # JAX's preemption notifier listens for SIGTERM only (a handler outside Python).
    signal.raise_signal(signal.SIGTERM)


def _uses_preemption_service() -> bool:
  """Whether the processes agree on the preemption step through JAX's preemption service
  (multi-process runs)."""
  return jax.process_count() > 1


def watch_for_preemption() -> None:
  """SIGTERM (what TPU and SLURM preemption send) and SIGINT make the training loop save
  and stop at a step boundary, the same in every process (module docstring).

  In a multi-process run SIGTERM stays with JAX's preemption notifier, which
  jax.distributed.initialize installed: replacing it would leave the other processes
  unaware of the signal, and this one waiting for them at its save.
  """
  global _preemption_signal, _preemption_checks
  _preemption_signal, _preemption_checks = None, 0
  if _uses_preemption_service():
    from jax.experimental import multihost_utils
    # Fails at once, naming jax_enable_preemption_service, when the service is off.
    multihost_utils.reached_preemption_sync_point(0)
  else:
    signal.signal(signal.SIGTERM, _on_signal)
  signal.signal(signal.SIGINT, _on_signal)


def preemption_requested() -> bool:
  """Whether to save and stop now: called once at every step boundary of training, by
  every process; every process gets the same answer at the same call."""
  global _preemption_checks
  _preemption_checks += 1
  if not _uses_preemption_service():
    return _preemption_signal is not None
  from jax.experimental import multihost_utils
  if not multihost_utils.reached_preemption_sync_point(_preemption_checks):
    return False
  logging.warning("Preemption notice (SIGTERM or SIGINT to one of the processes): every "
                  "process stops here, at check %d.", _preemption_checks)
  return True
