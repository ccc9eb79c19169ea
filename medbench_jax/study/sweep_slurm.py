"""Runs a sweep on SLURM through submitit: one job array per dependency wave, one grid
point per array task.

Points whose dependencies are all outside the unfinished set form wave 1, their
dependants wave 2, and so on. Each wave is one array job (`--array=0-N%P`) submitted
at once with `--dependency=afterany:<previous wave>`; a task whose dependency did not
finish marks its point blocked (status.json) instead of running it. Before wave 1 a
one-task job prepares each data set once, so that parallel tasks do not all prepare
the same one.

Slots (study/slots.py): `--slurm=nodes=N --slurm=gpus_per_node=G` is the allocation the
sweep may fill, N nodes of G GPUs; each array task is one point on K GPUs
(`--devices_per_point=K`, default 1), so N*G/K tasks run at once (the array's
`slurm_array_parallelism`, unless given). A point of K <= G GPUs is one process on one
node that sees its K GPUs. A point of K > G GPUs (a multiple of G) spans K/G nodes: every
SLURM task runs medbench_jax.main and they join through jax.distributed. With one task
per GPU (`tasks_per_node` = G, the default there) main gets `--multiprocess`, and JAX reads
SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID (each
process takes the GPU of its local rank). With one task per node (`tasks_per_node=1`),
each process keeps all its node's GPUs: main gets the coordinator (first node), process
count and id explicitly. Rank 0 writes the point's log and status.

On a timeout submitit signals the job (USR2, 90 s ahead); the running point gets SIGTERM,
saves its state and the job is requeued, resuming where it stopped.

`cluster=local` or `debug` (submitit's executors for a workstation) runs the same tasks
without SLURM, waiting for each wave before submitting the next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any

from medbench_jax.study import slots as slots_lib
from medbench_jax.study import sweep as sweep_lib
from medbench_jax.study import sweep_local

# Defaults for update_parameters: a day per job.
DEFAULTS = {"timeout_min": 24 * 60}
_SAVE_WAIT_S = 120  # how long a preempted point may take to save before the job requeues


@dataclasses.dataclass(frozen=True)
class Task:
  """What an array task needs: the point, where its dependencies run, the directory that
  config paths are relative to."""
  point: sweep_lib.PlannedPoint
  dependencies: tuple[tuple[str, str], ...]  # (name, workdir)
  cwd: str


def distributed_flags(environ: Mapping[str, str], num_tasks: int, num_nodes: int,
                      global_rank: int, hostnames: Sequence[str], job_id: str) -> list[str]:
  """medbench_jax.main's flags for one task of a multi-task job (none for one task)."""
  if num_tasks == 1:
    return []
  under_slurm = all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                                           "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
  if under_slurm and num_tasks > num_nodes:
    return ["--multiprocess"]  # one process per GPU: JAX reads the SLURM variables
  # One process per node (it keeps all the node's GPUs), or no SLURM to detect: the port
  # is chosen the way JAX chooses it under SLURM, from the job id.
  port = 61440 + int(re.sub(r"\D", "", job_id) or 0) % 4096
  return [f"--coordinator_address={hostnames[0]}:{port}", f"--num_processes={num_tasks}",
          f"--process_id={global_rank}"]


def _ignore_usr2() -> None:
  # The point's process keeps running on submitit's timeout signal; the task stops it
  # with SIGTERM (which saves its state) before requeueing.
  signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class PointTask:
  """The callable each array task runs (submitit pickles it with its Task)."""

  def __init__(self):
    self._process: subprocess.Popen | None = None

  def __call__(self, task: Task) -> str:
    import submitit
    env = submitit.JobEnvironment()
    point, lead = task.point, env.global_rank == 0
    for name, workdir in task.dependencies:
      if sweep_lib.workdir_state(sweep_lib.resolve_root(workdir)) != sweep_lib.DONE:
        status = sweep_lib.read_status(sweep_lib.resolve_root(workdir)) or {}
        reason = (f"depends on {name}, which did not finish ("
                  f"{status.get('state', 'never started')})")
        if lead:
          sweep_lib.write_status(point.workdir, sweep_lib.BLOCKED, reason, job_id=env.job_id)
        return sweep_lib.BLOCKED
    command = [sys.executable, "-m", "medbench_jax.main", *point.main_args(),
               *distributed_flags(os.environ, env.num_tasks, env.num_nodes, env.global_rank,
                                  env.hostnames, env.job_id)]
    child_env = sweep_local.child_env({})
    print(f"{point.name} (task {env.global_rank} of {env.num_tasks}): "
          f"{shlex.join(command)}", flush=True)
    if not lead:
      self._process = subprocess.Popen(command, cwd=task.cwd, env=child_env,
                                       preexec_fn=_ignore_usr2)
      return str(self._process.wait())
    attempt = sweep_local.Attempt(point, command, child_env, cwd=task.cwd,
                                  preexec=_ignore_usr2,
                                  status_fields={"job_id": env.job_id,
                                                 "tasks": env.num_tasks})
    self._process = attempt.process
    return attempt.finish(attempt.process.wait())

  def checkpoint(self, task: Task) -> Any:
    """submitit's timeout/preemption hook: stop the point (it saves) and requeue."""
    import submitit
    if self._process is not None and self._process.poll() is None:
      self._process.send_signal(signal.SIGTERM)
      try:
        self._process.wait(timeout=_SAVE_WAIT_S)
      except subprocess.TimeoutExpired:
        pass  # requeued anyway: it resumes from its last checkpoint
    return submitit.helpers.DelayedSubmission(PointTask(), task)


def waves(points: Sequence[sweep_lib.PlannedPoint]) -> list[list[sweep_lib.PlannedPoint]]:
  """`points` (in run order) grouped so that each depends only on earlier groups."""
  depth: dict[str, int] = {}
  for point in points:
    depth[point.name] = 1 + max((depth[d] for d in point.depends_on if d in depth),
                                default=-1)
  grouped = [[] for _ in range(max(depth.values(), default=-1) + 1)]
  for point in points:
    grouped[depth[point.name]].append(point)
  return grouped


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What the sweep may fill (nodes x gpus_per_node) and what each array task asks for
  (`parameters`, submitit's update_parameters for one point of devices_per_point GPUs)."""
  nodes: int
  gpus_per_node: int
  devices_per_point: int
  parameters: dict[str, Any]

  def slots(self) -> list[slots_lib.Slot]:
    if not self.gpus_per_node:
      return [slots_lib.Slot({}, host=f"node {i}", description=f"CPU node {i}")
              for i in range(self.nodes)]
    return slots_lib.slurm_slots(self.nodes, self.gpus_per_node, self.devices_per_point)


def parse_parameters(items: Sequence[str], devices_per_point: int = 1) -> Allocation:
  """`KEY=VALUE` strings (numbers as numbers) -> the allocation and each task's submitit
  parameters: nodes and gpus_per_node describe the allocation (default: one node of
  devices_per_point GPUs); the rest are passed on."""
  given: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--slurm={item!r}: expected KEY=VALUE (submitit's parameters, e.g. "
                       "slurm_partition=gpu, nodes=2, gpus_per_node=8, timeout_min=1440)")
    given[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
  k = devices_per_point
  if k < 1:
    raise ValueError(f"--devices_per_point={k} must be at least 1")
  nodes = given.pop("nodes", 1)
  gpus = given.pop("gpus_per_node", k)
  if not gpus:  # CPU nodes: a point per node
    parameters = {**DEFAULTS, "slurm_array_parallelism": nodes, "nodes": 1,
                  "gpus_per_node": 0, "tasks_per_node": 1, **given}
    return Allocation(nodes, 0, k, parameters)
  if k > gpus and k % gpus:
    raise ValueError(f"--devices_per_point={k} spans nodes of gpus_per_node={gpus}: give "
                     "a multiple of gpus_per_node")
  span = max(1, k // gpus)
  if nodes < span:
    raise ValueError(f"--devices_per_point={k} needs {span} nodes of {gpus} GPUs; the "
                     f"allocation has nodes={nodes}")
  per_task = ({"nodes": 1, "gpus_per_node": k, "tasks_per_node": 1} if k <= gpus else
              {"nodes": span, "gpus_per_node": gpus, "tasks_per_node": gpus})
  slots = (nodes // span) * (gpus // k if k <= gpus else 1)
  parameters = {**DEFAULTS, "slurm_array_parallelism": slots, **per_task, **given}
  return Allocation(nodes, gpus, k, parameters)


def describe(plan: sweep_lib.Plan, allocation: Allocation) -> str:
  """What `submit` would submit (the dry run's addition)."""
  todo = [p for p in plan.points if sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE]
  lines = [f"allocation: {allocation.nodes} node(s) x {allocation.gpus_per_node} GPU(s), "
           f"{allocation.devices_per_point} GPU(s) per point: "
           f"{allocation.parameters['slurm_array_parallelism']} point(s) at once",
           f"submitit parameters per task: {allocation.parameters}"]
  datasets = sweep_lib.datasets(todo)
  if datasets:
    lines.append(f"job 0: prepare {len(datasets)} data set(s)")
  for i, wave in enumerate(waves(todo), 1):
    lines.append(f"wave {i}: array of {len(wave)} task(s)" +
                 (", after wave " + str(i - 1) if i > 1 else ""))
  return "\n".join(lines)


def submit(plan: sweep_lib.Plan, parameters: Mapping[str, Any], *, cluster: str = "slurm",
           out: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[Any]:
  """Submits every unfinished point of `plan`; returns the submitit jobs.

  With cluster=slurm this returns once all waves are queued; with local or debug it waits
  for each wave (they have no scheduler dependencies) and so returns when all have run.
  """
  import submitit
  folder = str(plan.root / ".submitit" / "%j")
  todo = [p for p in plan.points if sweep_lib.workdir_state(p.workdir) != sweep_lib.DONE]
  out(f"{len(plan.points)} points: {len(plan.points) - len(todo)} done, {len(todo)} to "
      f"submit ({cluster}).")
  earlier = [f"{p.name} ({s.get('reason') or s['state']})" for p in todo
             if (s := sweep_lib.read_status(p.workdir) or {}).get("state") in (
                 sweep_lib.QUEUED, sweep_lib.RUNNING)]
  if earlier:
    out(f"warning: {len(earlier)} point(s) were queued or running from an earlier submission, "
        f"e.g. {earlier[0]}; cancel those jobs (scancel) unless they ended, or the points "
        "run twice.")
  name = f"medbench-{plan.sweep}"
  previous: list[Any] = []

  def after_previous(executor: Any) -> None:
    if not previous:
      return
    if cluster == "slurm":
      ids = sorted({job.job_id.split("_")[0] for job in previous})
      executor.update_parameters(slurm_dependency="afterany:" + ":".join(ids))
    else:
      for job in previous:
        job.exception()  # waits; a failed job's points record their own outcome

  jobs: list[Any] = []
  datasets = sweep_lib.datasets(todo)
  if datasets:
    prepare = submitit.AutoExecutor(folder=folder, cluster=cluster)
    prepare.update_parameters(**{**parameters, "name": f"{name}-prepare", "nodes": 1,
                                 "tasks_per_node": 1})
    job = prepare.submit(sweep_lib.prepare_datasets, datasets)
    out(f"job {job.job_id}: prepare {len(datasets)} data set(s)")
    previous, jobs = [job], [job]
  by_name = plan.by_name()
  cwd = os.getcwd()
  for i, wave in enumerate(waves(todo), 1):
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**{**parameters, "name": name})
    after_previous(executor)
    tasks = [Task(p, tuple((d, str(by_name[d].workdir)) for d in p.depends_on), cwd)
             for p in wave]
    wave_jobs = executor.map_array(PointTask(), tasks)
    for point, job in zip(wave, wave_jobs):
      sweep_lib.write_status(point.workdir, sweep_lib.QUEUED, f"SLURM job {job.job_id}",
                             job_id=job.job_id)
    out(f"wave {i}: {len(wave_jobs)} task(s), job {wave_jobs[0].job_id.split('_')[0]}")
    previous = wave_jobs
    jobs += wave_jobs
  if cluster != "slurm":
    for job in previous:
      job.exception()
  return jobs
