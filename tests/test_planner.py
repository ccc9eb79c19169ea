"""The cost planner's arithmetic on a fabricated sweep root and bench cache."""

import json

import pytest

from medbench_jax.benchmarks import train_speed
from medbench_jax.study import planner
from medbench_jax.study import slots
from medbench_jax.study import sweep
from tests.helpers import TINY

KIND = "Fake Accelerator 9000"
FIXED = {"train.num_epochs": 30, "train.patience": 2, "train.eval_every_steps": 0,
         "num_trials": 2}


def _plan(root):
  """seed=0 (finished), seed=1, half (label fraction 0.5) of the tiny Swin; and
  ResNet-18, which the bench never measured."""
  points = sweep.grid(TINY, {"seed": [0, 1]}, fixed=FIXED)
  points += sweep.grid(TINY, {"dataset.label_fraction": {"half": 0.5}}, fixed=FIXED)
  points += sweep.grid(f"{TINY}:model=resnet18", fixed=FIXED, labels={"model": "resnet18"})
  plan = sweep.plan(sweep.Sweep("fake", points), root)
  return plan, sweep.configs(plan)


def _finish(workdir, config, best_steps):
  workdir.mkdir(parents=True)
  (workdir / "results.json").write_text(json.dumps({
      "dataset": config.dataset.name, "model": config.model.name,
      "label_fraction": config.dataset.label_fraction,
      "label_subset": {"num_selected": 96}, "config": config.to_dict(),
      "trials": [{"best_step": step} for step in best_steps]}))


def _bench(cache, config, step, step_s, first_step_s):
  settings = train_speed.step_settings(config, step)
  line = {"bench": step, "framework": "jax", "device": KIND, "step_s": step_s,
          "first_step_s": first_step_s, **settings}
  if step == "eval":
    line["ten_crop"] = False
  assert train_speed.record(line, str(cache)) == str(cache / "Fake_Accelerator_9000.jsonl")


def test_device_hours_from_sizes_finished_epochs_and_bench_step_times(tmp_path):
  plan, configs = _plan(tmp_path / "root")
  first = configs["seed=0"]
  # Phantom sizes 96 / 40 / 40, batch 16 (eval 16): 6 steps an epoch, 3 eval batches.
  assert planner.split_sizes(first)[0] == {"train": 96, "validation": 40, "test": 40}
  # Trials stopped at their best step + (patience + 1) epochs: (18 + 18) / 6 = 6 epochs,
  # (30 + 18) / 6 = 8 epochs.
  _finish(plan.by_name()["seed=0"].workdir, first, [18, 30])
  cache = tmp_path / "bench"
  _bench(cache, first, "train", step_s=0.5, first_step_s=20.0)
  _bench(cache, first, "eval", step_s=0.1, first_step_s=5.0)

  estimates = {e.name: e for e in planner.estimate(plan, configs, device_kind=KIND,
                                                    cache_dir=str(cache))}
  assert estimates["seed=0"].seconds == 0 and estimates["seed=0"].state == sweep.DONE
  # seed=1: start-up + the first compilation + 2 trials x (7 epochs x (6 x 0.5 s + 3 x
  # 0.1 s) + 3 test batches x 10 crops x 0.1 s).
  seed1 = estimates["seed=1"]
  assert seed1.epochs == pytest.approx(7.0)
  per_trial = 7 * (6 * 0.5 + 3 * 0.1) + 3 * 10 * 0.1
  assert seed1.seconds == pytest.approx(planner.STARTUP_S + 20.0 + 2 * per_trial)
  assert "mean of 2 finished trial(s) under the root (same data set, model and label " \
         "fraction)" in "\n".join(seed1.notes)
  # Half the labels: 48 examples, 3 steps an epoch; the epochs of the same data set; the
  # step already compiled.
  half = estimates["label_fraction=half"]
  assert half.train_examples == 48 and half.epochs == pytest.approx(7.0)
  assert half.seconds == pytest.approx(planner.STARTUP_S
                                       + 2 * (7 * (3 * 0.5 + 3 * 0.1) + 3 * 10 * 0.1))
  resnet = estimates["model=resnet18"]
  assert resnet.seconds is None and any("no `bench train` of resnet18" in n
                                        for n in resnet.notes)
  assert seed1.device_hours == pytest.approx(seed1.seconds / 3600)

  # Two slots: seed=1 and half at once, resnet18 (cost unknown) after the shorter.
  two = slots.gpu_slots(["0", "1"])
  order = planner.schedule(plan, list(estimates.values()), two)
  assert [(a.name, a.slot.devices, a.start_s) for a in order] == [
      ("seed=1", ("0",), 0.0), (half.name, ("1",), 0.0),
      ("model=resnet18", ("1",), pytest.approx(half.seconds))]
  text = planner.describe(list(estimates.values()), order, two, KIND)
  total_h = (seed1.seconds + half.seconds) / 3600
  assert (f"Cost: 3 point(s) to run, 2 at once on 2 slot(s); {total_h:.3f} device-hours "
          "for the 2 with an estimate") in text
  assert (f"seed=1 -> here, device(s) 0; start +0 s: {seed1.seconds:.0f} s, "
          f"{seed1.seconds / 3600:.3f} device-h") in text


def test_epochs_without_finished_runs_are_a_stated_assumption(tmp_path):
  plan, configs = _plan(tmp_path / "root")
  config = configs["seed=1"]
  epochs, source = planner.expected_epochs(config, [], steps_per_epoch=6)
  assert epochs == planner.ASSUMED_BEST_EPOCH + 3 and source.startswith("assumed: ")
  config.train.num_epochs = 3  # patience 2 cannot stop 3 epochs early
  assert planner.expected_epochs(config, [], 6) == (
      3.0, "the whole budget (patience cannot stop it earlier)")


def test_bench_lines_of_another_batch_are_scaled_by_pixels():
  settings = {"model": "m", "dtype": "float32", "num_outputs": 14, "batch_size": 32,
              "image_size": 224, "model_kw": {}}
  line = {**settings, "bench": "train", "framework": "jax", "batch_size": 16,
          "image_size": 112, "step_s": 0.2, "first_step_s": 9.0}
  measured = planner.step_time([line], "train", settings, KIND)
  assert measured.step_s == pytest.approx(0.2 * 8) and "scaled x8.00" in measured.source
  assert planner.step_time([line], "eval", settings, KIND) is None


def test_finished_points_calibrate_the_rest(tmp_path):
  plan, configs = _plan(tmp_path / "root")
  first = configs["seed=0"]
  workdir = plan.by_name()["seed=0"].workdir
  _finish(workdir, first, [18, 30])
  cache = tmp_path / "bench"
  _bench(cache, first, "train", step_s=0.5, first_step_s=20.0)
  _bench(cache, first, "eval", step_s=0.1, first_step_s=5.0)
  before = {e.name: e.seconds for e in planner.estimate(plan, configs, device_kind=KIND,
                                                         cache_dir=str(cache))}
  # seed=0's own estimate (its 7 epochs, the first compilation) is seed=1's: it took twice
  # as long, so the rest are expected to as well.
  sweep.write_status(workdir, sweep.DONE, wall_s=2 * before["seed=1"])
  after = {e.name: e for e in planner.estimate(plan, configs, device_kind=KIND,
                                                cache_dir=str(cache))}
  assert after["seed=1"].seconds == pytest.approx(2 * before["seed=1"])
  assert after["label_fraction=half"].seconds == pytest.approx(
      2 * before["label_fraction=half"])
  assert after["model=resnet18"].seconds is None
  assert any(n.startswith("calibrated x2.00: the sweep's finished points took")
             for n in after["seed=1"].notes)
