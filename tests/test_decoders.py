"""prepare/decoders.py: square and keep-aspect stored copies; training crops from the
original pixels, as the reference study takes them."""

import math

import cv2
import numpy as np
from PIL import Image
import pytest
import torchvision.transforms.functional as TF

from medbench_jax.data import prepare
from medbench_jax.data import transforms
from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare import images
from tests import dicom_files
from tests import layouts

LISTS = {"train": "Xray14_train_official.txt", "validation": "Xray14_val_official.txt",
         "test": "Xray14_test_official.txt"}


def _texture(height, width, seed):
  """Detail at every scale down to a few pixels: a 4x smaller copy loses it."""
  noise = np.random.default_rng(seed).normal(size=(height, width)).astype(np.float32)
  blurred = cv2.GaussianBlur(noise, (0, 0), 1.5)
  return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _chestxray14(root, shapes):
  """A ChestX-ray14 layout (the study's lists) with one image of each shape per split."""
  originals = {}
  for list_name, (height, width) in zip(LISTS.values(), shapes):
    name = f"{len(originals):08d}_000.png"
    originals[name] = _texture(height, width, seed=len(originals))
    (root / "images").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / name), originals[name])
    (root / list_name).write_text(f"{name} " + " ".join(["0"] * 14) + "\n")
  return originals


def prepare_aspect(tmp_path, size, name="chestxray14"):
  return prepare.get_builder(name, size, tmp_path / "tfds", keep_aspect=True).prepare_once(
      tmp_path / "raw", workers=1)


def _stored(builder):
  out = {}
  for split in LISTS:
    source = builder.as_data_source(split)
    out.update({source[i]["name"].decode(): source[i]["image"] for i in range(len(source))})
  return out


def test_keep_aspect_stores_originals_that_fit_and_shrinks_the_others(tmp_path):
  originals = _chestxray14(tmp_path / "raw", [(1024, 1024), (600, 900), (1300, 1100)])
  builder = layouts.prepare_layout("chestxray14", tmp_path / "raw", tmp_path, 1024)
  assert builder.builder_config.name == "1024px"  # the square copy is another one
  builder = prepare_aspect(tmp_path, 1024)
  assert builder.builder_config.name == "1024px_aspect"
  stored = _stored(builder)
  first, second, third = sorted(originals)
  np.testing.assert_array_equal(stored[first][..., 0], originals[first])
  np.testing.assert_array_equal(stored[second][..., 0], originals[second])
  # Longer side 1300 -> 1024, the aspect ratio kept, by an area filter.
  assert stored[third].shape == (1024, round(1100 * 1024 / 1300), 1)
  np.testing.assert_array_equal(stored[third][..., 0], cv2.resize(
      originals[third], (stored[third].shape[1], 1024), interpolation=cv2.INTER_AREA))


def test_a_crop_at_scale_008_of_a_1024_px_image_comes_from_its_1024_px_pixels(tmp_path):
  """The reference: RandomResizedCrop(224) on the full-resolution PIL image. Replay its
  box from the generator (torchvision's get_params, by its definition) and crop the
  original with torchvision: the keep-aspect copy gives exactly those pixels; the
  256 px copy upsamples a 72 px crop and does not."""
  originals = _chestxray14(tmp_path / "raw", [(1024, 1024), (64, 64), (64, 64)])
  original = originals[min(originals)]
  full = _stored(prepare_aspect(tmp_path, 1024))[min(originals)]
  small = _stored(layouts.prepare_layout("chestxray14", tmp_path / "raw", tmp_path, 256))[
      min(originals)]
  spec = "random_resized_crop(224, scale=(0.08, 0.08), interpolation='pil_bilinear')"
  crop = transforms.parse(spec)
  for seed in range(3):
    replay = np.random.default_rng(seed)
    area = 1024 * 1024 * replay.uniform(0.08, 0.08)
    aspect = math.exp(replay.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    top, left = int(replay.integers(0, 1024 - h + 1)), int(replay.integers(0, 1024 - w + 1))
    reference = np.asarray(TF.resized_crop(Image.fromarray(original), top, left, h, w,
                                           [224, 224]))
    ours = crop({"image": full}, np.random.default_rng(seed))["image"][..., 0]
    np.testing.assert_array_equal(ours, reference)
    from_small = crop({"image": small}, np.random.default_rng(seed))["image"][..., 0]
    assert np.abs(from_small.astype(int) - reference).mean() > 10


def test_keep_aspect_dicom_keeps_its_shape_and_values(tmp_path):
  root = tmp_path / "raw"
  pixels = np.random.default_rng(0).integers(0, 4096, (40, 56), dtype=np.uint16)
  path = dicom_files.write(root / "stage_2_train_images" / "p0.dcm", pixels, "p0", bits=12)
  for i, list_name in enumerate(("RSNAPneumonia_train.txt", "RSNAPneumonia_val.txt",
                                 "RSNAPneumonia_test.txt")):
    if i:
      dicom_files.write(root / "stage_2_train_images" / f"p{i}.dcm", pixels[:20], f"p{i}",
                        bits=12)
    (root / list_name).write_text(f"p{i}.png {i}\n")
  builder = prepare_aspect(tmp_path, 48, "rsna_pneumonia_study")
  stored = builder.as_data_source("train")[0]["image"]
  gray = dicom.read_gray(path)
  assert stored.shape == (34, 48, 1)  # 40 x 56 within 48
  np.testing.assert_array_equal(stored, dicom.to_uint8(np.clip(
      images.fit_within(gray, 48), 0, 1)))


def test_slots_round_trip_and_reject_what_does_not_fit():
  image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
  slot = images.pack_slot(image, 8)
  assert slot.shape == images.slot_shape(8, 3)
  np.testing.assert_array_equal(images.unpack_slot(slot, 3), image)
  with pytest.raises(ValueError, match="a 4x9 image does not fit a 8 px slot"):
    images.pack_slot(np.zeros((9, 4, 1), np.uint8), 8)


def test_segmentation_and_medmnist_copies_cannot_keep_aspect(tmp_path):
  for name in ("montgomery", "medmnist_chestmnist"):
    with pytest.raises(ValueError, match="stores square images only"):
      prepare.get_builder(name, 64, tmp_path, keep_aspect=True)
