"""A trial's checkpoints: `latest` (resume) and `best` (lowest validation loss, for test).

`latest` holds the train state, the data iterator's position and the loop's progress
(step, early-stopping and plateau counters), so a resumed trial continues exactly where
it stopped. `best` holds the train state and the validation metrics it was chosen by.
Both keep one checkpoint (orbax CheckpointManager, max_to_keep=1); orbax writes a
checkpoint under a temporary name and renames it when complete, so a kill while saving
leaves the previous one in place.
"""

from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


def initial_progress(plateau_state: dict) -> dict[str, Any]:
  """The loop's state before step 0: plain numbers, stored as JSON with the checkpoint."""
  return {"step": 0, "best_val_loss": float("inf"), "best_step": -1, "bad_evals": 0,
          "stopped_early": False, "plateau": plateau_state}


class Checkpoints:
  """The `latest` and `best` checkpoints below `directory` (WORKDIR/trial_K/ckpt)."""

  def __init__(self, directory: epath.Path):
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.latest = ocp.CheckpointManager(directory / "latest", options=options)
    self.best = ocp.CheckpointManager(directory / "best", options=options)

  def restore_latest(self, state: Any, data_iterator: Any) -> tuple[Any, dict] | None:
    """(state, progress) of the latest checkpoint, the iterator moved to its position;
    None when the trial has none yet."""
    step = self.latest.latest_step()
    if step is None:
      return None
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        progress=ocp.args.JsonRestore()))
    return restored["state"], restored["progress"]

  def save_latest(self, step: int, state: Any, data_iterator: Any, progress: dict) -> None:
    if step in self.latest.all_steps():  # saved after this step's evaluation already
      return
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        progress=ocp.args.JsonSave(progress)))

  def save_best(self, step: int, state: Any, val_metrics: dict[str, float]) -> None:
    # Re-saving after a resume replays a step that is already on disk.
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          progress=ocp.args.JsonSave({"step": step, "val": val_metrics})))

  def restore_best(self, state: Any) -> Any:
    """The train state with the lowest validation loss (`state` gives the structure)."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"No best checkpoint in {self.best.directory}: the trial never "
                              "evaluated. Delete the trial folder to train it again.")
    return self.best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))["state"]

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
