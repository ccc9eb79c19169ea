"""Runs a medbench_jax command line with fault hooks, for tests/test_faults.py.

  python tests/fault_runner.py [--hook=NAME@N] [--batch_log=FILE] MODULE [ARGS...]

MODULE (medbench_jax.main, medbench_jax.prepare) runs as `python -m MODULE ARGS` would,
after these patches:
  --batch_log=FILE   appends the sha1 of every training batch the loop takes, in order
  --hook=NAME@N      at a precise stage, prints "FAULT-HOOK NAME N" and pauses there
                     (the test kills the process when it reads the line), or injects a
                     fault:
    train_step@N     inside the jitted computation of step N (a host callback)
    checkpoint@N     inside orbax's save of `latest` step N, before its atomic rename
    manifest@N       after that rename, before the manifest of `latest` step N
    validation@N     in the N-th validation, after its first batch
    test@1           in the test evaluation, after its first batch
    prepare@N        while the ArrayRecords of the train split are written, after N
    nan@N            training batch N gets a NaN label (no pause)
    disk_full@N      before `latest` step N is saved, fills the (small, tmpfs) file
                     system of the workdir (no pause)
Nothing here is part of the package: the package has no hooks.
"""

import hashlib
import os
import runpy
import sys
import time

import numpy as np

PAUSE_S = 600


def announce(name: str, n: int) -> None:
  # On a line of its own: progress bars leave theirs unfinished.
  print(f"\nFAULT-HOOK {name} {n}", flush=True)


def pause(name: str, n: int) -> None:
  announce(name, n)
  time.sleep(PAUSE_S)


def install(hook: str, at: int, batch_log: str | None) -> None:

  import jax
  from orbax.checkpoint._src.path import atomicity

  from medbench_jax.data.prepare import base
  from medbench_jax.trainer import checkpoints
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import sharding as sharding_lib
  from medbench_jax.trainer import state

  train_batches = [0]
  to_global = sharding_lib.to_global

  def logged_to_global(local_batch, sharding):
    if "valid" not in local_batch:  # a training batch (evaluation batches mark padding)
      train_batches[0] += 1
      if hook == "nan" and train_batches[0] == at:
        local_batch = {**local_batch, "labels": local_batch["labels"].copy()}
        local_batch["labels"][0, 0] = np.nan
      if batch_log:
        digest = hashlib.sha1()
        for key in sorted(local_batch):
          digest.update(np.ascontiguousarray(local_batch[key]).tobytes())
        with open(batch_log, "a") as f:
          f.write(digest.hexdigest() + "\n")
    return to_global(local_batch, sharding)

  sharding_lib.to_global = logged_to_global

  if hook == "train_step":
    train_step = state.train_step

    def on_step(step):
      if int(step) + 1 == at:
        pause(hook, at)

    def step_with_callback(train_state, batch, **kw):
      jax.debug.callback(on_step, train_state.step)
      return train_step(train_state, batch, **kw)

    state.train_step = step_with_callback

  if hook == "checkpoint":
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def paused_finalize(self):
      final = self.get_final()
      if final.parent.name == "latest" and final.name == str(at):
        pause(hook, at)
      return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize

  if hook == "manifest":
    write_manifest = checkpoints.write_manifest

    def paused_write_manifest(folder):
      if folder.parent.name == "latest" and folder.name == str(at):
        pause(hook, at)
      write_manifest(folder)

    checkpoints.write_manifest = paused_write_manifest

  if hook == "disk_full":
    save_latest = checkpoints.Checkpoints.save_latest

    def save_on_full_disk(self, step, *args, **kw):
      if step == at:
        fill_file_system(self.trial_dir)
        announce(hook, at)
      return save_latest(self, step, *args, **kw)

    checkpoints.Checkpoints.save_latest = save_on_full_disk

  if hook in ("validation", "test"):
    predict = evaluation.predict
    restore_best = checkpoints.Checkpoints.restore_best
    calls = {"validation": 0, "test": 0}
    phase = ["validation"]

    def testing_restore_best(self, train_state):
      phase[0] = "test"
      return restore_best(self, train_state)

    def paused_predict(eval_step, variables, dataset, data_sharding):
      calls[phase[0]] += 1
      if phase[0] != hook or calls[hook] != at:
        return predict(eval_step, variables, dataset, data_sharding)
      batches = [0]

      def step_then_pause(*args):
        batches[0] += 1
        if batches[0] == 2:
          pause(hook, at)
        return eval_step(*args)

      return predict(step_then_pause, variables, dataset, data_sharding)

    checkpoints.Checkpoints.restore_best = testing_restore_best
    evaluation.predict = paused_predict

  if hook == "prepare":
    generate = base.PreparedBuilder._generate_examples  # pylint: disable=protected-access

    def paused_generate(self, scratch, records, slots):
      for i, example in enumerate(generate(self, scratch, records, slots)):
        if scratch.name.startswith("train") and i == at:
          pause(hook, at)
        yield example

    base.PreparedBuilder._generate_examples = paused_generate  # pylint: disable=protected-access


def fill_file_system(path) -> None:
  """Takes every free byte of the file system holding `path`: a tmpfs the test mounted."""
  stat = os.statvfs(path)
  total = stat.f_blocks * stat.f_frsize
  with open("/proc/mounts") as f:
    mounts = [line.split() for line in f]
  mount = max((m for m in mounts if os.fspath(path).startswith(m[1].rstrip("/") + "/")),
              key=lambda m: len(m[1]))
  if mount[2] != "tmpfs" or total > 1 << 30:
    raise SystemExit(f"disk_full refuses to fill {mount[1]} ({mount[2]}, {total} bytes): "
                     "only a small tmpfs mounted for the test")
  # Unbuffered: a buffered file would try to flush what did not fit again on close. A raw
  # write that does not fit writes what does, so the loop ends on a full file system.
  with open(os.path.join(mount[1], "filler"), "wb", buffering=0) as f:
    chunk = b"\0" * (1 << 16)
    try:
      while True:
        f.write(chunk)
    except OSError:
      pass  # ENOSPC: full


def main() -> None:
  args = sys.argv[1:]
  hook, at, batch_log = None, 0, None
  while args and args[0].startswith("--") and args[0].split("=")[0] in ("--hook",
                                                                          "--batch_log"):
    key, _, value = args.pop(0).partition("=")
    if key == "--hook":
      hook, _, n = value.partition("@")
      at = int(n or 1)
    else:
      batch_log = value
  module, *rest = args
  install(hook, at, batch_log)
  sys.argv = [module, *rest]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
