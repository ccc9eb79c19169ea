"""DRIVE and image + mask folder builders on miniature copies of their layouts."""

import hashlib

import cv2
import numpy as np
import pytest

from medbench_jax.data import prepare
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.errors import Problems
from tests import dicom_files
from tests import layouts


def test_drive_colour_images_vessels_and_fov(tmp_path):
  rng = np.random.default_rng(5)
  root = tmp_path / "raw" / "DRIVE"
  drawn = {}
  for part, numbers in (("training", (21, 22, 23, 24, 25)), ("test", (1, 2))):
    (root / part / "images").mkdir(parents=True)
    for number in numbers:
      stem = f"{number:02d}_{part}"
      bgr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
      cv2.imwrite(str(root / part / "images" / f"{stem}.tif"), bgr)
      vessels, vessels_up = layouts.blocks(rng, 12, 2)
      fov, fov_up = layouts.blocks(rng, 12, 2, p=0.8)
      layouts.save_mask(root / part / "1st_manual" / f"{number:02d}_manual1.gif", vessels_up, "GIF")
      layouts.save_mask(root / part / "mask" / f"{stem}_mask.gif", fov_up, "GIF")
      drawn[stem] = (bgr, vessels, fov)
  builder = layouts.prepare_layout("drive", tmp_path / "raw", tmp_path, 12)
  assert sorted(layouts.examples(builder, "test")) == ["01_test", "02_test"]
  training = {**layouts.examples(builder, "train"), **layouts.examples(builder, "validation")}
  assert sorted(training) == [f"{n}_training" for n in range(21, 26)]
  assert layouts.examples(builder, "train") and layouts.examples(builder, "validation")
  examples = layouts.all_examples(builder)
  for stem, (bgr, vessels, fov) in drawn.items():
    example = examples[stem]
    assert example["image"].shape == (12, 12, 3)
    rgb = cv2.resize(bgr, (12, 12), interpolation=cv2.INTER_AREA)[..., ::-1]
    np.testing.assert_array_equal(example["image"], rgb)
    np.testing.assert_array_equal(example["mask"][..., 0], vessels)
    np.testing.assert_array_equal(example["fov"][..., 0], fov)


def test_drive_validates_on_four_of_the_twenty_training_images(tmp_path):
  """Exactly 20 %: a 20 % hash draw over DRIVE's 20 training images gave one image."""
  root = tmp_path / "DRIVE"
  for part, numbers in (("training", range(21, 41)), ("test", range(1, 21))):
    (root / part / "images").mkdir(parents=True)
    for number in numbers:
      (root / part / "images" / f"{number:02d}_{part}.tif").touch()
  builder = prepare.get_builder("drive", 16, tmp_path / "tfds")
  result = builder.read_records(root, Problems())
  names = {split: [r.name for r in records] for split, records in result.items()}
  assert (len(names["train"]), len(names["validation"]), len(names["test"])) == (16, 4, 20)
  assert set(names["train"]) | set(names["validation"]) == {
      f"{n}_training" for n in range(21, 41)}
  # The images with the smallest sha1("drive:validation:NAME"), the one draw's image among them.
  by_hash = sorted(names["train"] + names["validation"], key=lambda n: hashlib.sha1(
      f"drive:validation:{n}".encode()).digest())
  assert sorted(names["validation"]) == sorted(by_hash[:4])
  assert "31_training" in names["validation"]


def test_generic_folder_with_dicom_images_and_a_missing_mask(tmp_path):
  rng = np.random.default_rng(6)
  root = tmp_path / "raw"
  drawn = {}
  for i in range(6):
    pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    if i % 2:
      dicom_files.write(root / "images" / f"case{i}.dcm", pixels, f"p{i}")
    else:
      (root / "images").mkdir(parents=True, exist_ok=True)
      cv2.imwrite(str(root / "images" / f"case{i}.png"), pixels)
    small, up = layouts.blocks(rng, 8, 2)
    layouts.save_mask(root / "masks" / f"case{i}.png", up)
    drawn[f"case{i}"] = small
  cv2.imwrite(str(root / "images" / "orphan.png"), np.zeros((16, 16), np.uint8))
  with pytest.raises(DataFormatError, match=r"images/orphan.png: no mask "):
    layouts.prepare_layout("segmentation_folder", root, tmp_path, 8)
  examples = layouts.all_examples(layouts.prepare_layout("segmentation_folder", root, tmp_path,
                                                         8, skip_bad=True))
  assert sorted(examples) == sorted(drawn)
  for name, small in drawn.items():
    np.testing.assert_array_equal(examples[name]["mask"][..., 0], small)


def test_busi_merges_every_mask_of_an_image_and_keeps_normal_images(tmp_path):
  rng = np.random.default_rng(7)
  root = tmp_path / "raw" / "Dataset_BUSI_with_GT"
  drawn = {}
  # Named as published; "benign (1)" has two lesions, "normal (1)" none.
  for category, number, lesions in (("benign", 1, 2), ("benign", 10, 1), ("benign", 2, 1),
                                    ("malignant", 1, 1), ("malignant", 2, 3),
                                    ("normal", 1, 0), ("normal", 2, 0)):
    stem = f"{category} ({number})"
    (root / category).mkdir(parents=True, exist_ok=True)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    # Published as 3-channel PNGs of a grey image.
    cv2.imwrite(str(root / category / f"{stem}.png"), np.repeat(gray[..., None], 3, axis=2))
    union = np.zeros((10, 12), np.uint8)
    for k in range(max(lesions, 1)):
      lesion = np.zeros((10, 12), np.uint8)
      if lesions:  # lesions apart from each other
        lesion[3 * k:3 * k + 3, 4 * k:4 * k + 3] = 1
      union |= lesion
      suffix = "_mask" if k == 0 else f"_mask_{k}"
      layouts.save_mask(root / category / f"{stem}{suffix}.png", np.kron(lesion, np.ones(
          (2, 2), np.uint8)))
    drawn[f"{category}/{stem}"] = (gray, np.kron(union, np.ones((2, 2), np.uint8)))
  builder = layouts.prepare_layout("busi", tmp_path / "raw", tmp_path, 12)
  assert builder.info.metadata["label_names"] == ["lesion"]
  examples = layouts.all_examples(builder)
  assert sorted(examples) == sorted(drawn)
  for name, (gray, union) in drawn.items():
    np.testing.assert_array_equal(examples[name]["mask"][..., 0], cv2.resize(
        union, (12, 12), interpolation=cv2.INTER_NEAREST), err_msg=name)
    np.testing.assert_array_equal(examples[name]["image"][..., 0], cv2.resize(
        gray, (12, 12), interpolation=cv2.INTER_AREA), err_msg=name)
  # Three lesions: three separate blobs in the one stored mask.
  assert cv2.connectedComponents(examples["malignant/malignant (2)"]["mask"][..., 0])[0] == 4
  assert examples["normal/normal (1)"]["mask"].max() == 0


def test_busi_image_without_mask_and_mask_without_image_are_reported(tmp_path):
  root = tmp_path / "raw" / "Dataset_BUSI_with_GT" / "benign"
  root.mkdir(parents=True)
  cv2.imwrite(str(root / "benign (1).png"), np.zeros((8, 8), np.uint8))
  layouts.save_mask(root / "benign (2)_mask.png", np.ones((8, 8), np.uint8))
  with pytest.raises(DataFormatError) as error:
    layouts.prepare_layout("busi", tmp_path / "raw", tmp_path, 8)
  assert "benign (1).png: no mask benign (1)_mask.png beside it" in str(error.value)
  assert "benign (2)_mask.png: mask without an image" in str(error.value)
