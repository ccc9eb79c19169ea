"""Segmentation builders on miniature copies of each publisher's layout.

Masks are drawn on coarse blocks and upsampled, so a nearest-neighbour resize to the
stored size returns exactly the block pattern the test drew.
"""

import csv
import json
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import PIL.Image
import pytest

from medbench_jax.data import builders
from medbench_jax.data import phantom
from medbench_jax.data import segmentation
from tests import dicom_files


def _blocks(rng, size, scale, p=0.4):
  """A random (size, size) 0/1 pattern and its (size*scale)^2 upsampled copy."""
  small = (rng.random((size, size)) < p).astype(np.uint8)
  return small, np.kron(small, np.ones((scale, scale), np.uint8))


def _save_mask(path, mask, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(mask * 255).save(path, format=fmt)


def _prepare(name, manual_dir, tmp_path, size, **kw):
  return builders.prepare(name, manual_dir, tmp_path / "tfds", size, workers=1, **kw)


def _examples(builder, split):
  source = builder.as_data_source(split)
  return {source[i]["name"].decode(): source[i] for i in range(len(source))}


def _all_examples(builder):
  return {n: e for s in ("train", "validation", "test") for n, e in _examples(builder, s).items()}


# ---------------------------------------------------------------- Montgomery


def _montgomery(root, rng, count=10, size=16, scale=2):
  drawn = {}
  for i in range(count):
    name = f"MCUCXR_{i:04d}_{i % 2}"
    image = rng.integers(0, 256, (size * scale, size * scale), dtype=np.uint8)
    (root / "MontgomerySet" / "CXR_png").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "MontgomerySet" / "CXR_png" / f"{name}.png"), image)
    left, left_up = _blocks(rng, size, scale)
    right, right_up = _blocks(rng, size, scale)
    _save_mask(root / "MontgomerySet" / "ManualMask" / "leftMask" / f"{name}.png", left_up)
    _save_mask(root / "MontgomerySet" / "ManualMask" / "rightMask" / f"{name}.png", right_up)
    drawn[name] = (image, left, right)
  return drawn


def test_montgomery_two_classes_and_union(tmp_path):
  drawn = _montgomery(tmp_path / "raw", np.random.default_rng(0))
  two = _prepare("montgomery_lr", tmp_path / "raw", tmp_path, 16)
  assert two.info.metadata["label_names"] == ["left_lung", "right_lung"]
  assert two.info.metadata["task"] == "segmentation"
  examples = _all_examples(two)
  assert sorted(examples) == sorted(drawn)
  for name, (image, left, right) in drawn.items():
    mask = examples[name]["mask"]
    assert mask.dtype == np.uint8 and mask.shape == (16, 16, 2)
    np.testing.assert_array_equal(mask[..., 0], left)
    np.testing.assert_array_equal(mask[..., 1], right)
    np.testing.assert_array_equal(examples[name]["image"][..., 0],
                                  cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA))
  union = _all_examples(_prepare("montgomery", tmp_path / "raw", tmp_path, 16))
  for name, (_, left, right) in drawn.items():
    np.testing.assert_array_equal(union[name]["mask"][..., 0], left | right)
  # 10 patients: 7 / 1 / 2, fixed by the seed whatever the file order.
  assert {s: len(_examples(two, s)) for s in ("train", "validation", "test")} == {
      "train": 7, "validation": 1, "test": 2}


def test_mask_of_another_size_names_the_file(tmp_path):
  rng = np.random.default_rng(1)
  _montgomery(tmp_path / "raw", rng)
  bad = tmp_path / "raw" / "MontgomerySet" / "ManualMask" / "rightMask" / "MCUCXR_0003_1.png"
  _save_mask(bad, np.ones((20, 32), np.uint8))
  with pytest.raises(builders.DataFormatError,
                     match=r"mask .*rightMask/MCUCXR_0003_1.png is 32x20 pixels, expected "
                           r"32x32 to match image .*MCUCXR_0003_1.png"):
    _prepare("montgomery", tmp_path / "raw", tmp_path, 16)
  builder = _prepare("montgomery", tmp_path / "raw", tmp_path, 16, skip_bad=True)
  assert sum(builder.info.metadata["skipped"].values()) == 1
  assert "MCUCXR_0003_1" not in _all_examples(builder)


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
    for structure in segmentation.SCR_STRUCTURES:
      small, up = _blocks(rng, 32, 32)  # 1024x1024, SCR's mask size
      _save_mask(root / "scratch" / fold / "masks" / structure / f"{name}.gif", up, "GIF")
      structures[structure] = small
    drawn[name] = (fold, structures)
  builder = _prepare("jsrt_scr", root, tmp_path, 32)
  assert builder.info.metadata["label_names"] == [
      "left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle"]
  test = _examples(builder, "test")
  assert sorted(test) == ["JPCLN005", "JPCLN006"]  # fold2 is the test split
  assert len(_examples(builder, "train")) == 3 and len(_examples(builder, "validation")) == 1
  examples = _all_examples(builder)
  for name, (_, structures) in drawn.items():
    for k, structure in enumerate(segmentation.SCR_STRUCTURES):
      np.testing.assert_array_equal(examples[name]["mask"][..., k], structures[structure])
  full = np.rint((4095 - raw.astype(np.float64)) * 255 / 4095).astype(np.uint8)
  np.testing.assert_array_equal(examples["JPCLN001"]["image"][..., 0],
                                cv2.resize(full, (32, 32), interpolation=cv2.INTER_AREA))
  lungs = _all_examples(_prepare("jsrt_clavicles", root, tmp_path, 32))
  for name, (_, s) in drawn.items():
    np.testing.assert_array_equal(lungs[name]["mask"][..., 0],
                                  s["left clavicle"] | s["right clavicle"])


def test_jsrt_raw_of_wrong_size_names_the_file(tmp_path):
  (tmp_path / "JPCLN001.IMG").write_bytes(b"\0" * 100)
  with pytest.raises(builders.DataFormatError, match=r"JPCLN001.IMG: 100 bytes; a JSRT image"):
    segmentation.read_jsrt(str(tmp_path / "JPCLN001.IMG"))


# ---------------------------------------------------------------- SIIM-ACR


def _mask2rle(mask):
  """The competition's encoder: column-major runs, gaps relative to the last run's end."""
  flat = mask.T.flatten()
  padded = np.concatenate([[0], flat, [0]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  starts, ends = edges[0::2], edges[1::2]
  pairs, previous_end = [], 0
  for start, end in zip(starts, ends):
    pairs += [start - previous_end, end - start]
    previous_end = end
  return " ".join(str(v) for v in pairs)


def _rle2mask(rle, width, height):
  """mask_functions.rle2mask as the competition published it, then transposed."""
  mask = np.zeros(width * height)
  array = np.asarray([int(x) for x in rle.split()])
  position = 0
  for start, length in zip(array[0::2], array[1::2]):
    position += start
    mask[position:position + length] = 255
    position += length
  return mask.reshape(width, height).T > 0


def test_relative_rle_matches_the_competition_decoder():
  rng = np.random.default_rng(3)
  for shape in ((24, 32), (32, 24), (17, 17)):
    mask = rng.random(shape) < 0.3
    rle = _mask2rle(mask)
    decoded = segmentation.decode_relative_rle(rle, shape, "x.csv:2")
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(decoded, _rle2mask(rle, shape[1], shape[0]))
  assert not segmentation.decode_relative_rle(" -1", (4, 4), "x.csv:3").any()
  with pytest.raises(builders.DataFormatError, match=r"x.csv:4: runs reach pixel 20"):
    segmentation.decode_relative_rle("10 10", (4, 4), "x.csv:4")
  with pytest.raises(builders.DataFormatError, match=r"x.csv:5: EncodedPixels must be pairs"):
    segmentation.decode_relative_rle("3 4 5", (4, 4), "x.csv:5")


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
      rows += [(name, _mask2rle(p)) for p in parts]
      expected[name] = np.logical_or.reduce(parts)
  # An unlabelled test image has no row: it is not used.
  dicom_files.write(root / "dicom-images-test" / "s" / "t" / "unlabelled.dcm",
               np.zeros(shape, np.uint8), "patient99")
  with open(root / "train-rle.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["ImageId", " EncodedPixels"])  # the space is in the published header
    writer.writerows((name, " " + rle) for name, rle in rows)
  builder = _prepare("siim_acr_pneumothorax", root, tmp_path, 32)
  examples = _all_examples(builder)
  assert sorted(examples) == sorted(expected)
  for name, mask in expected.items():
    stored = examples[name]["mask"][..., 0]
    np.testing.assert_array_equal(stored, cv2.resize(mask.astype(np.uint8), (32, 32),
                                                     interpolation=cv2.INTER_NEAREST))
  patients = {s: {n.rsplit(".", 1)[1] for n in _examples(builder, s)}
              for s in ("train", "validation", "test")}
  for members in patients.values():  # both images of a patient share a split
    assert all(str(int(i) ^ 1) in members for i in members)
  for split in ("train", "validation", "test"):
    table = builders.label_table(builder, split)
    assert set(table["patient"]) <= {f"patient{i}" for i in range(6)}
    # The label table says which stored masks are not empty.
    np.testing.assert_array_equal(
        table["labels"][:, 0],
        [builder.as_data_source(split)[i]["mask"].any() for i in range(len(table["labels"]))])


# ---------------------------------------------------------------- DRIVE


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
      vessels, vessels_up = _blocks(rng, 12, 2)
      fov, fov_up = _blocks(rng, 12, 2, p=0.8)
      _save_mask(root / part / "1st_manual" / f"{number:02d}_manual1.gif", vessels_up, "GIF")
      _save_mask(root / part / "mask" / f"{stem}_mask.gif", fov_up, "GIF")
      drawn[stem] = (bgr, vessels, fov)
  builder = _prepare("drive", tmp_path / "raw", tmp_path, 12)
  assert sorted(_examples(builder, "test")) == ["01_test", "02_test"]
  assert len(_examples(builder, "train")) == 4 and len(_examples(builder, "validation")) == 1
  examples = _all_examples(builder)
  for stem, (bgr, vessels, fov) in drawn.items():
    example = examples[stem]
    assert example["image"].shape == (12, 12, 3)
    rgb = cv2.resize(bgr, (12, 12), interpolation=cv2.INTER_AREA)[..., ::-1]
    np.testing.assert_array_equal(example["image"], rgb)
    np.testing.assert_array_equal(example["mask"][..., 0], vessels)
    np.testing.assert_array_equal(example["fov"][..., 0], fov)


# ---------------------------------------------------------------- generic and phantom


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
    small, up = _blocks(rng, 8, 2)
    _save_mask(root / "masks" / f"case{i}.png", up)
    drawn[f"case{i}"] = small
  cv2.imwrite(str(root / "images" / "orphan.png"), np.zeros((16, 16), np.uint8))
  with pytest.raises(builders.DataFormatError, match=r"images/orphan.png: no mask "):
    _prepare("segmentation_folder", root, tmp_path, 8)
  examples = _all_examples(_prepare("segmentation_folder", root, tmp_path, 8, skip_bad=True))
  assert sorted(examples) == sorted(drawn)
  for name, small in drawn.items():
    np.testing.assert_array_equal(examples[name]["mask"][..., 0], small)


def test_phantom_serves_segmentation(tmp_path):
  root = phantom.generate(tmp_path / "phantom", seed=1, num_train=6, num_val=3, num_test=3,
                          image_size=64)
  builder = _prepare("phantom_cxr_seg", root, tmp_path, 64)
  assert builder.info.metadata["label_names"] == list(phantom.MASK_CLASSES)
  example = builder.as_data_source("validation")[0]
  name = example["name"].decode()
  for k, cls in enumerate(phantom.MASK_CLASSES):
    written = cv2.imread(str(root / "masks" / cls / name), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(example["mask"][..., k], written)
  assert example["mask"].max() == 1  # stored as 0/1, not 0/255


@pytest.mark.slow
def test_prepare_cli_prints_split_summaries(tmp_path):
  """python -m medbench_jax.prepare, with worker processes, on a Montgomery miniature."""
  _montgomery(tmp_path / "raw", np.random.default_rng(7), count=20)
  result = subprocess.run(
      [sys.executable, "-m", "medbench_jax.prepare", "--dataset=montgomery_lr",
       f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'tfds'}",
       "--image_size=16", "--workers=2"],
      capture_output=True, text=True, timeout=600,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [line["split"] for line in lines] == ["train", "validation", "test"]
  assert sum(line["examples"] for line in lines) == 20
  # Every drawn mask has some lung: presence (the label table) is 1 everywhere.
  assert all(line["prevalence"] == {"left_lung": 1.0, "right_lung": 1.0} for line in lines)
