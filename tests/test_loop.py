"""loop.Progress: the form stored in `latest` checkpoints stays readable across versions."""

import json
import math

from medbench_jax.trainer import loop
from medbench_jax.trainer import optim

# A `latest` checkpoint's progress/metadata as the dict-based loop wrote it (fresh trial).
STORED = ('{"step": 12, "best_val_loss": 0.4573443531990051, "best_step": 12, "bad_evals": 0, '
          '"stopped_early": false, "skipped_updates": 0, "plateau": {"factor": 0.5, '
          '"patience": 2, "threshold": 0.0001, "cooldown": 0, "min_lr": 0.0, "best": Infinity, '
          '"num_bad_epochs": 0, "cooldown_counter": 0}}')


def test_progress_round_trips_to_the_same_json_bytes():
  progress = loop.Progress.from_json(json.loads(STORED))
  assert progress.step == 12 and progress.best_step == 12
  assert isinstance(progress.plateau, optim.ReduceLROnPlateau)
  assert math.isinf(progress.plateau.best)
  assert json.dumps(progress.to_json()) == STORED


def test_a_new_trial_starts_at_step_zero_with_no_best():
  progress = loop.Progress(plateau=optim.ReduceLROnPlateau(factor=0.5, patience=2))
  stored = json.loads(json.dumps(progress.to_json()))
  assert stored["step"] == 0 and stored["best_step"] == -1 and not stored["stopped_early"]
  assert loop.Progress.from_json(stored) == progress


def test_checkpoints_from_before_skipped_updates_restore_it_as_zero():
  stored = json.loads(STORED)
  del stored["skipped_updates"]
  assert loop.Progress.from_json(stored).skipped_updates == 0
