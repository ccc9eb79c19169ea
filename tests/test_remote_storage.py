"""Runs, sweeps and reports whose files live in a bucket, against a local GCS emulator.

The emulator (gcp-storage-emulator, on a free port of 127.0.0.1, in memory, with the two
GCS behaviours tensorstore needs that tests/gcs_emulator.py adds) stands in for Google
Cloud Storage; each client reaches it through its standard setting:
- etils.epath, which every file of the package goes through: through fsspec's gcsfs
  (EPATH_USE_TF=false), which honours STORAGE_EMULATOR_HOST. epath's default for gs://
  where TensorFlow is installed, TensorFlow's own GCS client, has no setting for another
  endpoint (www.googleapis.com is built into it), so no emulator can stand in for it.
- orbax's arrays, which tensorstore writes: TENSORSTORE_GCS_HTTP_URL, with
  GOOGLE_AUTH_TOKEN_FOR_TESTING so that it looks for no credentials.
- TensorBoard event files: written locally, copied through epath (trainer/tensorboard.py).
"""

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

from etils import epath
import fsspec
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from medbench_jax import paths
from medbench_jax.study import report
from medbench_jax.study import runs
from medbench_jax.trainer import checkpoints
from medbench_jax.trainer import tensorboard
from tests import helpers
from tests import study_sweep

BUCKET = "bucket"


def _emulator_env(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "EPATH_USE_TF": "false",
          # Every process sees what the others wrote: no listing cache in gcsfs.
          "FSSPEC_GCS": json.dumps({"use_listings_cache": False}),
          "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
          # No look-up of the bucket's kind (zonal or not): it asks for credentials.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's environment for clients; it runs while the module's tests do."""
  port = helpers.free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tests.gcs_emulator", "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
      cwd=helpers.REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline, "the emulator did not start"
        time.sleep(0.2)
    yield _emulator_env(port)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _reset_clients() -> None:
  """Forgets the backend epath chose and the file systems fsspec made (their settings)."""
  from etils.epath import backend
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  type(backend.fsspec_backend)._get_filesystem.cache_clear()  # pylint: disable=protected-access
  fsspec.AbstractFileSystem.clear_instance_cache()


@pytest.fixture
def bucket(emulator, monkeypatch):
  """A fresh gs:// folder on the emulator, with this process's clients pointed at it."""
  for key, value in emulator.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setitem(fsspec.config.conf, "gcs", {"use_listings_cache": False})
  _reset_clients()
  yield epath.Path(f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}")
  monkeypatch.undo()
  _reset_clients()


def _upload(local: pathlib.Path, remote: epath.Path) -> None:
  for path in sorted(p for p in local.rglob("*") if p.is_file()):
    target = remote / path.relative_to(local).as_posix()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(path.read_bytes())


# ---------------------------------------------------------------------- unit


def test_a_url_stays_a_url_and_a_local_path_becomes_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.as_path("gs://b/run")) == "gs://b/run"
  assert os.fspath(paths.as_path("gs://b/run") / "results.json") == "gs://b/run/results.json"
  assert os.fspath(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")
  assert paths.is_remote("gs://b/x") and not paths.is_remote(tmp_path)


def test_json_files_round_trip_through_the_bucket_and_nothing_is_written_locally(
    bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  url = f"{bucket}/run/results.json"
  paths.write_json(url, {"auc": 0.75, "undefined": None})
  assert paths.read_json(url) == {"auc": 0.75, "undefined": None}
  paths.write_atomic(url, "{cut")
  with pytest.raises(ValueError, match=f"{url} is not valid JSON"):
    paths.read_json(url)
  assert [p.name for p in (bucket / "run").iterdir()] == ["results.json"]
  assert not list(tmp_path.iterdir())  # no local "gs:" folder


def _add(tree: dict, value: float) -> dict:
  return {k: v + value for k, v in tree.items()}


def test_checkpoints_save_verify_and_restore_in_the_bucket(bucket):
  ckpt = checkpoints.Checkpoints(bucket / "trial_0" / "ckpt")
  state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  ckpt.save_best(3, state, {"loss": 0.5})
  ckpt.save_best(5, _add(state, 1.0), {"loss": 0.4})
  restored = ckpt.restore_best(_add(state, -7.0))
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 1)
  ckpt.close()
  best = bucket / "trial_0" / "ckpt" / "best"
  assert [p.name for p in best.iterdir()] == ["5"]  # the older one deleted
  assert (best / "5" / checkpoints.MANIFEST).exists()


def test_tensorboard_events_reach_the_bucket_at_every_flush(bucket, tmp_path):
  writer = tensorboard.create_writer(f"{bucket}/tb/trial_0", just_logging=False)
  writer.write_scalars(1, {"train/loss": 2.0})
  writer.flush()
  assert [p.name[:20] for p in (bucket / "tb" / "trial_0").iterdir()] == [
      "events.out.tfevents."]
  writer.write_scalars(2, {"train/loss": 1.5})
  writer.close()
  assert not writer.local.exists()
  _download(bucket / "tb" / "trial_0", tmp_path)
  assert helpers.scalars(tmp_path, "train/loss") == [2.0, 1.5]


def test_a_profiler_trace_made_locally_is_copied_into_the_bucket(bucket, tmp_path,
                                                                  monkeypatch):
  """JAX's profiler writes gs:// through XLA's own GCS client (www.googleapis.com built
  in, no emulator setting): a trace goes to a local folder, then paths.copy_tree puts it
  beside the TensorBoard events."""
  import jax
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  local = tmp_path / "trace"
  jax.profiler.start_trace(local)
  jnp.ones((64, 64)).sum().block_until_ready()
  jax.profiler.stop_trace()
  made = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
  assert made and all(name.startswith("plugins/profile/") for name in made)
  assert any(name.endswith(".xplane.pb") for name in made)
  copies = paths.copy_tree(local, f"{bucket}/tb/trial_0")
  assert [os.fspath(c) for c in copies] == [f"{bucket}/tb/trial_0/{name}" for name in made]
  for name in made:
    assert (bucket / "tb" / "trial_0" / name).read_bytes() == (local / name).read_bytes()
  assert not list((tmp_path / "cwd").iterdir())  # no local "gs:" folder


def _download(remote: epath.Path, local: pathlib.Path) -> None:
  for path in remote.iterdir():
    (local / path.name).write_bytes(path.read_bytes())


def test_report_of_a_sweep_in_the_bucket_equals_the_local_one(bucket, tmp_path):
  root = tmp_path / "sweep"
  study_sweep.write_sweep(root, fractions=(1.0,), num_trials=2, datasets=("chestxray14",))
  _upload(root, bucket / "sweep")
  local = report.build(root, tmp_path / "report", baseline="resnet50/imagenet",
                       num_resamples=20, with_plots=False)
  remote = report.build(f"{bucket}/sweep", f"{bucket}/report",
                        baseline="resnet50/imagenet", num_resamples=20, with_plots=False)
  assert (remote.num_runs, remote.num_trials) == (local.num_runs, local.num_trials) > (0, 0)
  for name in ("summary.csv", "trials.csv", "bootstrap.csv", "delong.csv", "problems.csv"):
    theirs = pd.read_csv(io.StringIO((remote.out / name).read_text()))
    mine = pd.read_csv(tmp_path / "report" / name)
    # Only where the runs are differs (trials.csv's absolute workdirs).
    pd.testing.assert_frame_equal(theirs.drop(columns=["workdir"], errors="ignore"),
                                  mine.drop(columns=["workdir"], errors="ignore"))
  assert "# Report: sweep" in (remote.out / "report.md").read_text()
  assert len(runs.collect(f"{bucket}/sweep").runs) == local.num_runs


# ---------------------------------------------------------------------- end to end


def _command(module: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=helpers.REPO,
                          env=helpers.subprocess_env(1, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_a_run_in_the_bucket_resumes_after_sigkill_and_writes_its_results_there(
    bucket, emulator, phantom_dir, tmp_path):
  workdir = bucket / "run"
  env = {**emulator, "MEDBENCH_CACHE": str(tmp_path / "cache")}
  # Steps 2-3 are profiled: the trace is made locally (JAX's profiler cannot write to an
  # emulated bucket) and copied into the bucket before the kill.
  args = (f"--config={helpers.TINY}", f"--workdir={workdir}",
          f"--config.dataset.manual_dir={phantom_dir}", "--config.train.profile_steps=2:4")
  proc = _command("medbench_jax.main", *args, env=env)
  latest = workdir / "trial_0" / "ckpt" / "latest"
  deadline = time.time() + 900
  while not (latest.exists() and any((p / checkpoints.MANIFEST).exists()
                                     for p in latest.iterdir() if p.name.isdigit())):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert not (workdir / "results.json").exists()

  out = _finish(_command("medbench_jax.main", *args, env=env))
  assert "Resuming trial 0 from step" in out
  results = paths.read_json(workdir / "results.json")
  assert results["trials"][0]["test"]["mean_auc"] is not None
  for name in ("config.json", "trial_0/result.json", "trial_0/test_predictions.npz"):
    assert (workdir / name).exists(), name
  assert any(p.name.startswith("events.out.tfevents.")
             for p in (workdir / "tb" / "trial_0").iterdir())
  traces = [p for run in (workdir / "tb" / "trial_0" / "plugins" / "profile").iterdir()
            for p in run.iterdir()]
  assert any(p.name.endswith(".xplane.pb") for p in traces), traces
  assert not (helpers.REPO / "gs:").exists()


SWEEP = """
from medbench_jax.study import sweep


def get_sweep(phantom):
  fixed = {{"num_trials": 1, "train.max_steps": 4, "dataset.manual_dir": phantom}}
  points = sweep.grid({tiny!r}, {{"seed": [0, 1]}}, fixed=fixed)
  points += sweep.grid({tiny!r}, {{"model.init": {{"chain": sweep.run_of(points[0])}}}},
                       fixed=fixed)
  return sweep.Sweep("bucket", points)
"""


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_a_sweep_and_its_report_on_a_root_in_the_bucket(bucket, emulator, phantom_dir,
                                                         tmp_path):
  spec = tmp_path / "bucket_sweep.py"
  spec.write_text(SWEEP.format(tiny=helpers.TINY))
  root = bucket / "sweep"
  env = {**emulator, "MEDBENCH_CACHE": str(tmp_path / "cache")}
  out = _finish(_command("medbench_jax.sweep", f"--sweep={spec}:{phantom_dir}",
                         f"--root={root}", env=env), timeout=1500)
  out = _finish(_command("medbench_jax.report", f"--runs={root}", f"--out={bucket}/report",
                         "--bootstrap_resamples=20", "--noplots", env=env))
  assert "3 runs, 3 trials; 0 run(s) not used as asked" in out, out[-3000:]
  summary = pd.read_csv(io.StringIO((bucket / "report" / "summary.csv").read_text()))
  # Seeds 0 and 1 from random init are one group; the chained run (init run:gs://...)
  # is another.
  assert sorted(summary["n"]) == [1, 2]
  assert summary["init"].str.startswith(f"run:{root}").sum() == 1
