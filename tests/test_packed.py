"""Trial packing (trainer/packed.py): N trials as one vmapped program give each trial the
results it gets alone.

The default tests check the pieces in seconds on a small convolutional model: the packed
step against each trial's own step, frozen trials, per-trial learning rates, the trial
mesh axis, packed evaluation and the memory-aware choice of N. The e2e tests train the
tiny config as users do: 4 packed trials against 4 trials one after another, 8 trials on
a trial axis of 8 devices, and a packed run killed mid-way and rerun.
"""

import json
import os
import pathlib
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

E2E = pytest.mark.e2e


class _SmallNet(nn.Module):
  """Conv + BatchNorm + dropout + Dense: every kind of state a trial keeps."""
  num_outputs: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)  # a bias before BatchNorm gets no gradient
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_outputs)(x.mean(axis=(1, 2)))


class _Task:
  """What train_step_fn asks of a task: a loss (and pp_train, unused here)."""

  @staticmethod
  def loss(outputs, batch):
    return jnp.mean((outputs - batch["labels"]) ** 2)

  @staticmethod
  def pp_train():
    return ""


def _config():
  config = helpers.load_tiny()
  config.input.augment_on_device = False
  return config


def _states(seeds):
  from medbench_jax.trainer import optim
  from medbench_jax.trainer import state as state_lib
  config, model = _config(), _SmallNet()
  tx = optim.make_optimizer(config.optim, 100, 10)
  states = []
  for seed in seeds:
    rng = jax.random.key(seed)
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, 16, 16, 3)))
    states.append(state_lib.create_state(model, variables, tx))
  return config, states


def _batches(count, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
           "labels": rng.normal(size=(8, 3)).astype(np.float32)} for _ in range(count)]


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _normalize(images):
  return images.astype(jnp.float32) / 255.0


def _close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


def test_packed_steps_equal_each_trials_own_steps_and_freeze_stopped_trials():
  from medbench_jax.trainer import packed
  from medbench_jax.trainer import trials
  seeds = [0, 1, 2]
  config, states = _states(seeds)
  packed_step = jax.jit(packed.packed_train_step_fn(config, _Task, _normalize, seeds))
  own_steps = [jax.jit(trials.train_step_fn(config, _Task, _normalize, s)) for s in seeds]
  alone = list(states)
  stacked = _stack(states)
  batches = [_batches(4, seed=s) for s in seeds]
  for i in range(4):
    # Trial 2 stops after two steps: it is frozen from then on.
    active = np.array([True, True, i < 2])
    stacked, metrics = packed_step(stacked, _stack([b[i] for b in batches]), active)
    for k in range(3):
      if active[k]:
        alone[k], own = own_steps[k](alone[k], batches[k][i])
        np.testing.assert_allclose(metrics["loss"][k], own["loss"], rtol=1e-5)
  for k in range(3):
    _close(jax.tree.map(lambda x, k=k: x[k], stacked.params), alone[k].params, rtol=1e-5)
    _close(jax.tree.map(lambda x, k=k: x[k], stacked.batch_stats), alone[k].batch_stats,
           rtol=1e-5)
  assert [int(s) for s in stacked.step] == [4, 4, 2]
  # The seeds differ, so do the trials (dropout keys and initialisations).
  assert not np.allclose(stacked.params["Dense_0"]["kernel"][0],
                         stacked.params["Dense_0"]["kernel"][1])


def test_a_frozen_trial_is_left_bit_for_bit_as_it_was():
  from medbench_jax.trainer import packed
  config, states = _states([0, 1])
  stacked = _stack(states)
  before = jax.tree.map(np.asarray, stacked)
  step = jax.jit(packed.packed_train_step_fn(config, _Task, _normalize, [0, 1]))
  after = stacked
  for batch in _batches(2):  # the first step's warm-up learning rate is 0
    after, _ = step(after, _stack([batch, batch]), np.array([True, False]))
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(old[1], np.asarray(new)[1])
  assert not np.array_equal(before.params["Dense_0"]["kernel"][0],
                            after.params["Dense_0"]["kernel"][0])


def test_learning_rate_of_one_packed_trial_changes_alone():
  from medbench_jax.trainer import optim
  from medbench_jax.trainer import packed
  _, states = _states([0, 1, 2])
  stacked = _stack(states)
  rates = np.asarray(optim.find_hyperparams(stacked.opt_state)["learning_rate"]).copy()
  stacked = packed._set_learning_rate(stacked, 1, 0.125)
  new = np.asarray(optim.find_hyperparams(stacked.opt_state)["learning_rate"])
  assert new[1] == np.float32(0.125)
  np.testing.assert_array_equal(new[[0, 2]], rates[[0, 2]])


@pytest.mark.parametrize("trials,fsdp,axis", [(8, 1, 8), (4, 1, 4), (3, 1, 1), (6, 1, 2),
                                              (4, 2, 4), (8, 2, 4)])
def test_trial_axis_is_the_largest_divisor_the_devices_allow(trials, fsdp, axis):
  from medbench_jax.trainer import sharding
  assert jax.device_count() == 8
  assert sharding.trial_axis_size(trials, fsdp) == axis
  mesh = sharding.make_mesh(fsdp, axis)
  assert mesh.shape[sharding.DATA] * axis * fsdp == 8
  if axis > 1:
    assert mesh.axis_names == (sharding.DATA, sharding.TRIAL, sharding.FSDP)
    spec = sharding.stacked(sharding.batch_sharding(mesh)).spec
    assert spec == sharding.P(sharding.TRIAL, (sharding.DATA, sharding.FSDP))


def test_eight_trials_on_a_trial_axis_of_eight_devices_each_train_on_their_own_device():
  from medbench_jax.trainer import packed
  from medbench_jax.trainer import sharding
  seeds = list(range(8))
  config, states = _states(seeds)
  mesh = sharding.make_mesh(1, 8)
  state_sharding = jax.tree.map(lambda _: sharding.stacked(sharding.replicated(mesh)),
                                states[0])
  batch_sharding = sharding.stacked(sharding.batch_sharding(mesh))
  step = jax.jit(packed.packed_train_step_fn(config, _Task, _normalize, seeds),
                 in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))
  stacked = jax.device_put(_stack(states), state_sharding)
  batches = _stack(_batches(8))
  sharded, _ = step(stacked, jax.device_put(batches, batch_sharding), np.ones(8, bool))
  kernel = sharded.params["Dense_0"]["kernel"]
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {1}  # a trial per device
  single, _ = jax.jit(packed.packed_train_step_fn(config, _Task, _normalize, seeds))(
      _stack(states), batches, np.ones(8, bool))
  _close(sharded.params, single.params, rtol=1e-5)


def test_packed_evaluation_scores_every_trial_as_its_own_evaluation(phantom_builder):
  """One read of a split, scored by 3 trials' variables, equals each trial's own
  Evaluator.predict."""
  from medbench_jax import tasks
  from medbench_jax.data import sources
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import sharding
  from medbench_jax.trainer import state as state_lib
  config = helpers.load_tiny()
  config.dataset.image_size = 64
  config.input.pp_eval = "center_crop(64)"
  config.dataset.data_dir = str(pathlib.Path(phantom_builder.data_dir).parents[2])
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  model = _SmallNet(num_outputs=task.num_outputs)
  variables = [model.init(jax.random.key(s), jnp.zeros((1, 64, 64, 3))) for s in range(3)]
  mesh = sharding.make_mesh()
  data_sharding = sharding.batch_sharding(mesh)
  normalize = state_lib.normalizer(config)
  single = evaluation.Evaluator.create(config, task, model.apply, normalize, data_sharding)
  packed = evaluation.Evaluator.create(config, task, model.apply, normalize, data_sharding,
                                       packed=True)
  together = packed.predict(_stack(variables), splits.validation, test=False)
  for k in range(3):
    alone = single.predict(variables[k], splits.validation, test=False)
    mine = evaluation.unpack(together, k)
    assert mine.keys() == alone.keys()
    for key in alone:
      np.testing.assert_allclose(mine[key], alone[key], rtol=1e-5, atol=1e-6)


def test_auto_packs_as_many_trials_as_fit_the_memory(monkeypatch):
  from medbench_jax.trainer import packed
  config = _config()
  config.train.pack_trials = "auto"
  per_trial, fixed = 3 << 30, 1 << 30
  monkeypatch.setattr(packed, "compiled_step_memory",
                      lambda config, splits, task, n: fixed + n * per_trial)
  monkeypatch.setattr(packed, "device_memory_bytes", lambda: (16 << 30, "test"))
  # 0.8 x 16 GiB = 12.8 GiB: 1 + 3n fits for n <= 3; doubling tries 1, 2, 4.
  assert packed.pack_size(config, None, None, unfinished=10) == 2
  assert packed.pack_size(config, None, None, unfinished=1) == 1
  config.train.pack_trials = 4
  assert packed.pack_size(config, None, None, unfinished=3) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_memory_of_a_packed_step_grows_with_the_trials(phantom_builder):
  from medbench_jax import tasks
  from medbench_jax.data import sources
  from medbench_jax.trainer import packed
  config = helpers.load_tiny("model=resnet18")
  config.dataset.image_size = 64
  config.input.pp_train = "center_crop(32)"
  config.input.pp_eval = "center_crop(32)"
  config.dataset.data_dir = str(pathlib.Path(phantom_builder.data_dir).parents[2])
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  one, two = (packed.compiled_step_memory(config, splits, task, n) for n in (1, 2))
  assert one < two < 2 * one  # one trial's state and activations more, not two runs


@pytest.mark.parametrize("value,ok", [(1, True), (4, True), ("auto", True), (0, False),
                                      ("4", False), (True, False)])
def test_pack_trials_is_checked(value, ok):
  from medbench_jax import config_checks
  config = helpers.load_tiny()
  config.train.pack_trials = value
  if ok:
    config_checks.validate(config)
  else:
    with pytest.raises(ValueError, match="train.pack_trials"):
      config_checks.validate(config)


def test_packed_trials_refuse_a_profile():
  from medbench_jax import config_checks
  config = helpers.load_tiny()
  config.train.pack_trials = 2
  config.train.profile_steps = "2:4"
  with pytest.raises(ValueError, match="train.pack_trials"):
    config_checks.validate(config)


# ---------------------------------------------------------------- e2e: trainings


def _train(workdir, phantom_dir, *extra, devices=1, wait=True):
  return helpers.main(workdir, phantom_dir, "--config=tests/configs/tiny.py",
                      "--config.num_trials=4", *extra, devices=devices, wait=wait)


def _results(workdir):
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, phantom_dir):
  workdir = tmp_path_factory.mktemp("sequential")
  _train(workdir, phantom_dir)
  return workdir


@pytest.fixture(scope="module")
def packed4(tmp_path_factory, phantom_dir):
  workdir = tmp_path_factory.mktemp("packed")
  out = _train(workdir, phantom_dir, "--config.train.pack_trials=4",
               "--config.train.gradcam_images=2")
  assert "Packing trials [0, 1, 2, 3] into one program" in out
  return workdir


def _assert_same_trials(reference, workdir, trials=range(4)):
  """10-step training losses within 1e-5 relative, test metrics within 0.01, and the
  same early-stopping decisions (best step), trial by trial."""
  ref, got = _results(reference), _results(workdir)
  for k in trials:
    ref_losses = helpers.scalars(pathlib.Path(reference) / "tb" / f"trial_{k}", "train/loss")
    losses = helpers.scalars(pathlib.Path(workdir) / "tb" / f"trial_{k}", "train/loss")
    np.testing.assert_allclose(losses[:10], ref_losses[:10], rtol=1e-5)
    assert got["trials"][k]["seed"] == ref["trials"][k]["seed"] == k
    assert got["trials"][k]["best_step"] == ref["trials"][k]["best_step"]
    for name, value in ref["trials"][k]["test"].items():
      assert got["trials"][k]["test"][name] == pytest.approx(value, abs=0.01), name


@E2E
@pytest.mark.timeout(1200)
def test_four_packed_trials_equal_four_trials_one_after_another(sequential, packed4):
  _assert_same_trials(sequential, packed4)
  got, alone = _results(packed4), _results(sequential)
  assert [t["cost"]["packed_trials"] for t in got["trials"]] == [4] * 4
  # The packed program does 4 trials' work per step (XLA's count).
  assert got["cost"]["flops_per_step"] == pytest.approx(
      4 * alone["cost"]["flops_per_step"], rel=0.05)
  assert got["cost"]["runs_per_device_hour"] > 0
  for k in range(4):  # each trial's files are where an unpacked trial puts them
    trial = pathlib.Path(packed4) / f"trial_{k}"
    assert (trial / "result.json").is_file() and (trial / "test_predictions.npz").is_file()
    assert list((trial / "ckpt" / "best").iterdir())
    assert "val/gradcam" in helpers.tags(pathlib.Path(packed4) / "tb" / f"trial_{k}")


@E2E
@pytest.mark.timeout(1200)
def test_eight_trials_on_eight_devices_equal_the_same_trials_alone(
    sequential, tmp_path, phantom_dir):
  workdir = tmp_path / "eight"
  out = _train(workdir, phantom_dir, "--config.num_trials=8", "--config.train.pack_trials=8",
               devices=8)
  assert "trial axis of 8 device(s)" in out
  assert len(_results(workdir)["trials"]) == 8
  _assert_same_trials(sequential, workdir)


@E2E
@pytest.mark.timeout(1200)
def test_packed_run_killed_mid_way_resumes_all_trials(packed4, tmp_path, phantom_dir):
  workdir = tmp_path / "killed"
  proc = _train(workdir, phantom_dir, "--config.train.pack_trials=4", wait=False)
  saved = [workdir / f"trial_{k}" / "ckpt" / "latest" / "8" / "medbench_manifest.json"
           for k in range(4)]
  deadline = time.monotonic() + 900
  while not all(p.is_file() for p in saved):
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert time.monotonic() < deadline, "no step-8 checkpoints"
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  assert not (workdir / "results.json").exists()

  out = _train(workdir, phantom_dir, "--config.train.pack_trials=4")
  for k in range(4):
    assert f"Resuming trial {k} from step 8" in out
  ref, got = _results(packed4), _results(workdir)
  for k in range(4):
    assert got["trials"][k]["best_step"] == ref["trials"][k]["best_step"]
    for name, value in ref["trials"][k]["test"].items():
      assert got["trials"][k]["test"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
