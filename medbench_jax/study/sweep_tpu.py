"""Runs a sweep on a Cloud TPU VM or pod slice: one point per chip of every host at once.

A slice of H hosts x C chips has H*C slots of one chip (study/slots.py;
`--devices_per_point=K` for K chips of one host each, or all of the slice's chips for one
multi-host program). A point on chips of one host runs `launch/tpu.sh run NAME
--zone=ZONE --worker=W -- env TPU_VISIBLE_CHIPS=... python3 -m medbench_jax.main ...`:
libtpu's variables give its process those chips as a TPU of its own. A point on the whole
slice runs on every host (`--worker=all ... --multiprocess`); jax.distributed finds the
others itself. Before points share a host, every host prepares the data sets once
(`python3 -m medbench_jax.sweep ... --prepare_only`), so that they do not all prepare the
same one.

The runner learns the slice's shape from `--tpu_type` (the accelerator type it was
created with, e.g. v4-32) or, without it, from `gcloud compute tpus tpu-vm describe`. The
slice must have been created and set up with launch/tpu.sh (launch/README.md). The sweep
root should be a bucket (gs://...) or a disk every host mounts at the same path, because
the hosts write the workdirs and this runner reads them; each point's output goes to its
log.txt, its outcome to status.json, as with the local backend. Stopping the runner
(Ctrl-C, SIGTERM) ends the ssh sessions: the points stop without saving and resume from
their last checkpoints when the sweep is rerun; a preempted slice does the same
(`launch/tpu.sh create` it again, rerun the sweep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import pathlib
import shlex
import subprocess

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep as sweep_lib
from medbench_jax.study import sweep_local

LAUNCHER = str(pathlib.Path(__file__).resolve().parents[2] / "launch" / "tpu.sh")


@dataclasses.dataclass(frozen=True)
class Slice:
  """The TPU VM or pod slice to run on (created by launch/tpu.sh create)."""
  name: str
  zone: str
  project: str = ""

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else [])]

  def launcher(self, worker: int | None = None) -> list[str]:
    """launch/tpu.sh run on host `worker` (None: every host), up to the command."""
    on = [] if worker is None else [f"--worker={worker}"]
    return ["bash", LAUNCHER, "run", self.name, *self._where(), *on, "--"]

  def command(self, point: sweep_lib.PlannedPoint,
              slot: slots_lib.Slot | None = None) -> list[str]:
    """The launcher command running `point` in `slot`: on its host with its chips'
    environment, or (no slot, or one spanning the slice) on every host at once."""
    main = ["python3", "-m", "medbench_jax.main", *point.main_args()]
    if slot is None or slot.worker is None:
      return [*self.launcher(), *main, "--multiprocess"]
    env = ["env", *(f"{k}={v}" for k, v in slot.env.items())]
    return [*self.launcher(slot.worker), *env, *main]

  def topology(self, tpu_type: str | None = None) -> slots_lib.TpuTopology:
    """The slice's shape: from `tpu_type` where given, else from gcloud."""
    if not tpu_type:
      describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name,
                  *self._where(), "--format=value(acceleratorType)"]
      try:
        tpu_type = subprocess.run(describe, capture_output=True, text=True, timeout=120,
                                  check=True).stdout.strip()
      except (OSError, subprocess.SubprocessError) as e:
        raise ValueError(f"Cannot ask gcloud for the accelerator type of {self.name} ({e}); "
                         "give it: --tpu_type=v4-32") from None
    return slots_lib.tpu_topology(tpu_type)


def describe(plan: sweep_lib.Plan, tpu: Slice, topology: slots_lib.TpuTopology,
             slots: Sequence[slots_lib.Slot]) -> str:
  """The slice, its slots and the launcher command of each unfinished point in the slot
  the runner starts it on first (the dry run's addition)."""
  from medbench_jax.study import planner

  lines = [f"{tpu.name}: {topology.accelerator_type}, {topology.hosts} host(s) x "
           f"{topology.chips_per_host} chips ({topology.device_kind}); {len(slots)} slot(s) "
           f"of {len(slots[0].devices)} chip(s)"]
  if "://" not in str(plan.root):
    lines.append(f"note: {plan.root} is a local path; every TPU host must mount it at the "
                 "same path, else use a bucket (--root=gs://BUCKET/DIR)")
  todo = [p for p in plan.points if sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE]
  unknown = [planner.Estimate(p.name, sweep_lib.NEW, 1, 1) for p in todo]
  order = planner.schedule(dataclasses.replace(plan, points=tuple(todo)), unknown, slots)
  by_name = {a.name: a.slot for a in order}
  lines += [shlex.join(tpu.command(p, by_name[p.name])) for p in todo]
  return "\n".join(lines)


def prepare_command(tpu: Slice, sweep_spec: str, root: str) -> list[str]:
  """Prepares the sweep's data sets on every host (before points share hosts)."""
  return [*tpu.launcher(), "python3", "-m", "medbench_jax.sweep", f"--sweep={sweep_spec}",
          f"--root={root}", "--prepare_only"]


def run(plan: sweep_lib.Plan, tpu: Slice, slots: Sequence[slots_lib.Slot], *,
        out: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, str]:
  """Runs the unfinished points on the slice's slots, as many at once as there are; the
  data sets are prepared on every host first where points share hosts. Returns each
  point's outcome."""
  shared = len(slots) > 1 and any(
      sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE for p in plan.points)
  if shared:
    command = prepare_command(tpu, plan.source, str(plan.root))
    out(f"Preparing the data sets on every host: {shlex.join(command)}")
    if subprocess.run(command, check=False).returncode != 0:
      raise RuntimeError("Preparing the data sets on the TPU hosts failed (output above); "
                         "nothing was started")
  return sweep_local.run(plan, slots, command=tpu.command, out=out)
