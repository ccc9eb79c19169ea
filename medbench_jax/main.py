"""Entry point: `python -m medbench_jax.main --config=configs/swin.py --workdir=DIR`."""

import logging as py_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin.py", "Config file, optionally with an arg: FILE:ARG.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, TensorBoard, results.json). "
    "Default: workdirs/<config file name>[_<arg>].")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs started by hand; on TPU pods and "
    "SLURM, jax.distributed finds it itself (use --multiprocess).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() with auto-detection.")


def default_workdir(config_arg: str) -> str:
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  suffix = "".join(c if c.isalnum() or c in "-_." else "_" for c in arg)
  return os.path.join("workdirs", name + (f"_{suffix}" if suffix else ""))


class _QuietLibraries(py_logging.Filter):
  """Keeps the run's own progress readable: libraries' INFO chatter is dropped."""
  _LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/jax/", "/clu/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or
            not any(lib in record.pathname for lib in self._LIBRARIES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TF is only here for TFDS and the TensorBoard writer: it must not take accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    # Collectives between CPU processes (simulated multi-host runs); GPUs/TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIPROCESS.value:
    jax.distributed.initialize()

  from medbench_jax import train  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  logging.info("Workdir: %s", workdir)
  train.train_and_evaluate(_CONFIG.value, workdir)
  if _COORDINATOR.value or _MULTIPROCESS.value:
    # Leave together: process 0 hosts the coordination service, and a process that finds
    # it gone before its own shutdown aborts.
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
