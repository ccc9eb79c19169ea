"""Runs a sweep on a Cloud TPU VM or pod slice, one point at a time across all its hosts.

Each point runs `launch/tpu.sh run NAME --zone=ZONE -- python3 -m medbench_jax.main ...
--multiprocess`, i.e. `gcloud compute tpus tpu-vm ssh --worker=all`: every host of the
slice starts main, and jax.distributed finds the others itself. The slice must have
been created and set up with the same script (launch/README.md). The sweep root should
be a bucket (gs://...) or a disk every host mounts at the same path, because the hosts
write the workdirs and this runner reads them; the output of all hosts goes to the
point's log.txt, its outcome to status.json, as with the local backend. Stopping the
runner (Ctrl-C, SIGTERM) ends the ssh sessions: the hosts' processes stop without
saving, and the point resumes from its last checkpoint when the sweep is rerun; a
preempted slice does the same (`launch/tpu.sh create` it again, rerun the sweep).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import pathlib
import shlex

from medbench_jax.study import sweep as sweep_lib
from medbench_jax.study import sweep_local

LAUNCHER = str(pathlib.Path(__file__).resolve().parents[2] / "launch" / "tpu.sh")


@dataclasses.dataclass(frozen=True)
class Slice:
  """The TPU VM or pod slice to run on (created by launch/tpu.sh create)."""
  name: str
  zone: str
  project: str = ""

  def command(self, point: sweep_lib.PlannedPoint) -> list[str]:
    """The launcher command running `point` on every host of the slice."""
    project = [f"--project={self.project}"] if self.project else []
    return ["bash", LAUNCHER, "run", self.name, f"--zone={self.zone}", *project, "--",
            "python3", "-m", "medbench_jax.main", *point.main_args(), "--multiprocess"]


def describe(plan: sweep_lib.Plan, tpu: Slice) -> str:
  """The commands `run` would start, one per unfinished point (the dry run's addition)."""
  lines = []
  if "://" not in str(plan.root):
    lines.append(f"note: {plan.root} is a local path; every TPU host must mount it at the "
                 "same path, else use a bucket (--root=gs://BUCKET/DIR)")
  lines += [shlex.join(tpu.command(p)) for p in plan.points
            if sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE]
  return "\n".join(lines)


def run(plan: sweep_lib.Plan, tpu: Slice, *,
        out: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, str]:
  """Runs the unfinished points one after another on the slice (the local runner with one
  slot whose command is the launcher's); returns each point's outcome."""
  slot = sweep_local.Slot({}, description=f"TPU {tpu.name} in {tpu.zone}")
  return sweep_local.run(plan, [slot], command=tpu.command, out=out)
