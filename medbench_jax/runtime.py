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
"""

from __future__ import annotations

import gc
import importlib.util
import logging as py_logging
import os
import signal

from absl import logging
import jax

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

_preemption_signal: str | None = None

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
  if coordinator_address:
    # Collectives between CPU processes (simulated multi-host runs); GPUs/TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  elif multiprocess:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  log_backend()
  if jax.process_count() > 1:
    logging.info("Process %d of %d: if another process is lost, this one stops within "
                 "%d s; rerun every process to resume from the last checkpoint.",
                 jax.process_index(), jax.process_count(), heartbeat_timeout_s)


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


def watch_for_preemption() -> None:
  """SIGTERM (what TPU and SLURM preemption send) and SIGINT make the training loop save
  and stop at its next step boundary. In a multi-process run jax.distributed's preemption
  service catches SIGTERM and agrees on the step with every process."""
  global _preemption_signal
  _preemption_signal = None
  signal.signal(signal.SIGTERM, _on_signal)
  signal.signal(signal.SIGINT, _on_signal)


def preemption_requested(step: int) -> bool:
  """Whether to save and stop after `step` (every process gets the same answer)."""
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    return ocp.multihost.reached_preemption(step)
  return _preemption_signal is not None
