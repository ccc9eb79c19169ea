"""Entry point: `python -m medbench_jax.main --config=configs/swin.py --workdir=DIR`.

flags -> process start-up (runtime) -> config checks -> the data set is prepared on every
host (or once, into a shared data_dir: --shared_data_dir) -> the trainer runs every trial
of the task the data set names. --workdir may be a local folder or a bucket (gs://...).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from medbench_jax import config_checks
from medbench_jax import paths
from medbench_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin.py", "Config file, optionally with an arg: FILE:ARG.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, TensorBoard, results.json): a local folder "
    "or a bucket URL (gs://BUCKET/PATH). "
    "Default: workdirs/<config file name>[_<arg>].")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs started by hand; on TPU pods and "
    "SLURM, jax.distributed finds it itself (use --multiprocess).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_MULTIPROCESS = flags.DEFINE_bool(
    "multiprocess", False, "Call jax.distributed.initialize() with auto-detection.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", runtime.HEARTBEAT_TIMEOUT_S,
    "Multi-process runs: seconds without heartbeats after which a process counts as lost; "
    "the others then stop instead of waiting in a collective.")
_SHARED_DATA_DIR = flags.DEFINE_bool(
    "shared_data_dir", False,
    "Multi-process runs: config.dataset.data_dir is one folder that every host sees (a "
    "shared file system); the lead process prepares the data set there once. Default: "
    "each host prepares its own copy in its own (host-local) data_dir.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", paths.COMPILATION_CACHE_DIR,
    "JAX's persistent compilation cache folder; '' turns it off.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.start(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value, multiprocess=_MULTIPROCESS.value,
                compilation_cache_dir=_COMPILATION_CACHE.value,
                heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)

  from medbench_jax.data import sources
  from medbench_jax.trainer import run
  config = _CONFIG.value
  config_checks.validate(config)
  workdir = _WORKDIR.value or paths.default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  logging.info("Workdir: %s", workdir)
  if (paths.as_path(workdir) / "results.json").exists():
    runtime.barrier("dataset_prepared")  # finished: trials.py prints its results
  else:
    sources.prepare_for_run(config.dataset, shared=_SHARED_DATA_DIR.value,
                            barrier="dataset_prepared")
  runtime.watch_for_preemption()
  try:
    run.train_and_evaluate(config, workdir)
  except runtime.Preempted as e:
    logging.warning("Preempted at step %s; state saved in %s. Rerun the same command to "
                    "resume.", e, workdir)
    runtime.stop()
    sys.exit(runtime.EXIT_PREEMPTED)
  runtime.stop()


if __name__ == "__main__":
  app.run(main)
