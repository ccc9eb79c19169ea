"""Slots: where a sweep's points run, the same model for every backend.

A slot is one or more devices of one host and the environment the process of the point
running there gets. By default a point gets one device (a GPU, a TPU chip), so a machine
with G devices runs G points at once; `devices_per_point=K` gives each point K of them
(FSDP over a model too large for one). Per backend:

  local  the devices of this machine: GPUs (CUDA_VISIBLE_DEVICES per slot), TPU chips of
         a TPU VM (libtpu's variables, below), or the CPU, whose cores `--parallel`
         splits (its simulated devices are one process's, not the machine's).
  slurm  an allocation of N nodes x G GPUs: N*G/K array tasks at once, each K GPUs.
  tpu    a Cloud TPU VM or pod slice of H hosts x C chips: H*C/K processes at once, C/K
         per host; a point as large as the slice runs on every host (jax.distributed).

A process on some of a TPU VM's chips is told so through libtpu's topology variables
(the values JAX's and PyTorch/XLA's maintainers document for "running multiple processes
on a TPU VM": github.com/pytorch/xla docs/source/learn/pjrt.md, "To use only one TPU
chip"; torch_xla/_internal/tpu.py configure_topology; JAX's TPU topology gist
gist.github.com/skye/f82ba45d2445bb19d53545538754f9a3, "non-communicating processes"):

  TPU_VISIBLE_CHIPS             the chips (indices of /dev/accel*) this process opens;
  TPU_CHIPS_PER_PROCESS_BOUNDS  their shape as x,y,z: 1,1,1 one chip, 1,2,1 two, 2,2,1
                                four, 2,4,1 eight;
  TPU_PROCESS_BOUNDS            the processes of the program as x,y,z: 1,1,1, since each
                                point is a program of its own, even on a pod slice's host
                                (without it libtpu waits for the slice's other hosts);
  TPU_PROCESS_ADDRESSES         host:port of every process of the program: only its own;
  TPU_PROCESS_PORT              the port this process's TPU runtime listens on, one per
                                process of a host;
  CLOUD_TPU_TASK_ID             its index in TPU_PROCESS_ADDRESSES: 0.
Older libtpu releases read TPU_VISIBLE_DEVICES and TPU_MESH_CONTROLLER_ADDRESS/_PORT for
the same purpose; they are set too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import glob
import os
import re
import subprocess

# TPU_CHIPS_PER_PROCESS_BOUNDS for a process holding K adjacent chips of one host.
TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
TPU_FIRST_PORT = 8476  # libtpu's default TPU_PROCESS_PORT; the host's next slots count up
_XLA_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
PLATFORMS = ("auto", "gpu", "tpu", "cpu")


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one point runs: the environment of its process, the CPU cores it may use
  (local CPU slots), its host and devices, and a description for logs and status.json.

  host: "" for this machine; "worker W" for host W of a TPU slice ("all workers" for a
  point spanning the slice), "node N" for SLURM (notional: SLURM places the task).
  worker: the TPU slice host the process runs on (None: here, or every host); its env is
  then the remote process's, not the local launcher's.
  """
  env: dict[str, str]
  cores: tuple[int, ...] = ()
  description: str = "all devices"
  host: str = ""
  devices: tuple[str, ...] = ()
  worker: int | None = None


# ---------------------------------------------------------------------- devices here


def gpu_ids(environ: Mapping[str, str] = os.environ) -> list[str]:
  """This machine's GPUs: CUDA_VISIBLE_DEVICES where set, else nvidia-smi's list."""
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in out.splitlines() if line.strip()]


def tpu_chips() -> list[str]:
  """This TPU VM's chips (v4 and later: /dev/accel*; v2/v3: /dev/vfio/*)."""
  accel = glob.glob("/dev/accel[0-9]*")
  vfio = glob.glob("/dev/vfio/[0-9]*")
  return [str(i) for i in range(len(accel or vfio))]


def detect_platform(environ: Mapping[str, str] = os.environ) -> str:
  """gpu, tpu or cpu: what this machine's runs will use."""
  if gpu_ids(environ):
    return "gpu"
  if tpu_chips():
    return "tpu"
  return "cpu"


def device_kind(platform: str, environ: Mapping[str, str] = os.environ) -> str:
  """The device kind JAX will report for `platform` here (the bench cache's key), without
  starting JAX on the accelerator: nvidia-smi's name for a GPU (JAX reports the same)."""
  if platform == "gpu":
    ids = gpu_ids(environ)
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                            f"--id={ids[0]}" if ids else "--id=0"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
      return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
      return "gpu"
  if platform == "tpu":
    return "tpu"  # the TPU backend knows the kind from the accelerator type
  return "cpu"


# ---------------------------------------------------------------------- slot builders


def _groups(devices: Sequence[str], per_point: int, what: str) -> list[list[str]]:
  """`devices` cut into groups of `per_point` (devices left over stay idle)."""
  if per_point < 1:
    raise ValueError(f"--devices_per_point={per_point} must be at least 1")
  if len(devices) < per_point:
    raise ValueError(f"A point on {per_point} {what} needs at least {per_point}; found "
                     f"{len(devices)}")
  count = len(devices) // per_point
  return [list(devices[i * per_point:(i + 1) * per_point]) for i in range(count)]


def gpu_slots(ids: Sequence[str], per_point: int = 1, host: str = "") -> list[Slot]:
  """One slot per `per_point` GPUs of a host, each seeing only its own."""
  return [Slot({"CUDA_VISIBLE_DEVICES": ",".join(group)}, host=host, devices=tuple(group),
               description=f"{host + ' ' if host else ''}GPU {','.join(group)}")
          for group in _groups(ids, per_point, "GPUs")]


def tpu_env(chips: Sequence[str], port: int) -> dict[str, str]:
  """libtpu's variables for one process on `chips` of its host, alone in its program
  (the module docstring says what each means)."""
  if len(chips) not in TPU_BOUNDS:
    raise ValueError(f"A process can hold {sorted(TPU_BOUNDS)} chips of a TPU host, not "
                     f"{len(chips)}")
  visible = ",".join(chips)
  return {"TPU_VISIBLE_CHIPS": visible, "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOUNDS[len(chips)],
          "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
          "TPU_PROCESS_PORT": str(port), "CLOUD_TPU_TASK_ID": "0",
          "TPU_VISIBLE_DEVICES": visible, "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
          "TPU_MESH_CONTROLLER_PORT": str(port)}


def tpu_host_slots(chips: Sequence[str], per_point: int = 1, host: str = "",
                   worker: int | None = None) -> list[Slot]:
  """One slot per `per_point` chips of a TPU host, each a program of its own."""
  slots = []
  for i, group in enumerate(_groups(chips, per_point, "TPU chips")):
    where = f"{host} " if host else ""
    slots.append(Slot(tpu_env(group, TPU_FIRST_PORT + i), host=host, devices=tuple(group),
                      worker=worker, description=f"{where}TPU chip(s) {','.join(group)}"))
  return slots


def cpu_slots(parallel: int, devices_per_point: int | None = None,
              environ: Mapping[str, str] = os.environ) -> list[Slot]:
  """`parallel` runs on this CPU: its cores split between them (affinity), and XLA's
  simulated devices (--xla_force_host_platform_device_count) split the same way, or
  `devices_per_point` each."""
  flags = environ.get("XLA_FLAGS", "")
  match = _XLA_DEVICES.search(flags)
  simulated = int(match.group(1)) if match else 1
  per_run = devices_per_point or max(1, simulated // parallel)
  other_flags = _XLA_DEVICES.sub("", flags).strip()
  cores = sorted(os.sched_getaffinity(0))
  size = len(cores) // parallel
  groups = ([cores[i * size:(i + 1) * size] for i in range(parallel)] if size
            else [cores] * parallel)  # fewer cores than runs: they share them
  env = {"XLA_FLAGS": f"{other_flags} --xla_force_host_platform_device_count={per_run}"
                      .strip()}
  return [Slot(dict(env), cores=tuple(own), devices=tuple(str(c) for c in own),
               description=f"{per_run} CPU device(s), cores {','.join(map(str, own))}")
          for own in groups]


def local_slots(parallel: int | None = None, devices_per_point: int | None = None,
                platform: str = "auto", environ: Mapping[str, str] = os.environ
                ) -> list[Slot]:
  """The slots of this machine for the local backend.

  GPU or TPU: `devices_per_point` devices each (default: one; with only --parallel=N,
  the devices split into N equal groups, as before), at most `parallel` of them. CPU: one
  slot (all cores) unless --parallel=N splits the cores into N.
  """
  if parallel is not None and parallel < 1:
    raise ValueError(f"--parallel={parallel} must be at least 1")
  platform = detect_platform(environ) if platform == "auto" else platform
  if platform not in PLATFORMS[1:]:
    raise ValueError(f"Unknown platform {platform!r}; allowed: {list(PLATFORMS)}")
  if platform == "cpu":
    if (parallel or 1) == 1 and devices_per_point is None:
      return [Slot({})]
    return cpu_slots(parallel or 1, devices_per_point, environ)
  devices = gpu_ids(environ) if platform == "gpu" else tpu_chips()
  what = "GPUs" if platform == "gpu" else "TPU chips"
  if not devices:
    raise ValueError(f"--platform={platform}: no {what} found on this machine")
  if devices_per_point is None:
    if parallel is not None and len(devices) < parallel:
      raise ValueError(f"--parallel={parallel} needs at least {parallel} {what}; found "
                       f"{len(devices)}")
    devices_per_point = len(devices) // parallel if parallel else 1
  build = gpu_slots if platform == "gpu" else tpu_host_slots
  return build(devices, devices_per_point)[:parallel]


# ---------------------------------------------------------------------- TPU slices


@dataclasses.dataclass(frozen=True)
class TpuTopology:
  """A Cloud TPU VM or pod slice: hosts x chips per host, and what JAX calls its chips."""
  accelerator_type: str
  hosts: int
  chips_per_host: int
  device_kind: str

  @property
  def chips(self) -> int:
    return self.hosts * self.chips_per_host


# accelerator-type prefix -> (TensorCores per chip as the type's number counts them,
# JAX's device_kind). v2/v3/v4/v5p count TensorCores (2 per chip), v5e/v6e count chips.
_TPU_FAMILIES = {"v2": (2, "TPU v2"), "v3": (2, "TPU v3"), "v4": (2, "TPU v4"),
                 "v5p": (2, "TPU v5"), "v5litepod": (1, "TPU v5 lite"),
                 "v5e": (1, "TPU v5 lite"), "v6e": (1, "TPU v6 lite")}


def tpu_topology(accelerator_type: str) -> TpuTopology:
  """Hosts and chips of a Cloud TPU accelerator type (`launch/tpu.sh create --type`):
  v2/v3/v4/v5p-N are N/2 chips, 4 per host; v5litepod/v6e-N are N chips, one host up
  to 8, else 4 per host. E.g. v4-8: 1 x 4; v4-32: 4 x 4; v5litepod-8: 1 x 8."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type.strip())
  if not match or match.group(1) not in _TPU_FAMILIES:
    raise ValueError(f"Unknown TPU accelerator type {accelerator_type!r}; expected e.g. "
                     f"v4-8, v4-32, v5p-16, v5litepod-8, v6e-16 ({sorted(_TPU_FAMILIES)})")
  family, number = match.group(1), int(match.group(2))
  per_chip, kind = _TPU_FAMILIES[family]
  chips = number // per_chip
  if chips < 1 or number % per_chip:
    raise ValueError(f"TPU accelerator type {accelerator_type!r} is not a whole number of "
                     "chips")
  per_host = (min(chips, 8) if chips <= 8 else 4) if per_chip == 1 else min(chips, 4)
  if chips % per_host:
    raise ValueError(f"TPU accelerator type {accelerator_type!r}: {chips} chips do not "
                     f"fill hosts of {per_host}")
  return TpuTopology(accelerator_type, chips // per_host, per_host, kind)


def tpu_slice_slots(topology: TpuTopology, per_point: int = 1) -> list[Slot]:
  """The slots of a slice: `per_point` chips of one host each (every host runs
  chips_per_host/per_point points), or one slot spanning every host (a point as large
  as the slice, run as one multi-host program)."""
  if per_point == topology.chips and topology.hosts > 1:
    return [Slot({}, host="all workers", devices=tuple(str(i) for i in range(per_point)),
                 description=f"all {per_point} chips of {topology.accelerator_type}")]
  if per_point > topology.chips_per_host:
    raise ValueError(f"--devices_per_point={per_point}: a point runs on chips of one host "
                     f"(at most {topology.chips_per_host} on {topology.accelerator_type}) "
                     f"or on the whole slice ({topology.chips})")
  chips = [str(i) for i in range(topology.chips_per_host)]
  slots = []
  for worker in range(topology.hosts):
    slots += tpu_host_slots(chips, per_point, host=f"worker {worker}", worker=worker)
  return slots


# ---------------------------------------------------------------------- SLURM


def slurm_slots(nodes: int, gpus_per_node: int, per_point: int = 1) -> list[Slot]:
  """The slots of an allocation of `nodes` x `gpus_per_node` GPUs (notional hosts: SLURM
  places each array task; CUDA_VISIBLE_DEVICES is what SLURM gives a task of K GPUs)."""
  if per_point > gpus_per_node:
    if per_point % gpus_per_node:
      raise ValueError(f"--devices_per_point={per_point} spans nodes of {gpus_per_node} "
                       "GPUs: give a multiple of gpus_per_node")
    span = per_point // gpus_per_node
    return [Slot({}, host=f"nodes {i * span}-{(i + 1) * span - 1}",
                 devices=tuple(str(d) for d in range(gpus_per_node)),
                 description=f"{span} nodes x {gpus_per_node} GPUs")
            for i in range(nodes // span)]
  ids = [str(i) for i in range(gpus_per_node)]
  slots = []
  for node in range(nodes):
    slots += gpu_slots(ids, per_point, host=f"node {node}")
  return slots
