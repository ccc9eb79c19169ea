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


def _phantom_unprepared(monkeypatch):
  """Every point's phantom set unprepared, in one folder (label fractions share it)."""
  monkeypatch.setattr(planner, "_unprepared", lambda config: "DATA_DIR/phantom_cxr")


def test_device_hours_from_sizes_finished_epochs_and_bench_step_times(tmp_path, monkeypatch):
  _phantom_unprepared(monkeypatch)
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
  # seed=1: 7 evaluations a trial (one an epoch); latest at each, best at each up to the
  # expected best (7 - (patience + 1) = 4): 11 saves.
  saves = 7 + 4
  per_trial = (7 * 6 * 0.5 + 7 * 3 * 0.1 + saves * planner.CHECKPOINT_S
               + 3 * 10 * 0.1 + planner.TRIAL_SET_UP_S)
  # The first point of the setting compiles cold (bench first step - step, train and eval,
  # and the first trial's set-up), its second trial loads from the compilation cache; it
  # also prepares the phantom.
  cold = (20.0 - 0.5) + (5.0 - 0.1) + planner.COLD_SET_UP_S
  seed1 = estimates["seed=1"]
  assert seed1.epochs == pytest.approx(7.0)
  assert seed1.compile_s == pytest.approx(cold + planner.WARM_COMPILE_S)
  assert seed1.seconds == pytest.approx(planner.STARTUP_S + planner.PREPARE_S + cold
                                        + planner.WARM_COMPILE_S + 2 * per_trial)
  assert seed1.overhead_s == pytest.approx(
      planner.STARTUP_S + planner.PREPARE_S + cold + planner.WARM_COMPILE_S
      + 2 * (saves * planner.CHECKPOINT_S + planner.TRIAL_SET_UP_S))
  assert "mean of 2 finished trial(s) under the root (same data set, model and label " \
         "fraction)" in "\n".join(seed1.notes)
  # Half the labels: 48 examples, 3 steps an epoch; the epochs of the same data set; the
  # step already compiled, the data set already prepared.
  half = estimates["label_fraction=half"]
  assert half.train_examples == 48 and half.epochs == pytest.approx(7.0)
  assert half.seconds == pytest.approx(
      planner.STARTUP_S + 2 * planner.WARM_COMPILE_S
      + 2 * (7 * 3 * 0.5 + 7 * 3 * 0.1 + saves * planner.CHECKPOINT_S + 3 * 10 * 0.1
             + planner.TRIAL_SET_UP_S))
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
  assert (f"seed=1 -> here, device(s) 0; start +0 s: {seed1.seconds / 60:.1f} min, "
          f"{seed1.seconds / 3600:.3f} device-h") in text


def test_ten_crop_bench_gives_the_test_step_and_its_compilation(tmp_path, monkeypatch):
  monkeypatch.setattr(planner, "_unprepared", lambda config: None)
  plan, configs = _plan(tmp_path / "root")
  config = configs["seed=0"]
  cache = tmp_path / "bench"
  _bench(cache, config, "train", step_s=0.5, first_step_s=20.0)
  _bench(cache, config, "eval", step_s=0.1, first_step_s=5.0)
  settings = train_speed.step_settings(config, "eval")
  train_speed.record({"bench": "eval", "framework": "jax", "device": KIND, "step_s": 0.6,
                      "first_step_s": 9.0, "ten_crop": True, **settings}, str(cache))
  est = {e.name: e for e in planner.estimate(plan, configs, device_kind=KIND,
                                             cache_dir=str(cache))}["seed=0"]
  # No finished run: patience 2 gives best at epoch 10 + 3 evaluations = 13 epochs; test:
  # 3 batches of the ten-crop step (0.6 s), not 10 x 0.1 s.
  evaluations, saves = 13, 13 + 10
  per_trial = (13 * 6 * 0.5 + evaluations * 3 * 0.1 + saves * planner.CHECKPOINT_S
               + 3 * 0.6 + planner.TRIAL_SET_UP_S)
  cold = (20.0 - 0.5) + (5.0 - 0.1) + (9.0 - 0.6) + planner.COLD_SET_UP_S
  assert est.epochs == pytest.approx(13.0)
  assert est.seconds == pytest.approx(planner.STARTUP_S + cold + planner.WARM_COMPILE_S
                                      + 2 * per_trial)
  assert any(n.startswith("test step (ten crops) 0.6 s: bench eval on") for n in est.notes)


def test_finished_points_measure_the_start_up(tmp_path, monkeypatch):
  monkeypatch.setattr(planner, "_unprepared", lambda config: None)
  plan, configs = _plan(tmp_path / "root")
  cache = tmp_path / "bench"
  _bench(cache, configs["seed=0"], "train", step_s=0.5, first_step_s=20.0)
  workdir = plan.by_name()["seed=0"].workdir
  _finish(workdir, configs["seed=0"], [18, 30])
  results = json.loads((workdir / "results.json").read_text())
  (workdir / "results.json").write_text(json.dumps({**results, "cost": {"wall_s": 100.0}}))
  sweep.write_status(workdir, sweep.DONE, wall_s=142.0)
  assert planner.measured_startup([p.workdir for p in plan.points]) == [42.0]
  without = {e.name: e for e in planner.estimate(plan, configs, device_kind=KIND,
                                                 cache_dir=str(tmp_path / "empty"))}
  # No bench line: no estimate, hence no calibration; the start-up is still measured.
  assert without["seed=1"].seconds is None
  estimates = planner.estimate(plan, configs, device_kind=KIND, cache_dir=str(cache))
  seed1 = {e.name: e for e in estimates}["seed=1"]
  assert any("start-up: 42 s, median of 1 finished point(s)" in n for n in seed1.notes)


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


def test_finished_points_calibrate_the_rest(tmp_path, monkeypatch):
  _phantom_unprepared(monkeypatch)
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


def test_a_phantom_is_generated_once_for_all_its_resolutions(tmp_path):
  plan, configs = _plan(tmp_path / "root")
  first, other = configs["seed=0"], configs["seed=1"]
  for config in (first, other):
    config.dataset.data_dir = str(tmp_path / "data")  # nothing prepared there
  other.dataset.image_size = 56
  assert planner._unprepared(first) is not None
  assert planner._unprepared(first) == planner._unprepared(other)


def test_packed_points_compile_once_per_program_and_say_so(tmp_path, monkeypatch):
  """4 trials packed 2 per program: 2 programs, each compiled (cold, then from the cache)
  and set up once; the step time is not assumed to gain from packing."""
  _phantom_unprepared(monkeypatch)
  fixed = {**FIXED, "num_trials": 4}
  points = sweep.grid(TINY, {"train.pack_trials": [1, 2]}, fixed=fixed)
  plan = sweep.plan(sweep.Sweep("fake", points), tmp_path / "root")
  configs = sweep.configs(plan)
  cache = tmp_path / "bench"
  config = configs["pack_trials=1"]
  _bench(cache, config, "train", step_s=0.5, first_step_s=20.0)
  _bench(cache, config, "eval", step_s=0.1, first_step_s=5.0)
  one, two = planner.estimate(plan, configs, device_kind=KIND, cache_dir=str(cache))
  assert (one.packed, two.packed) == (1, 2)
  # The first point compiled the setting cold; the packed one loads 2 programs, not 4.
  assert two.compile_s == pytest.approx(2 * planner.WARM_COMPILE_S)
  # Otherwise the same work: the packed step is taken as 2 single steps.
  assert one.seconds - one.compile_s - planner.PREPARE_S == pytest.approx(
      two.seconds - two.compile_s)
  assert any("packed: 2 trials per program, 2 program(s)" in n for n in two.notes)
  order = planner.schedule(plan, [one, two], slots.gpu_slots(["0"]))
  assert ", 2 trials per program; start" in planner.describe([one, two], order,
                                                            slots.gpu_slots(["0"]), KIND)
