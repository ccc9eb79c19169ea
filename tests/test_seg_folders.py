"""DRIVE and image + mask folder builders on miniature copies of their layouts."""

import cv2
import numpy as np
import pytest

from medbench_jax.data.prepare.errors import DataFormatError
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
