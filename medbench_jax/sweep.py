r"""Runs a sweep: one workdir per grid point, finished points skipped, the rest resumed.

  python -m medbench_jax.sweep --sweep=configs/sweeps/NAME.py[:ARG] --root=DIR \
      [--backend=local|slurm|tpu] [--devices_per_point=K] [--dry_run [--device_kind=KIND]]
  local:  [--parallel=N] [--platform=auto|gpu|tpu|cpu]
  slurm:  [--slurm=KEY=VALUE ...] (the allocation, nodes=2 gpus_per_node=8, and submitit
          parameters: slurm_partition=gpu, timeout_min=1440, slurm_array_parallelism=16)
  tpu:    --tpu=NAME --zone=ZONE [--project=PROJECT] [--tpu_type=v4-32] (a slice set up
          with launch/tpu.sh; without --tpu_type gcloud is asked for it)

A point runs on one device (GPU, TPU chip) unless --devices_per_point says more: a
machine, allocation or slice runs as many points at once as it has such slots
(medbench_jax/study/slots.py); on the CPU one at a time unless --parallel=N.

Loads the sweep file and every point's config first (a wrong key or value fails here,
naming the point), writes ROOT/sweep.json, then runs the points that are not done,
dependencies first. --dry_run prints the plan instead: point, workdir and state (done,
resumable, new, blocked), what the backend would submit, each point's slot (host,
devices; for TPU slots the environment of its process) and its expected cost in
device-hours with the sources of every figure (medbench_jax/study/planner.py; step
times from `python -m medbench_jax.bench train|eval` on --device_kind, default the
backend's). Run it from the repository root: config paths in sweep files are relative
to it. Afterwards: `python -m medbench_jax.report --runs=ROOT --out=REPORT`.

Exit status: 0 all points done; 75 stopped by SIGTERM/Ctrl-C (rerun to resume); 1 a
point failed or is blocked (its status.json says why; its log.txt has the output).
SLURM returns once the job arrays are queued.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import shlex
import sys

from absl import app
from absl import flags
import jax

from medbench_jax.study import sweep as sweep_lib

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, optionally with an arg: FILE:ARG.")
_ROOT = flags.DEFINE_string("root", None, "Folder of the sweep's workdirs (gs://... for tpu).")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm", "tpu"],
                             "Where the points run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan; run nothing.")
_DEVICES_PER_POINT = flags.DEFINE_integer(
    "devices_per_point", None, "Devices (GPUs, TPU chips) each point gets; default 1 (with "
    "only --parallel=N locally: the devices split into N groups).")
_PARALLEL = flags.DEFINE_integer(
    "parallel", None, "local: at most N points at once, on disjoint devices (CPU: cores); "
    "default: one per device (CPU: 1).")
_PLATFORM = flags.DEFINE_enum("platform", "auto", ["auto", "gpu", "tpu", "cpu"],
                              "local: devices to split for --parallel.")
_SLURM = flags.DEFINE_multi_string("slurm", [], "slurm: KEY=VALUE for submitit's "
                                   "update_parameters (repeat the flag).")
_SLURM_CLUSTER = flags.DEFINE_enum(
    "slurm_cluster", "slurm", ["slurm", "local", "debug"],
    "slurm: submitit executor; local/debug run the job arrays on this machine.")
_TPU = flags.DEFINE_string("tpu", None, "tpu: name of the TPU VM or pod slice.")
_ZONE = flags.DEFINE_string("zone", None, "tpu: its zone.")
_PROJECT = flags.DEFINE_string("project", "", "tpu: its Google Cloud project.")
_TPU_TYPE = flags.DEFINE_string(
    "tpu_type", None, "tpu: its accelerator type (v4-8, v4-32, v5litepod-16, ...), which "
    "gives hosts x chips; default: asked from gcloud.")
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", None, "dry run: the device kind whose cached bench results give step "
    "times (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v4', cpu); default: the backend's.")
_PREPARE_ONLY = flags.DEFINE_bool(
    "prepare_only", False, "Prepare the data sets of the unfinished points and exit (the "
    "tpu backend runs this on every host before points share it).")

_EXIT_FAILED = 1


def _exit_status(outcome: dict[str, str]) -> int:
  from medbench_jax import runtime
  states = set(outcome.values())
  if states <= {sweep_lib.DONE}:
    return 0
  if states & {sweep_lib.FAILED, sweep_lib.BLOCKED}:
    return _EXIT_FAILED
  return runtime.EXIT_PREEMPTED


def _report(outcome: dict[str, str], plan: sweep_lib.Plan) -> None:
  from medbench_jax.study import sweep_local
  print(f"Sweep {plan.sweep}: {sweep_local.summary(outcome)}.")
  for point in plan.points:
    if outcome.get(point.name) in (sweep_lib.FAILED, sweep_lib.BLOCKED):
      status = sweep_lib.read_status(point.workdir) or {}
      print(f"  {outcome[point.name]}: {point.name}: "
            f"{sweep_lib.first_line(status.get('reason', ''))}")
  print(f"Report: python -m medbench_jax.report --runs={plan.root} --out=REPORT_DIR")


def _unfinished_datasets(plan: sweep_lib.Plan) -> list[dict]:
  return sweep_lib.datasets(p for p in plan.points
                            if sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE)


def _dry_run(plan: sweep_lib.Plan, slots: list, device_kind: str, backend_text: str) -> None:
  from medbench_jax.study import planner
  print(sweep_lib.table(sweep_lib.assess(plan)))
  if backend_text:
    print(backend_text)
  estimates = planner.estimate(plan, sweep_lib.configs(plan), device_kind=device_kind,
                               devices_per_point=len(slots[0].devices) or 1)
  print(planner.describe(estimates, planner.schedule(plan, estimates, slots), slots,
                         device_kind, show_env=_BACKEND.value == "tpu"))


def _run(plan: sweep_lib.Plan) -> int:
  from medbench_jax.study import slots as slots_lib
  from medbench_jax.study import sweep_local
  from medbench_jax.study import sweep_slurm
  from medbench_jax.study import sweep_tpu
  backend = _BACKEND.value
  if _PREPARE_ONLY.value:
    sweep_lib.prepare_datasets(_unfinished_datasets(plan))
    return 0
  if backend == "tpu" and not (_TPU.value and _ZONE.value):
    raise ValueError("--backend=tpu needs --tpu=NAME and --zone=ZONE")
  per_point = _DEVICES_PER_POINT.value
  backend_text = ""
  if backend == "slurm":
    allocation = sweep_slurm.parse_parameters(_SLURM.value, per_point or 1)
    slots = allocation.slots()
    device_kind = _DEVICE_KIND.value or "gpu"
    backend_text = sweep_slurm.describe(plan, allocation)
  elif backend == "tpu":
    tpu = sweep_tpu.Slice(_TPU.value, _ZONE.value, _PROJECT.value)
    topology = tpu.topology(_TPU_TYPE.value)
    slots = slots_lib.tpu_slice_slots(topology, per_point or 1)
    device_kind = _DEVICE_KIND.value or topology.device_kind
    backend_text = sweep_tpu.describe(plan, tpu, topology, slots)
  else:
    platform = (slots_lib.detect_platform() if _PLATFORM.value == "auto"
                else _PLATFORM.value)
    slots = slots_lib.local_slots(_PARALLEL.value, per_point, platform)
    device_kind = _DEVICE_KIND.value or slots_lib.device_kind(platform)
  if _DRY_RUN.value:
    _dry_run(plan, slots, device_kind, backend_text)
    return 0
  command = [sys.executable, "-m", "medbench_jax.sweep", *sys.argv[1:]]
  if backend == "slurm":
    sweep_lib.write_sweep_json(plan, command)
    sweep_slurm.submit(plan, allocation.parameters, cluster=_SLURM_CLUSTER.value)
    if _SLURM_CLUSTER.value == "slurm":
      print(f"Queued. Status: squeue --me; rerun `{shlex.join(command)} --dry_run` to see "
            "each point's state.")
      return 0
    outcome = {p.name: sweep_lib.outcome_on_disk(p.workdir) for p in plan.points}
  else:
    local_root = "://" not in str(plan.root)
    with sweep_local.root_lock(plan.root) if local_root else contextlib.nullcontext():
      sweep_lib.write_sweep_json(plan, command)
      if backend == "tpu":
        outcome = sweep_tpu.run(plan, tpu, slots)
      else:
        if len(slots) > 1:  # runs started together must not prepare the same data set
          sweep_lib.prepare_datasets(_unfinished_datasets(plan))
        outcome = sweep_local.run(plan, slots)
  _report(outcome, plan)
  return _exit_status(outcome)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checking configs asks JAX for its devices: here only the CPU, so that the runner never
  # holds the GPUs or TPU chips its points' processes need (jax.config, not the
  # environment, which the points inherit).
  jax.config.update("jax_platforms", "cpu")
  try:
    sweep = sweep_lib.load_sweep(_SWEEP.value)
    plan = sweep_lib.plan(sweep, _ROOT.value, source=_SWEEP.value)
    status = _run(plan)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    sys.exit(f"sweep: {e}")
  sys.exit(status)


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep", "root"])
  app.run(main)
