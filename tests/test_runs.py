"""Finding runs below a sweep root, and listing every one not used as asked."""

import json

import pytest

from medbench_jax.study import runs
from tests import study_sweep


def _run(root, workdir, seeds, num_trials=3, model="resnet50", init="imagenet", value=0.8):
  trials = [{"seed": s, "best_step": 1, "best_val_loss": 0.1,
             "test": {"mean_auc": value + 0.01 * s, "auc/a": 0.7, "loss": 0.3}} for s in seeds]
  study_sweep.write_results(root / workdir, task="classification", dataset="d", model=model,
                            init=init, fraction=1.0, trials=trials, num_trials=num_trials)


def _kinds(collection):
  return sorted((p.kind, p.run) for p in collection.problems)


def test_sweep_points_missing_failed_blocked_incomplete(tmp_path):
  study_sweep.write_sweep(tmp_path, fractions=(1.0,), datasets=("d1",))
  collection = runs.collect(tmp_path)
  assert len(collection.runs) == 9 + 2
  assert _kinds(collection) == [
      ("blocked", "model=convnext_tiny,init=run:failed"),
      ("failed", "model=convnext_tiny,init=random"),
      ("incomplete", "data=d1,model=densenet121,init=random,fraction=1"),
      ("missing", "model=vit_base_patch16_224,init=random")]
  failed = next(p for p in collection.problems if p.kind == "failed")
  assert (failed.workdir, failed.detail) == ("cls/failed_convnext", "NaN loss at step 12")


def test_missing_point_names_the_unfinished_point_it_waits_for(tmp_path):
  (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "chain", "points": [
      {"name": "first", "workdir": "a", "num_trials": 1},
      {"name": "second", "workdir": "b", "num_trials": 1, "depends_on": ["first"]}]}))
  details = {p.run: p.detail for p in runs.collect(tmp_path).problems}
  assert details == {"first": "no results.json", "second": "no results.json; depends on first"}


def test_runs_outside_sweep_json_and_fewer_trials_than_the_config(tmp_path):
  _run(tmp_path, "a", [0, 1], num_trials=3)
  _run(tmp_path, "nested/b", [0, 1, 2], init="random")
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "status.json").write_text(json.dumps({"state": "running", "reason": ""}))
  collection = runs.collect(tmp_path)
  assert sorted(r.name for r in collection.runs) == ["a", "nested/b"]
  assert _kinds(collection) == [("incomplete", "a"), ("running", "c")]
  assert collection.asked_trials() == {("classification", "d", "resnet50", "imagenet", 1.0): 3,
                                       ("classification", "d", "resnet50", "random", 1.0): 3}


def test_invalid_files_are_listed_with_file_and_key(tmp_path):
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "results.json").write_text("{\"task\": ")
  _run(tmp_path, "nokey", [0])
  path = tmp_path / "nokey" / "results.json"
  results = json.loads(path.read_text())
  del results["trials"][0]["test"]["mean_auc"]
  path.write_text(json.dumps(results))
  problems = {p.run: p for p in runs.collect(tmp_path).problems}
  assert problems["bad"].kind == "invalid" and "not valid JSON (line 1" in problems["bad"].detail
  assert "nokey/results.json: trials[0].test has no 'mean_auc'" in problems["nokey"].detail


def test_status_conflict_undefined_metric_and_bad_sweep_json(tmp_path):
  _run(tmp_path, "a", [0, 1, 2])
  (tmp_path / "a" / "status.json").write_text(json.dumps({"state": "failed", "reason": "OOM"}))
  path = tmp_path / "a" / "results.json"
  results = json.loads(path.read_text())
  results["trials"][1]["test"]["mean_auc"] = None
  path.write_text(json.dumps(results))
  collection = runs.collect(tmp_path)
  assert _kinds(collection) == [("status_conflict", "a"), ("undefined_metric", "a")]
  assert "trial 1 (seed 1)" in collection.problems[1].detail
  trials = runs.trials_frame(collection)
  assert trials["value"].isna().sum() == 1
  (tmp_path / "sweep.json").write_text(json.dumps({"points": [{"workdir": "a"}]}))
  with pytest.raises(ValueError, match=r"sweep.json: points\[0\] has no 'name'"):
    runs.collect(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    runs.collect(tmp_path / "nowhere")


def test_trials_frame_one_row_per_trial_and_duplicate_seeds(tmp_path):
  _run(tmp_path, "a", [0, 1], value=0.8)
  _run(tmp_path, "b", [1, 2], value=0.9)  # the same group, seed 1 again
  collection = runs.collect(tmp_path)
  trials = runs.trials_frame(collection)
  assert list(trials["seed"]) == [0, 1, 2]
  assert list(trials["value"]) == pytest.approx([0.8, 0.81, 0.92])
  assert list(trials["run"]) == ["a", "a", "b"]
  assert {"auc/a", "loss", "mean_auc", "best_step"} <= set(trials.columns)
  duplicate = [p for p in collection.problems if p.kind == "duplicate_seed"]
  assert len(duplicate) == 1 and "seed 1 already in a trial 1" in duplicate[0].detail
