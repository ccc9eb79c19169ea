"""Chest X-ray segmentation builders on miniature copies of each publisher's layout.

Masks are drawn on coarse blocks and upsampled, so a nearest-neighbour resize to the
stored size returns exactly the block pattern the test drew.
"""

import csv

import cv2
import numpy as np
import pytest

from medbench_jax.data import splits
from medbench_jax.data.prepare import phantom
from medbench_jax.data.prepare import seg_cxr
from medbench_jax.data.prepare.errors import DataFormatError
from tests import dicom_files
from tests import layouts


def test_montgomery_two_classes_and_union(tmp_path):
  drawn = layouts.montgomery(tmp_path / "raw", np.random.default_rng(0))
  two = layouts.prepare_layout("montgomery_lr", tmp_path / "raw", tmp_path, 16)
  assert two.info.metadata["label_names"] == ["left_lung", "right_lung"]
  assert two.info.metadata["task"] == "segmentation"
  examples = layouts.all_examples(two)
  assert sorted(examples) == sorted(drawn)
  for name, (image, left, right) in drawn.items():
    mask = examples[name]["mask"]
    assert mask.dtype == np.uint8 and mask.shape == (16, 16, 2)
    np.testing.assert_array_equal(mask[..., 0], left)
    np.testing.assert_array_equal(mask[..., 1], right)
    np.testing.assert_array_equal(examples[name]["image"][..., 0],
                                  cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA))
  one = layouts.prepare_layout("montgomery", tmp_path / "raw", tmp_path, 16)
  union = layouts.all_examples(one)
  for name, (_, left, right) in drawn.items():
    np.testing.assert_array_equal(union[name]["mask"][..., 0], left | right)
  # 10 patients (MCUCXR_0001 of MCUCXR_0001_0), split by data/splits.py's rule under the
  # data set's salts: every split holds some, and both variants split alike.
  expected = splits.assign([n.rsplit("_", 1)[0] for n in drawn], seg_cxr.MontgomeryLungs.HOLDOUTS)
  for builder in (two, one):
    for split in splits.SPLITS:
      names = layouts.examples(builder, split)
      assert names and all(expected[n.rsplit("_", 1)[0]] == split for n in names), split


def test_mask_of_another_size_names_the_file(tmp_path):
  rng = np.random.default_rng(1)
  drawn = layouts.montgomery(tmp_path / "raw", rng)
  # An image of the training split, so that skipping it leaves every split some.
  split_of = splits.assign([n.rsplit("_", 1)[0] for n in drawn],
                           seg_cxr.MontgomeryLungs.HOLDOUTS)
  name = next(n for n in drawn if split_of[n.rsplit("_", 1)[0]] == "train")
  bad = tmp_path / "raw" / "MontgomerySet" / "ManualMask" / "rightMask" / f"{name}.png"
  layouts.save_mask(bad, np.ones((20, 32), np.uint8))
  with pytest.raises(DataFormatError,
                     match=rf"mask .*rightMask/{name}.png is 32x20 pixels, expected "
                           rf"32x32 to match image .*{name}.png"):
    layouts.prepare_layout("montgomery", tmp_path / "raw", tmp_path, 16)
  builder = layouts.prepare_layout("montgomery", tmp_path / "raw", tmp_path, 16,
                                   skip_bad=True)
  assert sum(builder.info.metadata["skipped"].values()) == 1
  assert name not in layouts.all_examples(builder)


# ---------------------------------------------------------------- JSRT + SCR


def test_jsrt_scr_folds_inversion_and_structures(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / "raw"
  (root / "All247images").mkdir(parents=True)
  drawn = {}
  for i, fold in enumerate(["fold1"] * 4 + ["fold2"] * 2):
    name = f"JPCLN{i + 1:03d}"
    # A 12-bit ramp: stored gray must be its inversion, 255 * (4095 - v) / 4095.
    raw = (np.arange(2048 * 2048) % 4096).reshape(2048, 2048).astype(">u2")
    raw.tofile(root / "All247images" / f"{name}.IMG")
    structures = {}
    for structure in seg_cxr.SCR_STRUCTURES:
      small, up = layouts.blocks(rng, 32, 32)  # 1024x1024, SCR's mask size
      layouts.save_mask(root / "scratch" / fold / "masks" / structure / f"{name}.gif", up,
                        "GIF")
      structures[structure] = small
    drawn[name] = (fold, structures)
  builder = layouts.prepare_layout("jsrt_scr", root, tmp_path, 32)
  assert builder.info.metadata["label_names"] == [
      "left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]
  test = layouts.examples(builder, "test")
  assert sorted(test) == ["JPCLN005", "JPCLN006"]  # fold2 is the test split
  fold1 = {**layouts.examples(builder, "train"), **layouts.examples(builder, "validation")}
  assert sorted(fold1) == ["JPCLN001", "JPCLN002", "JPCLN003", "JPCLN004"]
  assert layouts.examples(builder, "train") and layouts.examples(builder, "validation")
  examples = layouts.all_examples(builder)
  for name, (_, structures) in drawn.items():
    for k, structure in enumerate(seg_cxr.SCR_STRUCTURES):
      np.testing.assert_array_equal(examples[name]["mask"][..., k], structures[structure])
  full = np.rint((4095 - raw.astype(np.float64)) * 255 / 4095).astype(np.uint8)
  np.testing.assert_array_equal(examples["JPCLN001"]["image"][..., 0],
                                cv2.resize(full, (32, 32), interpolation=cv2.INTER_AREA))
  lungs = layouts.all_examples(layouts.prepare_layout("jsrt_clavicles", root, tmp_path, 32))
  for name, (_, s) in drawn.items():
    np.testing.assert_array_equal(lungs[name]["mask"][..., 0],
                                  s["left clavicle"] | s["right clavicle"])


def test_siim_rle_rows_are_unioned_per_image(tmp_path):
  rng = np.random.default_rng(4)
  root = tmp_path / "raw"
  shape = (24, 32)  # not square: column-major order matters
  rows, expected, images = [], {}, {}
  for i in range(12):
    name = f"1.2.276.0.7230010.3.1.4.{i}"
    images[name] = rng.integers(0, 256, shape, dtype=np.uint8)
    dicom_files.write(root / "dicom-images-train" / f"study{i}" / "series" / f"{name}.dcm",
                      images[name], patient=f"patient{i // 2}")
    if i % 3 == 0:
      rows.append((name, "-1"))
      expected[name] = np.zeros(shape, bool)
    else:
      parts = [rng.random(shape) < 0.1 for _ in range(1 + i % 2)]
      rows += [(name, layouts.mask2rle(p)) for p in parts]
      expected[name] = np.logical_or.reduce(parts)
  # An unlabelled test image has no row: it is not used.
  dicom_files.write(root / "dicom-images-test" / "s" / "t" / "unlabelled.dcm",
                    np.zeros(shape, np.uint8), "patient99")
  with open(root / "train-rle.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["ImageId", " EncodedPixels"])  # the space is in the published header
    writer.writerows((name, " " + rle) for name, rle in rows)
  builder = layouts.prepare_layout("siim_acr_pneumothorax", root, tmp_path, 32)
  examples = layouts.all_examples(builder)
  assert sorted(examples) == sorted(expected)
  for name, mask in expected.items():
    stored = examples[name]["mask"][..., 0]
    np.testing.assert_array_equal(stored, cv2.resize(mask.astype(np.uint8), (32, 32),
                                                     interpolation=cv2.INTER_NEAREST))
  patients = {s: {n.rsplit(".", 1)[1] for n in layouts.examples(builder, s)}
              for s in ("train", "validation", "test")}
  for members in patients.values():  # both images of a patient share a split
    assert all(str(int(i) ^ 1) in members for i in members)
  for split in ("train", "validation", "test"):
    table = builder.label_table(split)
    assert set(table["patient"]) <= {f"patient{i}" for i in range(6)}
    # The label table says which stored masks are not empty.
    np.testing.assert_array_equal(
        table["labels"][:, 0],
        [builder.as_data_source(split)[i]["mask"].any() for i in range(len(table["labels"]))])


def test_phantom_serves_segmentation(tmp_path):
  root = phantom.generate(tmp_path / "phantom", seed=1, num_train=6, num_val=3, num_test=3,
                          image_size=64)
  builder = layouts.prepare_layout("phantom_cxr_seg", root, tmp_path, 64)
  assert builder.info.metadata["label_names"] == list(phantom.MASK_CLASSES)
  example = builder.as_data_source("validation")[0]
  name = example["name"].decode()
  for k, cls in enumerate(phantom.MASK_CLASSES):
    written = cv2.imread(str(root / "masks" / cls / name), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(example["mask"][..., k], written)
  assert example["mask"].max() == 1  # stored as 0/1, not 0/255
