"""End to end: config -> phantom data -> grain -> sharded jit loop -> orbax -> results.

In-process runs use the 8 simulated devices from conftest; the multi-process check runs
`python -m medbench_jax.main` as users do. Killing and resuming a run is tested in
test_faults.py (both task kinds); one device against eight, with and without FSDP, in
test_sharding.py.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests import helpers


def _prepared_tiny(phantom_dir):
  from medbench_jax.data import prepare
  config = helpers.load_tiny(manual_dir=phantom_dir)
  prepare.prepare_dataset(config.dataset)
  return config


def test_run_writes_results_checkpoints_and_tensorboard(tmp_path, phantom_dir):
  from medbench_jax.trainer import run
  config = _prepared_tiny(phantom_dir)
  config.train.gradcam_images = 4
  results = run.train_and_evaluate(config, str(tmp_path))

  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["task"] == "classification" and on_disk["metric"] == "mean_auc"
  assert on_disk["dataset"] == "phantom_cxr" and on_disk["init"] == "random"
  assert on_disk["label_fraction"] == 1.0
  (trial,) = on_disk["trials"]
  assert trial["seed"] == 0 and trial["best_step"] > 0
  assert set(trial["test"]) >= {"mean_auc", "auc/Cardiomegaly", "auc/Pneumothorax", "loss",
                                "accuracy"}
  assert on_disk["summary"]["n"] == 1 and on_disk["summary"]["mean"] == pytest.approx(
      trial["test"]["mean_auc"])
  assert on_disk["class_names"] == on_disk["eval_class_names"] == [
      "Cardiomegaly", "Nodule", "Effusion", "Pneumothorax"]
  # Provenance and cost of the run and of the trial.
  provenance, cost = on_disk["provenance"], on_disk["cost"]
  assert provenance["devices"] == {"platform": "cpu", "kind": "cpu", "count": 8,
                                   "processes": 1}
  assert len(provenance["config_sha256"]) == 64 and provenance["weights_sha256"] is None
  assert cost["wall_s"] > 0 and cost["first_step_s"] > 0 and cost["peak_rss_mb"] > 100
  assert cost["train_images_per_s"] > 0 and trial["cost"]["first_step_s"] > 0
  # The figure of merit: runs per device-hour over the 8 devices, XLA's FLOPs of the
  # program that ran; no MFU on a CPU (no published peak).
  assert cost["runs_per_device_hour"] == pytest.approx(3600 / (cost["wall_s"] * 8), rel=0.01)
  assert trial["cost"]["flops_per_step"] > 0 and trial["cost"]["train_steps"] == 11
  assert cost["flops_per_step"] == pytest.approx(trial["cost"]["flops_per_step"])
  assert cost["mfu"] is None
  # The test predictions are saved: the metric recomputes from them.
  with np.load(tmp_path / "trial_0" / "test_predictions.npz") as saved:
    assert list(saved["class_names"]) == on_disk["class_names"]
    assert saved["probs"].shape == saved["labels"].shape == (40, 4)
    test_ids = list(saved["ids"])
    aucs = [roc_auc_score(saved["labels"][:, c], saved["probs"][:, c]) for c in range(4)]
  # Both splits' best-checkpoint predictions carry the examples' names (distinct splits).
  with np.load(tmp_path / "trial_0" / "val_predictions.npz") as validation:
    assert validation["probs"].shape == (40, 4) and len(set(validation["ids"])) == 40
    assert not set(validation["ids"]) & set(test_ids)
  assert len(set(test_ids)) == 40
  assert set(trial["thresholds"]["per_class"]) == set(on_disk["class_names"])
  assert trial["test"]["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == \
      "swin_demo_patch4_window4_128"
  assert list((tmp_path / "trial_0" / "ckpt" / "latest").iterdir())
  assert list((tmp_path / "trial_0" / "ckpt" / "best").iterdir())
  tb = tmp_path / "tb" / "trial_0"
  losses = helpers.scalars(tb, "train/loss")
  assert len(losses) == 12 and all(np.isfinite(losses))  # 2 epochs x 6 steps
  for tag in ("train/lr", "val/loss", "val/mean_auc", "perf/images_per_s",
              "perf/input_wait_fraction", "perf/step_time_s", "test/mean_auc"):
    assert helpers.scalars(tb, tag), tag
  assert {"train/augmented_inputs", "val/gradcam"} <= helpers.tags(tb)

  # A finished workdir is reported, not retrained.
  mtime = (tmp_path / "results.json").stat().st_mtime_ns
  assert run.train_and_evaluate(config, str(tmp_path)) == results
  assert (tmp_path / "results.json").stat().st_mtime_ns == mtime


def test_test_metrics_equal_sklearn_on_gathered_ten_crop_predictions(phantom_dir, tmp_path):
  """Prediction gathering over 8 devices with padding, ten-crop averaging, then AUC."""

  import functools

  import jax

  from medbench_jax import tasks
  from medbench_jax.data import pipeline
  from medbench_jax.data import sources
  from medbench_jax.data import transforms
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import sharding
  from medbench_jax.trainer import state as state_lib
  config = _prepared_tiny(phantom_dir)
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  # The config's tiny Swin: the reference below runs it 400 times, in seconds.
  model = state_lib.create_model(config, 4)
  variables = state_lib.init_variables(config, model, 4, 64, seed=0)
  mean, std = (0.5,) * 3, (0.25,) * 3
  mesh = sharding.make_mesh()
  eval_step = jax.jit(task.make_eval_step(
      model.apply, functools.partial(pipeline.normalize, mean=mean, std=std)))
  ds = pipeline.eval_dataset(splits.test, pp_spec="resize(72)|ten_crop(64)", keys=task.keys,
                             local_batch_size=16, num_threads=2)
  got = evaluation.predict(eval_step, variables, ds, sharding.batch_sharding(mesh))
  assert len(got["probs"]) == len(splits.test) == 40  # 48 slots, 8 of them padding

  # Reference: one image at a time, unsharded, ten crops averaged after the sigmoid.
  labels, probs = [], []
  crop = transforms.parse("resize(72)|ten_crop(64)")
  apply = jax.jit(model.apply)  # compiled once, for one image's ten crops
  for i in range(len(splits.test)):
    ex = splits.test[i]
    x = pipeline.normalize(crop(ex, None)["image"], mean, std)
    p = jax.nn.sigmoid(apply(variables, x)).mean(axis=0)
    labels.append(ex["labels"])
    probs.append(np.asarray(p))
  labels, probs = np.array(labels), np.array(probs)
  # One process: gathered predictions come back in source order, padding removed.
  np.testing.assert_array_equal(got["labels"], labels)
  np.testing.assert_allclose(got["probs"], probs, atol=1e-5)
  result = task.metrics(got)
  for c, name in enumerate(splits.info.class_names):
    if 0 < labels[:, c].sum() < len(labels):
      assert abs(result[f"auc/{name}"] - roc_auc_score(labels[:, c], probs[:, c])) <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_processes_over_loopback_match_one_process(tmp_path, phantom_dir):
  """Multi-host: two processes with 2 devices each (jax.distributed, gloo collectives over
  127.0.0.1) train on the same global batches as one process with 4 devices.

  Each process reads every other example of the shuffled order, so a global batch holds
  the single process's examples; random augmentation is seeded per process-local index,
  so it is replaced by a deterministic resize to compare losses.
  """
  config, steps = f"--config={helpers.TINY}", "--config.train.max_steps=5"
  deterministic = "--config.input.pp_train=resize(64)"
  single = tmp_path / "single"
  helpers.main(single, phantom_dir, config, steps, deterministic, devices=4)
  multi = tmp_path / "multi"
  address = f"--coordinator_address=127.0.0.1:{helpers.free_port()}"
  procs = [helpers.main(multi, phantom_dir, config, steps, deterministic, address,
                        "--num_processes=2", f"--process_id={i}", devices=2, wait=False)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "Devices: 4 (cpu)" in outs[0]
  np.testing.assert_allclose(helpers.scalars(multi / "tb" / "trial_0", "train/loss"),
                             helpers.scalars(single / "tb" / "trial_0", "train/loss"),
                             rtol=1e-4)
  results = [json.loads((d / "results.json").read_text()) for d in (single, multi)]
  np.testing.assert_allclose(results[1]["trials"][0]["test"]["mean_auc"],
                             results[0]["trials"][0]["test"]["mean_auc"], rtol=1e-5)
