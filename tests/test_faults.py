"""Fault injection: each way a run can fail, provoked, and what it must lead to.

Kills land at a precise stage: tests/fault_runner.py runs the command line with hooks
that print "FAULT-HOOK <stage> <n>" and pause there, and the test kills the process
when it reads that line. A rerun must end with the results of an uninterrupted run
(CPU, same seed) after training on the same batches in the same order; damaged or
hostile input must fail with an error naming the culprit, having run or written
nothing. Runs of the tiny config share one uninterrupted reference run (a module
fixture). A run is killed and resumed once per task kind: classification before a
checkpoint's manifest (the other stages are slow tests), segmentation inside a train step.
The runs of the command line are marked e2e, the long scenarios slow; damaged files are
made in-process, in seconds.
"""

import dataclasses
import glob
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest

from tests import helpers
from tests import study_sweep

# Both 12 steps (2 epochs of 6), evaluations and `latest` checkpoints at steps 4, 8, 12.
TINY = f"--config={helpers.TINY}:epochs=2,workers=2"
SEGMENTATION = f"--config={helpers.TINY_SEGMENTATION}:epochs=2,workers=2"
SLOW = pytest.mark.slow
E2E = pytest.mark.e2e
HOOK_TIMEOUT_S = 900


def _prepared(phantom_dir):
  from medbench_jax.data import prepare
  config = helpers.load_tiny("epochs=2,workers=2", phantom_dir)
  return config, prepare.prepare_dataset(config.dataset, workers=1)


# ---------------------------------------------------------------- running the CLI


class Process(helpers.ProcessOutput):
  """A command line run through tests/fault_runner.py, its output read line by line."""

  def __init__(self, module, *args, hook=None, batch_log=None, devices=1, prefix=()):
    runner = [f"--hook={hook}"] if hook else []
    runner += [f"--batch_log={batch_log}"] if batch_log else []
    # Its own process group, as a batch job has: signals can go to the whole group.
    super().__init__(subprocess.Popen(
        [*prefix, sys.executable, "tests/fault_runner.py", *runner, module, *args],
        cwd=helpers.REPO, env=helpers.subprocess_env(devices), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True),
        wait_timeout=HOOK_TIMEOUT_S)

  def kill_at(self, pattern: str) -> None:
    """SIGKILLs the process (not its workers: they must notice by themselves)."""
    self.wait_for(pattern)
    self.proc.send_signal(signal.SIGKILL)
    assert self.finish() == -signal.SIGKILL


def _hooked_main(workdir, phantom_dir, *extra, config=TINY, **kw) -> Process:
  """`medbench_jax.main` of `config` on the phantom set, through the fault runner."""
  return Process("medbench_jax.main", config, f"--workdir={workdir}",
                 f"--config.dataset.manual_dir={phantom_dir}", *extra, **kw)


def _succeeds(process: Process) -> str:
  status = process.finish()
  assert status == 0, process.output[-5000:]
  return process.output


@dataclasses.dataclass
class Run:
  workdir: pathlib.Path
  results: dict
  batches: list  # sha1 of each training batch the loop took, in order


def _batches(path) -> list:
  return pathlib.Path(path).read_text().split() if os.path.exists(path) else []


def _trials(results: dict) -> list:
  """The trials' outcomes (what a rerun must reproduce), without their timings."""
  return [{k: v for k, v in t.items() if k != "cost"} for t in results["trials"]]


def _uninterrupted(root: pathlib.Path, phantom_dir, config: str) -> Run:
  _succeeds(_hooked_main(root / "run", phantom_dir, config=config,
                         batch_log=root / "batches.txt"))
  results = json.loads((root / "run" / "results.json").read_text())
  batches = _batches(root / "batches.txt")
  assert len(batches) == 12 and len(set(batches)) == 12
  return Run(root / "run", results, batches)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, phantom_dir) -> Run:
  """The uninterrupted classification run every interrupted one must reproduce."""
  return _uninterrupted(tmp_path_factory.mktemp("reference"), phantom_dir, TINY)


def _assert_resumed_identically(reference: Run, workdir, killed_log, resumed_log, out,
                                from_step: int) -> None:
  """The rerun resumed at `from_step`, replayed exactly the steps the kill lost and
  ended with the reference's results."""
  assert f"Resuming trial 0 from step {from_step} " in out, out[-5000:]
  assert "starting from step 0" not in out
  killed, resumed = _batches(killed_log), _batches(resumed_log)
  assert len(killed) >= from_step
  # Every training batch of the reference, once, in order: none repeated, none skipped.
  assert killed[:from_step] + resumed == reference.batches
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  assert _trials(results) == _trials(reference.results)
  assert results["summary"] == reference.results["summary"]


def _has_manifest(step_dir) -> bool:
  from medbench_jax.trainer import checkpoints
  return (pathlib.Path(step_dir) / checkpoints.MANIFEST).is_file()


# ---------------------------------------------------------------- preemption


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=E2E),
                                    pytest.param(signal.SIGINT, marks=SLOW)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.timeout(900)  # with the reference run, when it starts the module's e2e runs
def test_preemption_saves_exits_75_and_the_rerun_ends_identically(
    reference, tmp_path, phantom_dir, signum):
  """The signal goes to the whole process group, as SLURM and a terminal send it: the
  trainer saves at the next step boundary while its grain workers keep serving it."""
  workdir = tmp_path / "run"
  run = _hooked_main(workdir, phantom_dir, batch_log=tmp_path / "killed.txt")
  run.wait_for(r"\] step 6/12 ")
  os.killpg(run.proc.pid, signum)
  assert run.finish() == 75, run.output[-5000:]
  name = signal.Signals(signum).name
  assert f"{name} received: saving a checkpoint at the next step boundary" in run.output
  saved = int(re.search(r"preempted: state saved at step (\d+)", run.output).group(1))
  assert 6 <= saved < 12
  assert "Rerun the same command to resume" in run.output
  assert _has_manifest(workdir / "trial_0" / "ckpt" / "latest" / str(saved))
  assert not (workdir / "results.json").exists()

  out = _succeeds(_hooked_main(workdir, phantom_dir, batch_log=tmp_path / "resumed.txt"))
  _assert_resumed_identically(reference, workdir, tmp_path / "killed.txt",
                              tmp_path / "resumed.txt", out, saved)


# ---------------------------------------------------------------- kills at every stage


@pytest.mark.parametrize("hook,resumes_from", [
    pytest.param("manifest@8", 4, id="after-checkpoint-rename-before-manifest", marks=E2E),
    pytest.param("checkpoint@8", 4, id="while-writing-a-checkpoint", marks=SLOW),
    pytest.param("train_step@6", 4, id="inside-a-train-step", marks=SLOW),
    pytest.param("validation@2", 4, id="during-validation", marks=SLOW),
    pytest.param("test@1", 12, id="during-test-evaluation", marks=SLOW),
])
@pytest.mark.timeout(900)
def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(
    reference, tmp_path, phantom_dir, hook, resumes_from):
  workdir = tmp_path / "run"
  run = _hooked_main(workdir, phantom_dir, hook=hook, batch_log=tmp_path / "killed.txt")
  run.kill_at(r"^FAULT-HOOK " + hook.replace("@", " "))
  latest = workdir / "trial_0" / "ckpt" / "latest"
  if hook == "manifest@8":
    assert (latest / "8").is_dir() and not _has_manifest(latest / "8")
  if hook == "checkpoint@8":
    assert glob.glob(str(latest / "8.orbax-checkpoint-tmp*")), os.listdir(latest)
  assert _has_manifest(latest / str(resumes_from))
  assert not (workdir / "results.json").exists()

  out = _succeeds(_hooked_main(workdir, phantom_dir, batch_log=tmp_path / "resumed.txt"))
  _assert_resumed_identically(reference, workdir, tmp_path / "killed.txt",
                              tmp_path / "resumed.txt", out, resumes_from)
  if hook == "manifest@8":
    assert f"Deleting {latest / '8'}: a checkpoint whose saving was cut short" in out


@E2E
@pytest.mark.timeout(900)
def test_sigkill_mid_segmentation_training_then_rerun_ends_identically(tmp_path, phantom_dir):
  """A U-Net run with grain workers killed inside step 7, in its second epoch: the rerun
  resumes from step 4, replays the first epoch's end, and ends with an uninterrupted run's
  batches and results."""
  reference = _uninterrupted(tmp_path / "reference", phantom_dir, SEGMENTATION)
  assert reference.results["task"] == "segmentation"
  workdir = tmp_path / "run"
  run = _hooked_main(workdir, phantom_dir, config=SEGMENTATION, hook="train_step@7",
                     batch_log=tmp_path / "killed.txt")
  run.kill_at(r"^FAULT-HOOK train_step 7")
  assert sorted(os.listdir(workdir / "trial_0" / "ckpt" / "latest")) == ["4"]
  assert _has_manifest(workdir / "trial_0" / "ckpt" / "latest" / "4")
  assert not (workdir / "results.json").exists()

  out = _succeeds(_hooked_main(workdir, phantom_dir, config=SEGMENTATION,
                               batch_log=tmp_path / "resumed.txt"))
  _assert_resumed_identically(reference, workdir, tmp_path / "killed.txt",
                              tmp_path / "resumed.txt", out, 4)


def test_sigkill_while_preparing_then_rerun_prepares_the_same_data(tmp_path, phantom_dir):
  _, reference_builder = _prepared(phantom_dir)
  manual = tmp_path / "phantom"
  shutil.copytree(phantom_dir, manual, ignore=shutil.ignore_patterns("prepared"))
  args = ("--dataset=phantom_cxr", f"--manual_dir={manual}", "--image_size=72",
          "--workers=1")
  Process("medbench_jax.prepare", *args, hook="prepare@40").kill_at(r"^FAULT-HOOK prepare")
  version_dir = pathlib.Path(reference_builder.data_path)
  prepared = manual / "prepared" / version_dir.relative_to(phantom_dir / "prepared")
  assert not prepared.exists()
  assert glob.glob(str(prepared.parent / "incomplete.*"))  # what the kill left

  out = _succeeds(Process("medbench_jax.prepare", *args))
  assert "Removing an interrupted preparation" in out
  assert not glob.glob(str(prepared.parent / "incomplete.*"))
  # The reference: an uninterrupted preparation of the same folder (examples record
  # where their files are).
  resumed = tmp_path / "resumed"
  shutil.move(prepared, resumed)
  shutil.rmtree(manual / "prepared")
  _succeeds(Process("medbench_jax.prepare", *args))
  shards = sorted(p.name for p in prepared.glob("*.array_record-*"))
  assert len(shards) == 3
  # Records are compared as parsed examples: a tf.train.Example's feature map has no
  # fixed serialisation order, so equal examples need not be equal bytes.
  from array_record.python import array_record_module
  import tensorflow as tf

  def examples(path):
    reader = array_record_module.ArrayRecordReader(str(path))
    return [tf.train.Example.FromString(r) for r in reader.read_all()]

  for name in shards:
    got, want = examples(resumed / name), examples(prepared / name)
    assert len(got) == len(want) > 0, name
    assert got == want, name
  with np.load(resumed / "label_table.npz") as got, \
      np.load(prepared / "label_table.npz") as want:
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


# ---------------------------------------------------------------- corrupt state


def _biggest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _biggest_file(step_dir / "state")
  os.truncate(path, path.stat().st_size // 2)
  return path


def _flip_bytes(step_dir):
  path = _biggest_file(step_dir / "state")
  data = bytearray(path.read_bytes())
  data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in
                                                   data[len(data) // 2:len(data) // 2 + 16])
  path.write_bytes(bytes(data))
  return path


def _delete_file(step_dir):
  path = step_dir / "state" / "_METADATA"
  path.unlink()
  return path


def _edit_progress(step_dir):
  path = step_dir / "progress" / "metadata"
  path.write_text(path.read_text().replace('"step": 12', '"step": 13'))
  return path


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> pathlib.Path:
  """A trial's ckpt folder whose `latest` holds step 12 as the trainer saves it: a train
  state, the data iterator's position and the progress, with their manifest."""
  from etils import epath

  from medbench_jax.trainer import checkpoints
  folder = tmp_path_factory.mktemp("saved") / "trial_0" / "ckpt"
  ckpt = checkpoints.Checkpoints(epath.Path(folder))
  ckpt.save_latest(12, _small_train_state(12), _iterator(), {"step": 12})
  ckpt.close()
  assert _has_manifest(folder / "latest" / "12")
  return folder


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _delete_file, _edit_progress],
                         ids=["truncated", "bytes-flipped", "file-deleted", "json-edited"])
def test_damaged_checkpoint_is_refused_naming_the_file(saved_checkpoint, tmp_path, damage):
  from etils import epath

  from medbench_jax.trainer import checkpoints
  trial = tmp_path / "trial_0"
  shutil.copytree(saved_checkpoint, trial / "ckpt")
  damaged = damage(trial / "ckpt" / "latest" / "12")
  with pytest.raises(checkpoints.CheckpointError) as error:
    # The files are checked before orbax reads anything: no template state is needed.
    checkpoints.Checkpoints(epath.Path(trial / "ckpt")).restore_latest(None, None)
  message = str(error.value)
  assert f"Checkpoint {trial / 'ckpt' / 'latest' / '12'} is damaged: {damaged}" in message
  assert f"delete {trial} to train the trial again from step 0" in message
  assert (trial / "ckpt" / "latest" / "12").is_dir()  # nothing deleted


@E2E
@pytest.mark.timeout(900)
def test_rerun_over_a_damaged_checkpoint_stops_instead_of_retraining(
    reference, tmp_path, phantom_dir):
  workdir = tmp_path / "run"
  shutil.copytree(reference.workdir, workdir)
  for finished in ("results.json", "trial_0/result.json"):  # as if killed before the test
    (workdir / finished).unlink()
  damaged = _truncate(workdir / "trial_0" / "ckpt" / "latest" / "12")
  run = _hooked_main(workdir, phantom_dir)
  assert run.finish() == 1
  assert f"is damaged: {damaged} differs from what was saved" in run.output
  assert "starting from step 0" not in run.output and "Training for" not in run.output
  assert not (workdir / "results.json").exists()


@pytest.mark.parametrize("name", ["results.json", "trial_0/result.json"])
def test_results_cut_in_half_are_named(tmp_path, phantom_dir, name):
  from medbench_jax import paths
  from medbench_jax.trainer import run
  config, _ = _prepared(phantom_dir)
  # A finished run's files, in the trainer's formats.
  workdir = tmp_path / "run"
  trial = study_sweep.classification_trial(workdir, 0, 0, "phantom_cxr", 1.0)
  paths.write_json(workdir / "trial_0" / "result.json", trial)
  if name == "results.json":
    study_sweep.write_results(workdir, task="classification", dataset="phantom_cxr",
                              model=config.model.name, init="random", fraction=1.0,
                              trials=[trial], num_trials=1)
  path = workdir / name
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(ValueError, match=re.escape(f"{path} is not valid JSON") +
                     ".*cut short or edited. Delete it to recompute it"):
    run.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("victim", ["train.array_record", "label_table.npz"])
def test_prepared_file_cut_short_is_named(tmp_path, phantom_dir, victim):
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.data.prepare.errors import DataFormatError
  _prepared(phantom_dir)
  copy = tmp_path / "phantom"
  shutil.copytree(phantom_dir, copy)
  config = helpers.load_tiny("epochs=2,workers=2", copy)
  data_dir = pathlib.Path(prepare.builder_for(config.dataset).data_path)
  (path,) = [p for p in data_dir.iterdir() if victim.replace(".", "-") in p.name.replace(
      ".", "-")]
  os.truncate(path, path.stat().st_size - 100)
  with pytest.raises(DataFormatError, match=re.escape(str(path)) + r".*damaged.*" +
                     re.escape(f"Delete {data_dir} and prepare the data set again")):
    sources.open_splits(config.dataset)


# ---------------------------------------------------------------- storage


def _small_train_state(seed: int):
  return {"params": np.random.default_rng(seed).normal(size=300_000).astype(np.float32)}


def _iterator():
  import grain
  return iter(grain.MapDataset.range(64).shuffle(seed=0).batch(4).to_iter_dataset())


def test_write_error_while_saving_keeps_the_previous_checkpoint(tmp_path):
  """A real failing write: the file-size limit (RLIMIT_FSIZE) makes the kernel refuse
  the second checkpoint's 1.2 MB array (EFBIG), as a failing disk would refuse it."""
  from etils import epath

  from medbench_jax.trainer import checkpoints
  directory = epath.Path(tmp_path / "trial_0" / "ckpt")
  ckpt = checkpoints.Checkpoints(directory)
  iterator = _iterator()
  ckpt.save_latest(4, _small_train_state(4), iterator, {"step": 4})
  next(iterator)
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, limits[1]))
  try:
    with pytest.raises(checkpoints.CheckpointError) as error:
      ckpt.save_latest(8, _small_train_state(8), iterator, {"step": 8})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)
  message = str(error.value)
  assert f"Could not save the checkpoint of step 8 to {directory / 'latest' / '8'}" in message
  assert "File too large" in message
  assert f"The previous checkpoint ({directory / 'latest' / '4'}) is intact" in message
  ckpt.close()

  state, progress = checkpoints.Checkpoints(directory).restore_latest(
      {"params": np.zeros(300_000, np.float32)}, _iterator())
  assert progress["step"] == 4
  np.testing.assert_array_equal(state["params"], _small_train_state(4)["params"])
  assert sorted(p.name for p in (tmp_path / "trial_0" / "ckpt" / "latest").iterdir()) == ["4"]


def _tmpfs_namespace(mount_point: pathlib.Path, size: str) -> list:
  """A command prefix running its command with a fresh tmpfs at mount_point, in a mount
  namespace of its own (as root, or as a user-namespace root elsewhere)."""
  if not shutil.which("unshare"):
    pytest.skip("needs util-linux unshare to mount a small tmpfs")
  user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
  probe = subprocess.run(["unshare", *user, "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size=1m tmpfs {mount_point}"],
                         capture_output=True, text=True)
  if probe.returncode:
    pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr}")
  return ["unshare", *user, "--mount", "sh", "-c",
          f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"', str(mount_point)]


@SLOW
@pytest.mark.timeout(1800)
def test_full_disk_while_checkpointing_stops_and_the_rerun_resumes(
    reference, tmp_path, phantom_dir):
  """The workdir is a 64 MB tmpfs, filled up just before `latest` step 8 is saved."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  prefix = _tmpfs_namespace(workdir, "64m")
  # The tmpfs ends with its namespace: a copy of the workdir is kept for the rerun.
  copy = tmp_path / "copy"
  script = ("import os, shutil, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "shutil.copytree(sys.argv[1], os.path.join(os.path.dirname(sys.argv[1]), 'copy'), "
            "ignore=shutil.ignore_patterns('filler')); sys.exit(rc)")
  run = Process("medbench_jax.main", TINY, f"--workdir={workdir}",
                f"--config.dataset.manual_dir={phantom_dir}", hook="disk_full@8",
                batch_log=tmp_path / "killed.txt",
                prefix=[*prefix, sys.executable, "-c", script, str(workdir)])
  assert run.finish() == 1, run.output[-5000:]
  assert "FAULT-HOOK disk_full 8" in run.output
  latest = copy / "trial_0" / "ckpt" / "latest"
  step_dir = workdir / "trial_0" / "ckpt" / "latest" / "8"
  assert f"Could not save the checkpoint of step 8 to {step_dir}" in run.output
  assert "No space left on device" in run.output
  assert "is intact: free space or fix the storage" in run.output
  assert "[trial 0] step 9/12" not in run.output  # stopped, not carried on
  assert sorted(p.name for p in latest.iterdir() if p.name.isdigit()) == ["4"]

  out = _succeeds(_hooked_main(copy, phantom_dir, batch_log=tmp_path / "resumed.txt"))
  _assert_resumed_identically(reference, copy, tmp_path / "killed.txt",
                              tmp_path / "resumed.txt", out, 4)


# ---------------------------------------------------------------- numerics


def _tiny_step(skip_nonfinite: bool):
  """A jitted train step of a model with parameters and BatchNorm statistics, compiled in
  a second, and its initial state."""

  import functools

  import flax.linen as nn
  import jax

  from medbench_jax import config_lib
  from medbench_jax.data import pipeline
  from medbench_jax.tasks import classification
  from medbench_jax.trainer import optim
  from medbench_jax.trainer import state as state_lib
  config = config_lib.default_config()
  info = type("Info", (), dict(task="multi-label", class_names=("a", "b"),
                               eval_class_names=("a", "b")))
  task = classification.Classification(config, info)

  class ConvBatchNormHead(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
      return nn.Dense(2)(nn.relu(x).mean(axis=(1, 2)))

  model = ConvBatchNormHead()
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  state = state_lib.create_state(model, variables, optim.make_optimizer(config.optim, 10))
  step = jax.jit(functools.partial(
      state_lib.train_step, loss_fn=task.loss, dropout_rng=jax.random.key(1),
      normalize=functools.partial(pipeline.normalize, mean=(0.5,) * 3, std=(0.25,) * 3),
      skip_nonfinite=skip_nonfinite))
  return state, step


def _tree_equal(a, b) -> bool:
  import jax
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_skip_policy_keeps_the_state_of_a_nonfinite_step():
  rng = np.random.default_rng(0)
  good = {"image": rng.integers(0, 255, (8, 32, 32, 1)).astype(np.uint8),
          "labels": (rng.random((8, 2)) < 0.5).astype(np.float32)}
  bad = {"image": good["image"], "labels": good["labels"].copy()}
  bad["labels"][3, 1] = np.nan

  state, step = _tiny_step(skip_nonfinite=True)
  skipped, metrics = step(state, bad)
  assert int(metrics["skipped"]) == 1 and not np.isfinite(metrics["loss"])
  assert int(metrics["batch"]["labels_nonfinite"]) == 1
  assert int(metrics["batch"]["image_nonfinite"]) == 0
  assert int(skipped.step) == int(state.step) + 1
  for part in ("params", "batch_stats", "opt_state"):
    assert _tree_equal(getattr(skipped, part), getattr(state, part)), part
  updated, metrics = step(skipped, good)
  assert int(metrics["skipped"]) == 0 and np.isfinite(metrics["loss"])
  assert not _tree_equal(updated.params, state.params)

  # Without the policy the same batch ruins the parameters: what "stop" guards against.
  state, step = _tiny_step(skip_nonfinite=False)
  ruined, metrics = step(state, bad)
  assert int(metrics["skipped"]) == 0
  assert not all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(ruined.params))


@E2E
@pytest.mark.timeout(600)
def test_nonfinite_loss_stops_naming_step_lr_and_batch_keeping_the_last_checkpoint(
    tmp_path, phantom_dir):
  from etils import epath
  import orbax.checkpoint as ocp

  from medbench_jax.trainer import checkpoints
  workdir = tmp_path / "run"
  run = _hooked_main(workdir, phantom_dir, hook="nan@6")
  assert run.finish() == 1, run.output[-5000:]
  message = re.search(r"NonFiniteError: (.*)", run.output).group(1)
  assert "non-finite loss nan, gradient norm nan at step 6 (learning rate " in message
  assert "labels min nan max nan mean nan, 1 non-finite value(s)" in message
  assert "image min " in message and "image_nonfinite" not in message
  latest = workdir / "trial_0" / "ckpt" / "latest"
  assert f"the latest checkpoint (step 4, {latest / '4'}) holds the state before it" in message
  assert sorted(p.name for p in latest.iterdir()) == ["4"]
  checkpoints.verify(epath.Path(latest / "4"), "")
  restored = ocp.StandardCheckpointer().restore(latest / "4" / "state")
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(restored["params"]))


@SLOW
@pytest.mark.timeout(1200)
def test_skip_policy_counts_skipped_updates_in_results(tmp_path, phantom_dir):
  workdir = tmp_path / "run"
  out = _succeeds(_hooked_main(workdir, phantom_dir, "--config.train.nonfinite=skip",
                               hook="nan@6"))
  assert "non-finite update skipped (train.nonfinite=skip)" in out and "at step 6 " in out
  results = json.loads((workdir / "results.json").read_text())
  assert results["trials"][0]["skipped_updates"] == 1
  assert np.isfinite(results["summary"]["mean"])


# ---------------------------------------------------------------- a lost host


@SLOW
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("victim", [1, 0], ids=["worker-lost", "coordinator-lost"])
def test_losing_a_process_stops_the_other_in_bounded_time_and_both_resume(
    tmp_path, phantom_dir, victim):
  from medbench_jax import runtime
  workdir = tmp_path / "run"

  def start_both():
    address = f"--coordinator_address=127.0.0.1:{helpers.free_port()}"
    return [_hooked_main(workdir, phantom_dir, address, "--num_processes=2",
                         f"--process_id={i}", devices=2) for i in range(2)]

  processes = start_both()
  processes[0].wait_for(r"\] step 6/12 ")
  processes[victim].proc.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  survivor = processes[1 - victim]
  status = survivor.finish()
  took = time.monotonic() - killed_at
  assert status != 0
  # Losing the coordinator (process 0) ends the other at once; losing another process,
  # after the heartbeat timeout (the margin: a loaded machine's slowness).
  assert took < runtime.HEARTBEAT_TIMEOUT_S + 60, took
  assert ("Terminating process because the JAX distributed service detected fatal errors. "
          "This most likely indicates that another task died") in survivor.output
  processes[victim].finish()

  processes = start_both()
  outs = [_succeeds(p) for p in processes]
  assert re.search(r"Resuming trial 0 from step (4|8) ", outs[0]), outs[0][-5000:]
  assert (workdir / "results.json").exists()


# ---------------------------------------------------------------- hostile files


def _safetensors(path, header: dict, data: bytes) -> pathlib.Path:
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
  return path


@pytest.mark.parametrize("header,message", [
    ({"w": {"dtype": "F32", "shape": [100, 100], "data_offsets": [0, 48]}},
     r"tensor 'w' of shape \[100, 100\] F32 needs 40000 bytes, but its data_offsets "
     r"\[0, 48\] span 48"),
    ({"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 4800]}},
     r"tensor 'w' has data_offsets \[0, 4800\] outside the 48-byte data buffer"),
    ({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
      "b": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}},
     r"tensor 'b' starts at byte 0 of the data buffer, where byte 48 was expected"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 48]}},
     r"tensor 'w' of shape \[1099511627776, 1099511627776\] F32 needs"),
    ({"w": {"dtype": "PY_OBJECT", "shape": [3, 4], "data_offsets": [0, 48]}},
     r"tensor 'w' has dtype 'PY_OBJECT'"),
], ids=["shape", "offsets", "overlap", "huge-shape", "dtype"])
def test_safetensors_whose_header_lies_is_refused(tmp_path, header, message):
  from medbench_jax import weights
  path = _safetensors(tmp_path / "lying.safetensors", header,
                      np.arange(12, dtype=np.float32).tobytes())
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
    weights.read_checkpoint(str(path))


def test_safetensors_header_longer_than_the_file_is_refused(tmp_path):
  from medbench_jax import weights
  path = tmp_path / "cut.safetensors"
  path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
  with pytest.raises(ValueError, match="its header claims 1099511627776 bytes, but the file "
                                       "holds 2"):
    weights.read_checkpoint(str(path))


def test_checkpoint_archive_with_path_traversal_is_refused(tmp_path):
  import torch

  from medbench_jax import weights
  path = tmp_path / "work" / "model.pth"
  path.parent.mkdir()
  torch.save({"fc.weight": torch.ones(2, 3)}, path)
  marker = tmp_path / "escaped.txt"
  member = os.path.relpath(marker, path.parent / "model")
  assert member.startswith("..")
  with zipfile.ZipFile(path, "a") as archive:
    archive.writestr(member, "written outside the archive's folder")
  with pytest.raises(weights.UnsafeCheckpointError,
                     match=re.escape(f"Refusing to load {path}: archive member(s) "
                                     f"['{member}']") + ".*path traversal"):
    weights.read_checkpoint(str(path))
  assert not marker.exists()
  assert sorted(os.listdir(path.parent)) == ["model.pth"]


def _png_bomb(path: pathlib.Path, side: int) -> pathlib.Path:
  """A black side x side 8-bit gray PNG, compressed row by row (never held in memory)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  compressor, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + pixels
  idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
  path.write_bytes(b"\x89PNG\r\n\x1a\n" +
                   chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) +
                   chunk(b"IDAT", idat) + chunk(b"IEND", b""))
  return path


@pytest.mark.parametrize("side,message", [
    (11_000, r"declares 11000 x 11000 pixels, more than the 100,000,000"),
    (15_000, r"is too large to decode \(Image size \(225000000 pixels\) exceeds limit"),
], ids=["over-our-limit", "over-pil-limit"])
def test_png_decompression_bomb_is_refused_before_decoding(tmp_path, side, message):
  from medbench_jax.data.prepare import images
  from medbench_jax.data.prepare.errors import DataFormatError
  bomb = _png_bomb(tmp_path / "bomb.png", side)
  assert bomb.stat().st_size < side * side // 500  # kilobytes for over 100 MB of pixels
  with pytest.raises(DataFormatError, match=re.escape(str(bomb)) + ".*" + message):
    images.read_image(bomb)


def test_png_bomb_in_a_data_set_is_reported_by_the_preparation(tmp_path):
  from medbench_jax.data.prepare.errors import DataFormatError
  from tests import layouts
  from tests.test_csv_folder import CSV_OPTIONS
  from tests.test_csv_folder import HEADER
  manual = tmp_path / "m"
  rows, _ = layouts.csv_folder_rows(manual)
  layouts.write_csv(manual / "labels.csv", HEADER, rows)
  bomb = _png_bomb(manual / "pics" / rows[4][0], 11_000)
  with pytest.raises(DataFormatError) as error:
    layouts.prepare_layout("csv_folder", manual, tmp_path, options=CSV_OPTIONS)
  assert "1 data problem(s)" in str(error.value)
  assert f"{bomb} declares 11000 x 11000 pixels" in str(error.value)


def _enormous(ds):
  ds.Rows = ds.Columns = 60_000


def _short_pixel_data(ds):
  ds.PixelData = b"\x00" * 100


def _garbage_fragments(ds):
  from pydicom import encaps
  from pydicom import uid
  ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
  ds.PixelData = encaps.encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
  ds["PixelData"].VR = "OB"


@pytest.mark.parametrize("malform,message", [
    (_enormous, r"declares 60000 x 60000 x 1 x 1 \(rows, columns, frames, samples\) pixels, "
                "more than"),
    (_short_pixel_data, r"cannot decode its pixel data \(Explicit VR Little Endian\)"),
    (_garbage_fragments, r"cannot decode its pixel data \(JPEG Baseline"),
], ids=["declared-enormous", "pixel-data-too-short", "undecodable-fragments"])
def test_dicom_with_malformed_pixel_data_is_refused(tmp_path, malform, message):
  import pydicom

  from medbench_jax.data.prepare import dicom
  from medbench_jax.data.prepare.errors import DataFormatError
  from tests import dicom_files
  path = dicom_files.write(tmp_path / "bad.dcm", np.full((64, 64), 100, np.uint8))
  ds = pydicom.dcmread(path)
  malform(ds)
  ds.save_as(path)
  with pytest.raises(DataFormatError, match=re.escape(str(path)) + ": " + message):
    dicom.load_gray(path, 32)


# ---------------------------------------------------------------- impossible configs


@pytest.fixture
def upernet_registered(monkeypatch):
  """Two upernet_* models, as the registry has them once the decoders are registered."""
  from medbench_jax.models import registry
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # pylint: disable=protected-access
  names = [f"upernet_{e}" for e in ("convnext_tiny", "swin_tiny_patch4_window7_224")]
  for name in names:
    if name not in registry.list_models():
      registry.register(name, converter=lambda sd, kw: {}, first_conv="encoder/stem",
                        classifier="head")(lambda num_classes, **kw: None)
  return sorted(m for m in registry.list_models() if m.startswith("upernet_"))


def test_upernet_on_densenet_lists_the_upernet_models(upernet_registered):
  from medbench_jax import config_checks
  from medbench_jax import config_lib
  config = config_lib.default_config()
  config.dataset.name = "phantom_cxr_lungs"
  config.model.name = "upernet_densenet121"
  with pytest.raises(ValueError) as error:
    config_checks.validate(config)
  message = str(error.value)
  assert message.startswith("config.model.name='upernet_densenet121' is not a registered "
                            "model. densenet121 is a registered model, but not with upernet.")
  assert message.endswith(", ".join(upernet_registered))


def test_segmentation_model_on_a_classification_data_set_is_refused(upernet_registered):
  from medbench_jax import config_checks
  from medbench_jax import config_lib
  config = config_lib.default_config()
  config.model.name = upernet_registered[0]
  with pytest.raises(ValueError, match=re.escape(
      f"config.model.name='{upernet_registered[0]}' is a segmentation model, but "
      "config.dataset.name='phantom_cxr' is a multi-label data set, which needs a "
      "classification model")):
    config_checks.validate(config)


def test_batch_that_does_not_divide_the_devices_is_refused():
  from medbench_jax import config_checks
  from medbench_jax import config_lib
  config = config_lib.default_config()
  config.input.batch_size = 12  # 8 devices here
  with pytest.raises(ValueError, match=re.escape(
      "config.input.batch_size=12 is not allowed; allowed: a multiple of the number of "
      "devices (8)")):
    config_checks.validate(config)


def test_fsdp_on_one_device_fails_before_any_work(tmp_path):
  manual = tmp_path / "empty"
  manual.mkdir()
  run = Process("medbench_jax.main", TINY, f"--workdir={tmp_path / 'run'}",
                f"--config.dataset.manual_dir={manual}", "--config.mesh.fsdp=2",
                "--config.input.batch_size=15")
  assert run.finish() == 1
  assert "config.mesh.fsdp=2 is not allowed; allowed: a divisor of the 1 devices" in run.output
  assert not (tmp_path / "run").exists() and not list(manual.iterdir())


def test_label_fraction_leaving_less_than_a_batch_fails_before_training(tmp_path,
                                                                        phantom_dir):
  from medbench_jax.trainer import run
  config, _ = _prepared(phantom_dir)
  config.dataset.label_fraction = 0.1  # 10 of 96 training examples, batches of 16
  with pytest.raises(ValueError, match=re.escape(
      "config.dataset.label_fraction=0.1 leaves 10 of the 96 training examples of "
      "phantom_cxr, fewer than one batch (config.input.batch_size=16): raise "
      "config.dataset.label_fraction to at least 0.1667")):
    run.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "trial_0").exists()


def test_phantom_split_without_examples_is_refused():
  from medbench_jax import config_checks
  from medbench_jax import config_lib
  config = config_lib.default_config()
  config.dataset.phantom.num_val = 0
  with pytest.raises(ValueError, match=re.escape("config.dataset.phantom.num_val=0 is not "
                                                 "allowed; allowed: an integer >= 1")):
    config_checks.validate(config)
