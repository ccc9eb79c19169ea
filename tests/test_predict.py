"""predict.py: new files read as the run's data set stored them, predicted through the
run's own evaluation step (its test images get evaluate's probabilities), thresholds from
the trials' results, problems listed, segmentation masks at each file's own size."""

import csv
import json

from absl.testing import flagsaver
import cv2
import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import predict
from medbench_jax.data import inputs
from tests import dicom_files
from tests import helpers

CLASSES = ("Cardiomegaly", "Nodule", "Effusion", "Pneumothorax")
# Youden thresholds of the two hand-written trial results: Nodule has one in trial 1
# only, Pneumothorax none (null in both).
THRESHOLDS = ({"Cardiomegaly": 0.3, "Nodule": None, "Effusion": 0.6, "Pneumothorax": None},
              {"Cardiomegaly": 0.5, "Nodule": 0.45, "Effusion": 0.7, "Pneumothorax": None})


def _finished_run(workdir, config, thresholds=None):
  """A run's files as the trainer leaves them, with random weights as the best
  checkpoints: config.json, results.json, trial_K/result.json, trial_K/ckpt/best."""
  from medbench_jax import tasks
  from medbench_jax.data import prepare
  from medbench_jax.data import sources
  from medbench_jax.trainer import checkpoints
  from medbench_jax.trainer import results as results_lib
  from medbench_jax.trainer import state as state_lib
  prepare.prepare_dataset(config.dataset, workers=1)
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  model = state_lib.create_model(config, task.num_outputs)
  size = 64 if task.name == "classification" else config.dataset.image_size
  records = []
  for k in range(config.num_trials):
    variables = state_lib.init_variables(config, model, task.num_outputs, size, seed=k)
    ckpt = checkpoints.Checkpoints(paths.as_path(workdir / f"trial_{k}" / "ckpt"))
    ckpt.save_best(1, dict(variables), {"loss": 0.5})
    ckpt.close()
    record = results_lib.trial_record(seed=k, best_step=1, best_val_loss=0.5 + k,
                                      skipped_updates=0, test_metrics={}, cost={})
    if thresholds:
      record["thresholds"] = {"rule": "youden", "per_class": thresholds[k]}
    paths.write_json(workdir / f"trial_{k}" / "result.json", record)
    records.append(record)
  paths.write_json(workdir / "config.json", config_lib.to_dict(config))
  paths.write_json(workdir / "results.json", {**task.results_fields(), "trials": records})
  return splits, task


def _reference(workdir, config, task, source, test):
  """What evaluate computes: every trial's best checkpoint through the Evaluator."""
  from medbench_jax import weights
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import sharding
  from medbench_jax.trainer import state as state_lib
  mesh = sharding.make_mesh()
  model = state_lib.create_model(config, task.num_outputs)
  evaluator = evaluation.Evaluator.create(
      config, task, lambda v, x, train: model.apply(v, x, train=train),
      state_lib.normalizer(config), sharding.batch_sharding(mesh))
  probs = []
  for k in range(config.num_trials):
    variables = sharding.put_replicated(weights.load(
        config.model.name, f"run:{workdir}/trial_{k}", task.num_outputs, keep_head=True,
        **config.model.kw.to_dict()), mesh)
    probs.append(evaluator.predict(variables, source, test=test)["probs"])
  return probs


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, phantom_dir):
  """Two trials on the phantom, and its test split dumped to PNG (exact for uint8)."""
  config = helpers.load_tiny("workers=0", phantom_dir)
  config.num_trials = 2
  workdir = tmp_path_factory.mktemp("run")
  splits, task = _finished_run(workdir, config, THRESHOLDS)
  images = tmp_path_factory.mktemp("test_images")
  for i in range(len(splits.test)):
    assert cv2.imwrite(str(images / f"{i:03d}.png"), splits.test[i]["image"])
  return workdir, config, splits, task, images


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_on_the_runs_test_images_are_evaluates(classification_run, tmp_path,
                                                             tta):
  workdir, config, splits, task, images = classification_run
  out = tmp_path / "predictions.csv"
  summary = predict.predict(str(workdir), str(images), str(out), tta=tta)
  rows = _rows(out)
  assert summary["predicted"] == len(rows) == len(splits.test) and summary["problems"] == 0
  assert list(rows[0]) == (["path"] + [f"prob/{c}" for c in CLASSES]
                           + [f"label/{c}" for c in CLASSES])
  assert [r["path"] for r in rows] == [str(images / f"{i:03d}.png")
                                       for i in range(len(splits.test))]
  reference = _reference(workdir, config, task, splits.test, test=tta)
  got = np.array([[float(r[f"prob/{c}"]) for c in CLASSES] for r in rows])
  np.testing.assert_allclose(got, np.mean(reference, axis=0), rtol=0, atol=1e-6)
  # The trials differ, so the ensemble is not any one of them.
  assert np.abs(reference[0] - reference[1]).max() > 1e-3
  # Labels at the mean of the trials' thresholds; 0.5 where no trial chose one.
  expected = np.array([0.4, 0.45, 0.65, 0.5])
  labels = np.array([[int(r[f"label/{c}"]) for c in CLASSES] for r in rows])
  np.testing.assert_array_equal(labels, got >= expected)
  chosen = json.loads((tmp_path / "predictions_summary.json").read_text())["thresholds"]
  assert [chosen[c]["value"] for c in CLASSES] == pytest.approx(expected.tolist())
  assert chosen["Pneumothorax"]["source"].startswith("default 0.5")
  assert chosen["Cardiomegaly"]["source"] == "validation (youden): mean of 2 trials"


@pytest.mark.timeout(300)
def test_dicom_jpeg_csv_inputs_and_problems(classification_run, tmp_path):
  """A DICOM of the inverted image as MONOCHROME1 (and one at 16 bits) reads back as the
  image itself; unreadable files are listed and the rest predicted; one trial alone uses
  its own thresholds."""
  workdir, config, splits, task, _ = classification_run
  image = splits.test[0]["image"][..., 0].copy()
  image[0, 0], image[0, 1] = 0, 255  # the full range: the DICOMs' min-max VOI is exact
  folder = tmp_path / "inputs"
  (folder / "sub").mkdir(parents=True)
  cv2.imwrite(str(folder / "a.png"), image)
  cv2.imwrite(str(folder / "b.jpg"), image)
  dicom_files.write(folder / "sub" / "c.dcm", 255 - image, photometric="MONOCHROME1")
  dicom_files.write(folder / "sub" / "d.dcm", image.astype(np.uint16) * 257, bits=16)
  (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image IEND\xaeB`\x82")
  (folder / "truncated.png").write_bytes((folder / "a.png").read_bytes()[:200])
  (folder / "notes.txt").write_text("ignored: not an image suffix")
  listing = tmp_path / "list.csv"
  listing.write_text("Path,comment\n" + "".join(
      f"inputs/{name},x\n" for name in ("a.png", "b.jpg", "sub/c.dcm", "sub/d.dcm",
                                        "bad.png", "truncated.png", "missing.png"))
      + ",empty\n")
  out = tmp_path / "out" / "p.jsonl"
  summary = predict.predict(str(workdir), str(listing), str(out), trials="1")
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
  assert sorted(by_name) == ["a.png", "b.jpg", "c.dcm", "d.dcm"]
  for name in ("c.dcm", "d.dcm"):
    assert [by_name[name][f"prob/{c}"] for c in CLASSES] == pytest.approx(
        [by_name["a.png"][f"prob/{c}"] for c in CLASSES], abs=1e-6)
  problems = _rows(tmp_path / "out" / "p_problems.csv")
  assert sorted(p["path"].rsplit("/", 1)[-1] for p in problems) == [
      "bad.png", "list.csv:9", "missing.png", "truncated.png"]
  reasons = {p["path"].rsplit("/", 1)[-1]: p["reason"] for p in problems}
  assert "truncated PNG" in reasons["truncated.png"]
  assert "does not exist" in reasons["missing.png"]
  assert summary["trials"] == [1] and summary["problems"] == 4
  chosen = summary["thresholds"]
  assert [chosen[c]["value"] for c in CLASSES] == [0.5, 0.45, 0.7, 0.5]
  # A folder is listed recursively, image suffixes only.
  files, _ = inputs.list_inputs(str(folder))
  assert [f.rsplit("/", 1)[-1] for f in files] == [
      "a.png", "b.jpg", "bad.png", "c.dcm", "d.dcm", "truncated.png"]
  assert inputs.list_inputs(str(folder / "sub" / "*.dcm"))[0] == [
      str(folder / "sub" / "c.dcm"), str(folder / "sub" / "d.dcm")]


def test_thresholds_combine_over_the_trials_that_chose_one():
  values, origins = predict.combine_thresholds(
      [{"rule": "f1", "per_class": {"a": 0.2, "b": None}}, None,
       {"rule": "f1", "per_class": {"a": 0.4, "b": 0.9}}], ("a", "b", "c"))
  np.testing.assert_allclose(values, [0.3, 0.9, 0.5])
  assert origins == ["validation (f1): mean of 2 trials", "validation (f1)",
                     "default 0.5: no trial chose one"]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_command_line(classification_run, tmp_path):
  workdir, _, _, _, images = classification_run
  out = helpers.run_module("medbench_jax.predict", f"--workdir={workdir}",
                           f"--inputs={images}/00*.png", f"--out={tmp_path / 'ok.csv'}",
                           "--batch_size=8", "--trials=0")
  assert json.loads(out.strip().splitlines()[-1])["predicted"] == 10
  assert len(_rows(tmp_path / "ok.csv")) == 10


@pytest.mark.timeout(300)
def test_nothing_predicted_exits_with_status_1(classification_run, tmp_path, monkeypatch):
  workdir = classification_run[0]
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "x.png").write_bytes(b"")
  monkeypatch.setattr(predict.runtime, "start", lambda: None)  # this process is set up
  with flagsaver.flagsaver(workdir=str(workdir), inputs=str(tmp_path / "bad"),
                           out=str(tmp_path / "none.csv")):
    with pytest.raises(SystemExit, match="nothing predicted") as exited:
      predict.main([])
  assert exited.value.code != 0  # a message: Python exits with status 1
  assert _rows(tmp_path / "none_problems.csv")[0]["reason"].endswith("is empty")
  assert _rows(tmp_path / "none.csv") == []
  with flagsaver.flagsaver(workdir=str(workdir), inputs=str(tmp_path / "bad"),
                           out=str(tmp_path / "none.txt")):
    with pytest.raises(SystemExit, match=r"predict: --out=.*none.txt: a .csv or .jsonl"):
      predict.main([])


@pytest.mark.timeout(300)
def test_segmentation_masks_at_each_files_own_size(tmp_path_factory, phantom_dir, tmp_path):
  import jax

  from medbench_jax import weights
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import sharding
  from medbench_jax.trainer import state as state_lib
  from tests.configs import tiny_segmentation
  config = tiny_segmentation.get_config("workers=0")
  config.dataset.manual_dir = str(phantom_dir)
  workdir = tmp_path_factory.mktemp("seg_run")
  splits, task = _finished_run(workdir, config)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(4):
    cv2.imwrite(str(images / f"{i}.png"), splits.test[i]["image"])
  big = cv2.resize(splits.test[0]["image"], (50, 40), interpolation=cv2.INTER_CUBIC)
  cv2.imwrite(str(images / "wide.png"), big)
  out = tmp_path / "seg.csv"
  summary = predict.predict(str(workdir), str(images), str(out))
  rows = _rows(out)
  names = task.class_names
  assert list(rows[0]) == (["path"] + [f"mask/{n}" for n in names] + ["overlay"]
                           + [f"fraction/{n}" for n in names])
  assert summary["predicted"] == 5 and summary["masks"] == str(tmp_path / "seg_masks")
  # The task's own predicted masks of the stored images (what its Dice scores).
  mesh = sharding.make_mesh()
  model = state_lib.create_model(config, task.num_outputs)
  apply_fn = lambda v, x, train: model.apply(v, x, train=train)
  variables = sharding.put_replicated(weights.load(
      config.model.name, f"run:{workdir}/trial_0", task.num_outputs, keep_head=True,
      **config.model.kw.to_dict()), mesh)
  evaluator = evaluation.Evaluator.create(config, task, apply_fn, state_lib.normalizer(config),
                                          sharding.batch_sharding(mesh))
  step = task.make_predict(apply_fn, state_lib.normalizer(config))
  masks = evaluation.predict(
      jax.jit(lambda v, b: {"predicted": step(v, b)[1]}), variables,
      evaluator.dataset([splits.test[i] for i in range(4)], pp_spec=task.pp_eval(False)),
      evaluator.data_sharding)["predicted"]
  for i, row in enumerate(rows[:4]):
    for c, name in enumerate(names):
      written = cv2.imread(row[f"mask/{name}"], cv2.IMREAD_UNCHANGED)
      assert written.shape == splits.test[i]["image"].shape[:2]
      np.testing.assert_array_equal(written > 0, masks[i, ..., c] > 0)
      assert float(row[f"fraction/{name}"]) == pytest.approx((written > 0).mean())
    assert cv2.imread(row["overlay"]).shape == splits.test[i]["image"].shape[:2] + (3,)
  wide = rows[4]
  assert wide["path"].endswith("wide.png")
  for name in names:
    assert cv2.imread(wide[f"mask/{name}"], cv2.IMREAD_UNCHANGED).shape == (40, 50)
  assert cv2.imread(wide["overlay"]).shape == (40, 50, 3)
