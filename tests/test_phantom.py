"""Tests for the procedural phantom chest X-ray data set."""

from __future__ import annotations

import json
import pathlib
import re

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medbench_jax.data.prepare import phantom
from medbench_jax.data.prepare.phantom import FINDINGS
from medbench_jax.data.prepare.phantom import generate
from medbench_jax.data.prepare.phantom import LESION_CLASSES
from medbench_jax.data.prepare.phantom import MASK_CLASSES
from medbench_jax.data.prepare.phantom import render

CARDIO, NODULE, EFFUSION, PNEUMOTHORAX = range(4)


def _ctr(heart: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
  """Independent CTR: heart span over the span from one lung's outer edge to the other's."""
  hx = np.nonzero(heart)[1]
  lx = np.concatenate([np.nonzero(left)[1], np.nonzero(right)[1]])
  return (hx.max() - hx.min() + 1) / (lx.max() - lx.min() + 1)


@pytest.fixture(scope="module")
def samples() -> list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
  return [render(np.random.default_rng([7, i]), 128) for i in range(600)]


def _labels(samples) -> np.ndarray:
  return np.stack([lab for _, lab, _ in samples])


def test_render_types_and_masks(samples):
  for image, labels, masks in samples[:50]:
    assert image.dtype == np.uint8 and image.shape == (128, 128)
    assert labels.shape == (len(FINDINGS),)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert set(masks) == set(MASK_CLASSES) | set(LESION_CLASSES)
    for name, mask in masks.items():
      assert mask.shape == image.shape and mask.dtype == bool, name
    for name in MASK_CLASSES:
      assert masks[name].any(), name
    assert not (masks["left_lung"] & masks["right_lung"]).any()
    assert not ((masks["left_lung"] | masks["right_lung"]) & masks["heart"]).any()


def test_render_is_deterministic_per_generator():
  a = render(np.random.default_rng([3, 11]))
  b = render(np.random.default_rng([3, 11]))
  c = render(np.random.default_rng([4, 11]))
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
  assert not np.array_equal(a[0], c[0])


def test_pa_orientation(samples):
  # PA view: the patient's left lung is on the image's right, the heart bulges there.
  for _, _, masks in samples[:50]:
    left_x = np.nonzero(masks["left_lung"])[1].mean()
    right_x = np.nonzero(masks["right_lung"])[1].mean()
    assert left_x > right_x
    mid = 0.5 * (left_x + right_x)
    assert np.nonzero(masks["heart"])[1].mean() > mid


def test_prevalence(samples):
  prevalence = _labels(samples).mean(axis=0)
  for name, p in zip(FINDINGS, prevalence):
    assert 0.05 <= p <= 0.30, (name, p)


def test_cardiomegaly_is_ctr_above_half(samples):
  ratios = np.array([_ctr(m["heart"], m["left_lung"], m["right_lung"]) for _, _, m in samples])
  assert np.array_equal(_labels(samples)[:, CARDIO], (ratios > 0.5).astype(np.float32))
  # Continuous spread across the threshold, not two separated clusters.
  assert ((ratios > 0.45) & (ratios <= 0.5)).sum() >= 10
  assert ((ratios > 0.5) & (ratios < 0.55)).sum() >= 10


def test_effusion_more_frequent_with_cardiomegaly(samples):
  labels = _labels(samples)
  with_cardio = labels[labels[:, CARDIO] == 1, EFFUSION].mean()
  without = labels[labels[:, CARDIO] == 0, EFFUSION].mean()
  assert with_cardio > 2 * without


def test_lesion_masks_match_labels(samples):
  for _, labels, masks in samples:
    for index, name in zip((NODULE, EFFUSION, PNEUMOTHORAX), LESION_CLASSES):
      assert bool(labels[index]) == bool(masks[name].any()), name


def test_nodules_lie_inside_lungs(samples):
  positives = 0
  for _, labels, masks in samples:
    if labels[NODULE]:
      positives += 1
      nodule = masks["nodule"]
      lungs = masks["left_lung"] | masks["right_lung"]
      assert (nodule & lungs).sum() >= 0.95 * nodule.sum()
      assert not (nodule & masks["heart"]).any()
      # At least ~4% of the image width across, so it survives downsampling.
      assert nodule.sum() >= np.pi * (0.02 * nodule.shape[1]) ** 2 * 0.8
  assert positives > 0


def test_radiographic_densities(samples):
  for image, labels, masks in samples[:100]:
    img = image.astype(np.float32)
    lungs = masks["left_lung"] | masks["right_lung"]
    assert img[masks["heart"]].mean() > img[lungs].mean() + 20
    if labels[EFFUSION]:
      eff = masks["effusion"]
      assert img[eff].mean() > img[lungs & ~eff].mean()
    if labels[PNEUMOTHORAX]:
      # The pleural space holds air without lung markings: darker than the lung.
      ptx = masks["pneumothorax"]
      side = "left_lung" if (ptx & masks["left_lung"]).any() else "right_lung"
      assert img[ptx].mean() < img[masks[side] & ~ptx].mean()


def _probe_features(image: np.ndarray) -> np.ndarray:
  """Downsampled pixels plus pooled blob/texture energy: generic, mask-free features."""
  x = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
  dog = cv2.GaussianBlur(x, (0, 0), 1.2) - cv2.GaussianBlur(x, (0, 0), 3.0)
  fine = np.abs(cv2.GaussianBlur(x, (0, 0), 0.7) - cv2.GaussianBlur(x, (0, 0), 1.5))
  pooled = [a.reshape(8, 8, 8, 8).max(axis=(1, 3)) for a in (dog, fine)]
  pooled += [a.reshape(8, 8, 8, 8).mean(axis=(1, 3)) for a in (dog, fine)]
  pixels = cv2.resize(x, (32, 32), interpolation=cv2.INTER_AREA)
  return np.concatenate([pixels.ravel()] + [p.ravel() for p in pooled])


def test_findings_are_learnable_by_a_linear_probe(samples):
  features = np.stack([_probe_features(img) for img, _, _ in samples])
  features = (features - features.mean(0)) / (features.std(0) + 1e-6)
  labels = _labels(samples)
  split = 400
  for index, name in enumerate(FINDINGS):
    clf = LogisticRegression(C=0.01, max_iter=3000)
    clf.fit(features[:split], labels[:split, index])
    auc = roc_auc_score(labels[split:, index], clf.decision_function(features[split:]))
    assert auc > 0.7, (name, auc)


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  files = sorted(p for p in root.rglob("*") if p.is_file())
  return {str(p.relative_to(root)): p.read_bytes() for p in files}


SMALL = {"num_train": 6, "num_val": 2, "num_test": 3, "image_size": 64}


def test_generate_layout_and_formats(tmp_path):
  out = generate(tmp_path / "ds", seed=1, **SMALL)
  names = [f"phantom_{i:05d}.png" for i in range(11)]
  for name in names:
    image = cv2.imread(str(out / "images" / name), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    for cls in MASK_CLASSES:
      mask = cv2.imread(str(out / "masks" / cls / name), cv2.IMREAD_UNCHANGED)
      assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}

  line_re = re.compile(rf"^phantom_\d{{5}}\.png( [01]){{{len(FINDINGS)}}}$")
  listed = []
  for split, size in (("train", 6), ("val", 2), ("test", 3)):
    lines = (out / f"phantom_{split}.txt").read_text().splitlines()
    assert len(lines) == size and all(line_re.match(line) for line in lines), lines
    listed += [line.split()[0] for line in lines]
  assert listed == names  # unique across splits, in index order

  # The files carry exactly what render() produces for that index.
  image, labels, masks = render(np.random.default_rng([1, 7]), 64)
  assert np.array_equal(cv2.imread(str(out / "images" / names[7]), cv2.IMREAD_UNCHANGED), image)
  assert (out / "phantom_val.txt").read_text().splitlines()[1] == (
      names[7] + " " + " ".join(str(int(v)) for v in labels))
  heart = cv2.imread(str(out / "masks" / "heart" / names[7]), cv2.IMREAD_UNCHANGED)
  assert np.array_equal(heart > 0, masks["heart"])

  meta = json.loads((out / "phantom_meta.json").read_text())
  assert meta["version"] == phantom.FORMAT_VERSION
  assert meta["seed"] == 1 and meta["image_size"] == 64
  assert (meta["num_train"], meta["num_val"], meta["num_test"]) == (6, 2, 3)
  assert meta["findings"] == list(FINDINGS) and meta["mask_classes"] == list(MASK_CLASSES)
  assert set(meta["prevalence"]) == {"train", "val", "test"}
  for split in ("train", "val", "test"):
    lines = (out / f"phantom_{split}.txt").read_text().splitlines()
    rows = [line.split()[1:] for line in lines]
    expected = np.array(rows, float).mean(axis=0)
    assert np.allclose([meta["prevalence"][split][f] for f in FINDINGS], expected, atol=1e-4)


def test_generate_is_deterministic_and_worker_independent(tmp_path):
  one = _tree_bytes(generate(tmp_path / "a", seed=5, **SMALL))
  again = _tree_bytes(generate(tmp_path / "b", seed=5, **SMALL))
  parallel = _tree_bytes(generate(tmp_path / "c", seed=5, workers=2, **SMALL))
  other = _tree_bytes(generate(tmp_path / "d", seed=6, **SMALL))
  assert one == again == parallel
  assert one.keys() == other.keys()
  assert one["images/phantom_00000.png"] != other["images/phantom_00000.png"]


def test_generate_is_idempotent_and_rejects_other_parameters(tmp_path):
  out = generate(tmp_path / "ds", seed=2, **SMALL)
  image = out / "images" / "phantom_00003.png"
  image.unlink()
  # Complete data set with the same parameters: nothing is regenerated.
  assert generate(tmp_path / "ds", seed=2, **SMALL) == out
  assert not image.exists()
  with pytest.raises(ValueError, match="delete"):
    generate(tmp_path / "ds", seed=3, **SMALL)
  with pytest.raises(ValueError, match="delete"):
    generate(tmp_path / "ds", seed=2, **{**SMALL, "num_test": 4})
  assert phantom.generated_params(out) == {"version": phantom.FORMAT_VERSION, "seed": 2,
                                           **SMALL}
  assert phantom.generated_params(tmp_path / "nothing_here") is None


def test_interrupted_generation_is_redone(tmp_path):
  out = generate(tmp_path / "ds", seed=2, **SMALL)
  reference = _tree_bytes(out)
  # A run killed before the meta file was written leaves partial output behind.
  (out / "phantom_meta.json").unlink()
  (out / "images" / "phantom_00004.png").write_bytes(b"truncated")
  (out / "phantom_test.txt").unlink()
  generate(tmp_path / "ds", seed=2, **SMALL)
  assert _tree_bytes(out) == reference


def test_cardiothoracic_ratio_helper_matches_definition():
  heart = np.zeros((10, 20), bool)
  lungs = np.zeros((10, 20), bool)
  heart[4:6, 8:13] = True      # 5 columns wide
  lungs[2:8, 2:7] = True       # outer edges at columns 2 and 17: 16 wide
  lungs[2:8, 14:18] = True
  assert phantom.cardiothoracic_ratio(heart, lungs) == pytest.approx(5 / 16)
