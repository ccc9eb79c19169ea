"""A trial's checkpoints: `latest` (resume) and `best` (lowest validation loss, for test).

`latest` holds the train state, the data iterator's position and the loop's progress
(loop.Progress as JSON: step, early-stopping and plateau counters), so a resumed trial
continues exactly where it stopped. `best` holds the train state and the validation
metrics it was chosen by. Each keeps one finished checkpoint.

What a reader can rely on, whatever happened to the process or the disk:
- Orbax writes a checkpoint under a temporary name and renames it when complete, and
  saves here are synchronous: a write that fails (a full or failing disk) raises
  `CheckpointError` from `save_*` before anything else is touched. (Orbax's asynchronous
  saves only log such a failure, and then delete the previous checkpoint.)
- Every finished checkpoint gets a manifest, the size and sha256 of each of its files
  (hashed once, by the lead, right after the save, files in parallel), written last;
  only then are older checkpoints deleted. A checkpoint without a manifest was
  cut short between orbax's rename and the manifest: restoring discards it and takes
  the previous one, which is still there.
- Restoring checks every file against the manifest (tensorstore would read a damaged
  file without noticing): a truncated, missing or altered file is a `CheckpointError`
  naming it and saying what to do, never a silent restart from step 0. The lead
  process checks and tells the others.
- A `latest` checkpoint resumes only with the process count that saved it (the data
  iterators' positions are per process): another count is refused at once.
"""

from __future__ import annotations

from concurrent import futures
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from medbench_jax import paths
from medbench_jax import runtime

# Written into each finished checkpoint's folder, after everything else.
MANIFEST = "medbench_manifest.json"
_CHUNK = 1 << 22
# Files hashed at once (hashlib releases the GIL: threads hash in parallel).
_HASH_THREADS = min(16, (os.cpu_count() or 1) + 1)


class CheckpointError(RuntimeError):
  """A checkpoint that could not be written, or that is damaged on disk (path named)."""


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files(folder: epath.Path) -> dict[str, epath.Path]:
  """Every file below `folder` but the manifest, by its "/"-joined relative path."""
  found = {}
  pending = [folder]
  while pending:
    for entry in pending.pop().iterdir():
      if entry.is_dir():
        pending.append(entry)
      elif entry.name != MANIFEST or entry.parent != folder:
        found[str(entry.relative_to(folder))] = entry
  return found


def _sha256_all(files: dict[str, epath.Path]) -> dict[str, str]:
  with futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
    return dict(zip(files, pool.map(_sha256, files.values())))


def write_manifest(folder: epath.Path) -> None:
  """Records the size and sha256 of every file of a finished checkpoint (written
  atomically)."""
  files = dict(sorted(_files(folder).items()))
  manifest = {"sha256": _sha256_all(files),
              "size": {name: path.stat().length for name, path in files.items()}}
  paths.write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def verify(folder: epath.Path, what_to_do: str) -> None:
  """Raises CheckpointError naming the first file that differs from the manifest."""
  try:
    manifest = json.loads((folder / MANIFEST).read_text())
    expected, sizes = manifest["sha256"], manifest.get("size", {})  # no sizes before v2
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"Checkpoint {folder}: its manifest {MANIFEST} is damaged ({e}). "
                          f"{what_to_do}") from None
  present = _files(folder)

  def fail(name: str, problem: str):
    raise CheckpointError(f"Checkpoint {folder} is damaged: {folder / name} {problem}. "
                          f"{what_to_do}")

  changed = "differs from what was saved (truncated or modified)"
  for name in expected:  # missing or resized files first: no reading needed
    if name not in present:
      fail(name, "is missing")
    if name in sizes and present[name].stat().length != sizes[name]:
      fail(name, changed)
  digests = _sha256_all({name: present[name] for name in expected})
  for name, digest in expected.items():
    if digests[name] != digest:
      fail(name, changed)


def _saved_process_count(folder: epath.Path) -> int | None:
  """How many processes saved the data iterators of a `latest` checkpoint (grain writes
  data/process_I-of-N.json per process)."""
  counts = {int(m[1]) for p in (folder / "data").iterdir()
            if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))}
  return counts.pop() if len(counts) == 1 else None


def _problem(folder: epath.Path, what_to_do: str) -> str:
  """verify's error message, or "" for a checkpoint as saved."""
  try:
    verify(folder, what_to_do)
  except CheckpointError as e:
    return str(e)
  return ""


class Checkpoints:
  """The `latest` and `best` checkpoints below `directory` (WORKDIR/trial_K/ckpt)."""

  def __init__(self, directory: epath.Path):
    self.trial_dir = directory.parent
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.latest = ocp.CheckpointManager(directory / "latest", options=options)
    self.best = ocp.CheckpointManager(directory / "best", options=options)

  # ---------------------------------------------------------------- restore

  def _newest(self, manager: ocp.CheckpointManager, what_to_do: str) -> int | None:
    """The newest finished checkpoint, verified; the others are deleted (they are an
    older one whose deletion was cut short, or a newer one that never got a manifest)."""
    steps = sorted(manager.all_steps())
    finished = [s for s in steps if (manager.directory / str(s) / MANIFEST).exists()]
    if not finished:
      chosen = None
    else:
      chosen = finished[-1]
      folder = manager.directory / str(chosen)
      problem = runtime.lead_decides("verify_checkpoint", lambda: _problem(folder, what_to_do))
      if problem:
        raise CheckpointError(problem)
    for step in steps:
      if step != chosen:
        logging.warning("Deleting %s: %s", manager.directory / str(step),
                        "an older checkpoint" if chosen is not None and step < chosen else
                        "a checkpoint whose saving was cut short")
        manager.delete(step)
    return chosen

  def restore_latest(self, state: Any, data_iterator: Any) -> tuple[Any, dict] | None:
    """(state, progress) of the latest checkpoint, the iterator moved to its position;
    None when the trial has none yet. The progress is the JSON that was saved with it
    (loop.Progress.to_json)."""
    step = self._newest(self.latest, self._delete_to_retrain())
    if step is None:
      return None
    saved_by = _saved_process_count(self.latest.directory / str(step))
    if saved_by is not None and saved_by != jax.process_count():
      raise CheckpointError(
          f"Checkpoint {self.latest.directory / str(step)} was saved by {saved_by} "
          f"process(es), and this run has {jax.process_count()}: the data iterators' "
          f"positions are saved per process. Resume with {saved_by} process(es), or delete "
          f"{self.trial_dir} to train the trial again from step 0.")
    restored = self._restore(self.latest, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        progress=ocp.args.JsonRestore()))
    return restored["state"], restored["progress"]

  def restore_best(self, state: Any) -> Any:
    """The train state with the lowest validation loss (`state` gives the structure)."""
    step = self._newest(self.best, self._delete_to_retrain())
    if step is None:
      raise CheckpointError(f"No best checkpoint in {self.best.directory}: the trial never "
                            "evaluated. " + self._delete_to_retrain())
    return self._restore(self.best, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))["state"]

  def _restore(self, manager: ocp.CheckpointManager, step: int, args: Any) -> Any:
    try:
      return manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      # The files are as saved (verified): what they hold does not fit this run.
      raise CheckpointError(
          f"Checkpoint {manager.directory / str(step)} does not fit this run "
          f"({type(e).__name__}: {e}). Was the config changed since it was saved? Rerun with "
          f"the config in {self.trial_dir.parent / 'config.json'}, or delete {self.trial_dir} "
          "to train the trial again from step 0.") from e

  def _delete_to_retrain(self) -> str:
    return (f"Restore the folder from a backup, or delete {self.trial_dir} to train the "
            "trial again from step 0.")

  # ---------------------------------------------------------------- save

  def save_latest(self, step: int, state: Any, data_iterator: Any, progress: dict) -> None:
    if step in self.latest.all_steps():  # saved after this step's evaluation already
      return
    self._save(self.latest, step, ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        progress=ocp.args.JsonSave(progress)))

  def save_best(self, step: int, state: Any, val_metrics: dict[str, float]) -> None:
    # Re-saving after a resume replays a step that is already on disk.
    if step not in self.best.all_steps():
      self._save(self.best, step, ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          progress=ocp.args.JsonSave({"step": step, "val": val_metrics})))

  def _save(self, manager: ocp.CheckpointManager, step: int, args: Any) -> None:
    """Saves, writes the manifest, then deletes the older checkpoints (every process)."""
    folder = manager.directory / str(step)
    previous = [s for s in manager.all_steps() if s != step]
    try:
      manager.save(step, args=args)
      if runtime.is_lead():
        write_manifest(folder)
    except Exception as e:  # pylint: disable=broad-except
      kept = (f"The previous checkpoint ({manager.directory / str(max(previous))}) is intact: "
              "free space or fix the storage, then rerun the same command to resume from it."
              if previous else "Free space or fix the storage, then rerun the same command.")
      raise CheckpointError(f"Could not save the checkpoint of step {step} to {folder}: "
                            f"{type(e).__name__}: {e}. {kept}") from e
    for old in previous:
      manager.delete(old)

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
