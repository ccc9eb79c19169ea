"""study/probe.py and the probe CLI: candidates, frozen features against torchvision and
jax.image.resize, pixel sampling, and the probe file the report reads."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from medbench_jax import config_lib
from medbench_jax import tasks
from medbench_jax.data import sources
from medbench_jax.data import transforms
from medbench_jax.study import probe
from medbench_jax.study import report
from medbench_jax.study import transferability
from medbench_jax.trainer import sharding
from medbench_jax.trainer import state as state_lib
from tests import helpers
from tests import parity
from tests import study_sweep


def _tiny(phantom_dir, arg="model=resnet18"):
  return helpers.load_tiny(arg, phantom_dir)


@pytest.fixture(scope="module")
def classification(phantom_dir):
  from medbench_jax.data import prepare
  config = _tiny(phantom_dir)
  prepare.prepare_dataset(config.dataset)
  return config


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory):
  """A torchvision resnet18 (random weights, calibrated BatchNorm) and its state dict
  saved as torchvision publishes it."""
  torch.manual_seed(0)
  model = parity.calibrate_batch_norm(torchvision.models.resnet18(), 64)
  path = tmp_path_factory.mktemp("ckpt") / "resnet18_tv.pth"
  torch.save(model.state_dict(), path)
  return model, str(path)


# ---------------------------------------------------------------- candidates


def test_candidates_parse_model_and_init_at_the_first_slash(tmp_path):
  assert probe.parse_candidates(
      "resnet50/random, resnet50//ckpt/moco.pth,resnet50/dino_student:/c/d.pth,"
      "resnet50/run:workdirs/a/trial_1,resnet50/timm:resnet50.a1_in1k") == [
          probe.Candidate("resnet50", "random"), probe.Candidate("resnet50", "/ckpt/moco.pth"),
          probe.Candidate("resnet50", "dino_student:/c/d.pth"),
          probe.Candidate("resnet50", "run:workdirs/a/trial_1"),
          probe.Candidate("resnet50", "timm:resnet50.a1_in1k")]
  with pytest.raises(ValueError, match="'resnet50' is not MODEL/INIT"):
    probe.parse_candidates("resnet50/random,resnet50")
  with pytest.raises(ValueError, match="listed twice: resnet50/random"):
    probe.parse_candidates("resnet50/random,resnet50/random")
  listing = tmp_path / "candidates.txt"
  listing.write_text("# baseline\nresnet50/random\n\nresnet50//ckpt/moco.pth\nswin\n")
  with pytest.raises(ValueError, match=r"candidates.txt:5: 'swin' is not MODEL/INIT"):
    probe.read_candidates_file(listing)
  listing.write_text("# baseline\nresnet50/random\n\n  resnet50//ckpt/moco.pth\n")
  assert probe.read_candidates_file(listing) == [
      probe.Candidate("resnet50", "random"), probe.Candidate("resnet50", "/ckpt/moco.pth")]


def test_candidate_config_keeps_model_kw_for_the_configs_own_model(phantom_dir):
  config = _tiny(phantom_dir, "model=swin_demo_patch4_window4_128")
  own = probe.candidate_config(config, probe.Candidate(config.model.name, "/c.pth"))
  assert own.model.init == "/c.pth" and own.model.kw.embed_dim == 16
  other = probe.candidate_config(config, probe.Candidate("resnet18", "random"))
  assert other.model.name == "resnet18" and not other.model.kw.to_dict()
  assert config.model.name == "swin_demo_patch4_window4_128" and config.model.init == "random"
  with pytest.raises(ValueError, match="model.name='resnet5'"):
    probe.candidate_config(config, probe.Candidate("resnet5", "random"))


# ---------------------------------------------------------------- pixels


def test_features_at_points_equal_bilinear_upsampling():
  rng = np.random.default_rng(0)
  maps = jnp.asarray(rng.normal(size=(2, 5, 7, 3)), jnp.float32)
  height, width = 18, 29  # not multiples of the map: fractional source positions
  rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  coords = np.stack([rows.ravel(), columns.ravel()], axis=-1)
  points = (coords + 0.5) / np.array([height, width])
  points = jnp.asarray(np.broadcast_to(points, (2,) + points.shape), jnp.float32)
  got = np.asarray(probe.features_at(maps, points))
  expected = np.asarray(jax.image.resize(maps, (2, height, width, 3), "bilinear"))
  np.testing.assert_allclose(got, expected.reshape(2, -1, 3), atol=1e-5)


def test_pixels_are_balanced_inside_the_field_of_view_and_seeded():
  masks = np.zeros((3, 12, 10, 2), np.uint8)
  masks[0, 2:6, 2:5, 0] = 1  # 12 foreground pixels
  masks[0, 4:8, 3:4, 1] = 1  # overlapping the first class: 14 in all
  masks[1, 0, 0, 1] = 1  # one foreground pixel: drawn repeatedly
  fov = np.ones((3, 12, 10, 1), np.uint8)
  fov[:, :, 8:] = 0
  coords = probe.sample_pixels(masks, 20, np.random.default_rng(0), fov)
  assert coords.shape == (3, 20, 2)
  rows = np.arange(3)[:, None]
  foreground = masks[rows, coords[..., 0], coords[..., 1]].any(axis=-1)
  np.testing.assert_array_equal(foreground.sum(axis=1), [10, 10, 0])  # image 2 has none
  assert (fov[rows, coords[..., 0], coords[..., 1], 0] == 1).all()
  assert len({tuple(c) for c in coords[0]}) == 20  # enough pixels: no repeats
  assert (coords[1][foreground[1]] == 0).all()
  np.testing.assert_array_equal(
      coords, probe.sample_pixels(masks, 20, np.random.default_rng(0), fov))
  assert not np.array_equal(coords, probe.sample_pixels(masks, 20, np.random.default_rng(1),
                                                        fov))


# ---------------------------------------------------------------- classification


def _extract(config, candidate, examples=None):
  config = probe.candidate_config(config, candidate)
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  model = state_lib.create_model(config, 0)
  variables = state_lib.init_variables(config, model, 0, 64, config.seed)
  examples = splits.train if examples is None else examples
  step = probe.compiled_step(model, config_lib.NORMALIZATIONS["imagenet"], False,
                             sharding.make_mesh())
  batches = probe.input_batches(config, task, examples, pixels_per_image=1)
  return probe.extract(step, variables, batches, sharding.make_mesh()), examples


def test_features_are_torchvisions_pooled_features_and_deterministic(
    classification, torchvision_resnet18):
  reference, path = torchvision_resnet18
  candidate = probe.Candidate("resnet18", path)
  first, examples = _extract(classification, candidate)
  assert jax.device_count() == 8 and len(examples) == 96
  # 96 examples in eval batches of 16 over 8 devices; rows in source order.
  assert first.features.shape == (96, 512) and first.examples == 96
  np.testing.assert_array_equal(first.groups, np.arange(96))
  np.testing.assert_array_equal(first.targets, [examples[i]["labels"] for i in range(96)])
  second, _ = _extract(classification, candidate)
  np.testing.assert_array_equal(first.features, second.features)

  # torchvision on the same preprocessed images, one at a time, the head removed.
  op = transforms.parse(classification.input.pp_eval)
  mean, std = config_lib.NORMALIZATIONS["imagenet"]
  images = np.stack([op(examples[i], None)["image"] for i in range(96)]) / 255.0
  images = (np.broadcast_to(images, images.shape[:3] + (3,)) - mean) / std
  reference.fc = torch.nn.Identity()
  with torch.no_grad():
    expected = reference.eval()(torch.tensor(images.transpose(0, 3, 1, 2),
                                             dtype=torch.float32)).numpy()
  diff = np.abs(first.features - expected).max()
  print(f"probe features vs torchvision resnet18: max |diff| {diff:.2e} "
        f"(features up to {np.abs(expected).max():.2f})")
  assert diff <= 1e-4 * max(1.0, np.abs(expected).max())


def test_a_random_candidate_is_the_backbone_a_run_starts_from(classification):
  config = probe.candidate_config(classification, probe.Candidate("resnet18", "random"))
  headless = state_lib.init_variables(config, state_lib.create_model(config, 0), 0, 64,
                                      config.seed)
  trained = state_lib.init_variables(config, state_lib.create_model(config, 4), 4, 64,
                                     config.seed)
  flat = lambda v: {k: np.asarray(x) for k, x in
                    jax.tree_util.tree_flatten_with_path(v)[0]}
  headless, trained = flat(headless), flat(trained)
  assert set(trained) - set(headless) and set(headless) < set(trained)  # the fc head
  for key, value in headless.items():
    np.testing.assert_array_equal(value, trained[key])


def test_variables_are_placed_without_device_put(classification, monkeypatch):
  """A candidate's host variables go onto the mesh through sharding.put_replicated, which
  compares nothing across processes (tests/test_evaluate.py counts it in two processes),
  not jax.device_put, which compares every leaf."""
  placed, device_put = [], []
  put_replicated, real_device_put = sharding.put_replicated, jax.device_put
  monkeypatch.setattr(sharding, "put_replicated",
                      lambda tree, mesh: placed.append(tree) or put_replicated(tree, mesh))
  monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: device_put.append(x) or
                      real_device_put(x, *a, **k))
  splits = sources.open_splits(classification.dataset)
  examples = probe.probe_examples(splits.train, 16, seed=0)
  features, _ = _extract(classification, probe.Candidate("resnet18", "random"), examples)
  assert features.features.shape == (16, 512)
  assert len(placed) == 1 and "params" in placed[0]
  assert not [x for x in device_put if isinstance(x, dict) and "params" in x]


def test_max_examples_is_a_seeded_choice_the_same_for_every_candidate(classification):
  splits = sources.open_splits(classification.dataset)
  chosen = probe.probe_examples(splits.train, 30, seed=0)
  assert len(chosen) == 30 and list(chosen.indices) == sorted(set(chosen.indices))
  np.testing.assert_array_equal(chosen.indices,
                                probe.probe_examples(splits.train, 30, seed=0).indices)
  assert chosen[3]["labels"].tolist() == splits.train[int(chosen.indices[3])]["labels"].tolist()
  assert probe.probe_examples(splits.train, 0, seed=0) is splits.train
  assert probe.probe_examples(splits.train, 500, seed=0) is splits.train


def _probe_cli(config_arg, phantom_dir, *flags):
  cmd = [sys.executable, "-m", "medbench_jax.probe", f"--config={config_arg}",
         f"--config.dataset.manual_dir={phantom_dir}", *flags]
  return subprocess.run(cmd, cwd=helpers.REPO, env=helpers.subprocess_env(2),
                        capture_output=True, text=True, timeout=900)


@pytest.mark.e2e
def test_cli_scores_two_candidates_and_the_report_reads_the_file(
    classification, torchvision_resnet18, phantom_dir, tmp_path):
  _, path = torchvision_resnet18
  out = tmp_path / "probe.jsonl"
  proc = _probe_cli("tests/configs/tiny.py:model=resnet18", phantom_dir,
                    f"--candidates=resnet18/random,resnet18/{path}", f"--out={out}",
                    "--max_examples=64")
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [json.loads(line) for line in proc.stdout.splitlines()] == lines
  assert [(r["model"], r["init"]) for r in lines] == [("resnet18", "random"),
                                                      ("resnet18", path)]
  for record in lines:
    assert record["task"] == "classification" and record["dataset"] == "phantom_cxr"
    assert record["label_fraction"] == 1.0 and record["linear_probe_metric"] == "auc"
    assert record["examples"] == record["rows"] == 64 and record["feature_dim"] == 512
    assert np.isfinite(record["logme"]) and 0.0 <= record["linear_probe"] <= 1.0
    seconds = record["seconds"]
    assert set(seconds) == {"load", "features", "logme", "linear_probe", "total"}
    assert seconds["total"] == pytest.approx(sum(seconds.values()) - seconds["total"],
                                             abs=0.01)
  assert lines[0]["logme"] != lines[1]["logme"]
  print("probe CLI:", proc.stderr.strip().splitlines()[-2:])

  # The report puts the scores beside the fine-tuned means of the same candidates.
  runs_dir = tmp_path / "runs"
  for k, init in enumerate(("random", path)):
    workdir = runs_dir / f"run_{k}"
    trials = [study_sweep.classification_trial(workdir, t, t, "phantom_cxr", 0.5 + k)
              for t in range(2)]
    study_sweep.write_results(workdir, task="classification", dataset="phantom_cxr",
                              model="resnet18", init=init, fraction=1.0, trials=trials,
                              num_trials=2)
  report.build(runs_dir, tmp_path / "report", probe=out, num_resamples=0, with_plots=False)
  merged = pd.read_csv(tmp_path / "report" / "probe.csv")
  assert list(merged["init"]) == ["random", path]
  np.testing.assert_allclose(merged["logme"], [r["logme"] for r in lines])
  assert merged["mean"].notna().all() and (merged["n"] == 2).all()

  # Candidates the file holds already are skipped, whatever else is asked.
  assert probe.run(classification, probe.parse_candidates(f"resnet18/{path}"),
                   out=out) == []
  assert len(out.read_text().splitlines()) == 2


def test_a_checkpoint_that_does_not_fit_is_named(classification, torchvision_resnet18):
  _, path = torchvision_resnet18
  with pytest.raises(ValueError, match=r"Checkpoint .*resnet18_tv.pth .*does not fit model "
                     r"resnet34[\s\S]*missing in the checkpoint"):
    probe.run(classification, [probe.Candidate("resnet34", path)])


# ---------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def segmentation(phantom_dir, tmp_path_factory):
  from medbench_jax.data import prepare
  config = _tiny(phantom_dir)
  config.dataset.name = "phantom_cxr_seg"
  config.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.input.pp_eval = "resize(64)"  # the whole image; masks stay at the stored 72 px
  prepare.prepare_dataset(config.dataset)
  return config


def test_segmentation_pixel_features_scores_and_determinism(segmentation):
  splits = sources.open_splits(segmentation.dataset)
  task = tasks.for_dataset(segmentation, splits.info)
  assert task.name == "segmentation" and len(task.class_names) == 4
  config = probe.candidate_config(segmentation, probe.Candidate("resnet18", "random"))
  model = state_lib.create_model(config, 0)
  variables = state_lib.init_variables(config, model, 0, 64, config.seed)
  examples = probe.probe_examples(splits.train, 32, config.seed)
  mesh = sharding.make_mesh()
  step = probe.compiled_step(model, config_lib.NORMALIZATIONS["imagenet"], True, mesh)

  def extract():
    return probe.extract(step, variables, probe.input_batches(config, task, examples, 16),
                         mesh)

  features = extract()
  assert features.features.shape == (32 * 16, 128 + 256)  # resnet18's layer2 + layer3
  assert features.targets.shape == (32 * 16, 4) and features.examples == 32
  np.testing.assert_array_equal(features.groups, np.repeat(np.arange(32), 16))
  # Every phantom image has lungs and background: 8 of each image's 16 pixels in a mask.
  per_image = features.targets.any(axis=1).reshape(32, 16).sum(axis=1)
  np.testing.assert_array_equal(per_image, 8)
  again = extract()
  np.testing.assert_array_equal(features.features, again.features)
  np.testing.assert_array_equal(features.targets, again.targets)

  # The whole candidate, as the CLI runs it.
  record, = probe.run(segmentation, [probe.Candidate("resnet18", "random")],
                      max_examples=32, pixels_per_image=16)
  assert record["task"] == "segmentation" and record["dataset"] == "phantom_cxr_seg"
  assert record["linear_probe_metric"] == "pixel_auc" and record["pixels_per_image"] == 16
  assert record["rows"] == 512 and record["feature_dim"] == 384
  assert record["logme"] == pytest.approx(
      transferability.logme(features.features, features.targets), rel=1e-9)
  assert record["linear_probe"] == pytest.approx(transferability.linear_probe_holdout(
      features.features, features.targets, holdout=probe.HOLDOUT, seed=config.seed,
      groups=features.groups), rel=1e-9)
  print(f"segmentation probe, random resnet18: LogME {record['logme']:.4f}, pixel AUC "
        f"{record['linear_probe']:.4f}, {record['seconds']['total']:.1f} s")
  # Where the phantom's organs are is visible even to random convolutions.
  assert record["linear_probe"] > 0.7
