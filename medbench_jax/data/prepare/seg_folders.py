"""Segmentation sets that come as image and mask folders: DRIVE, BUSI and any user folder.

Splits (data/splits.py: a salted hash per image):
  drive         test = the official test set; validation = exactly 20 % of the official
                training images (4 of 20), those with the smallest salted hashes
  busi          70/10/20 % of images (the study's USBreast lists are not published)
  segmentation_folder   70/10/20 % of images
"""

from __future__ import annotations

import collections
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare.base import SegmentationBuilder
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.masks import SegRecord


class Busi(SegmentationBuilder):
  """Breast ultrasound images with lesion masks (BUSI; the study's USBreast task).

  Dataset_BUSI_with_GT/{benign,malignant,normal}/NAME.png, with NAME_mask.png and,
  for images with several lesions, NAME_mask_1.png, NAME_mask_2.png, ...: the
  lesion class is the union of an image's masks. Normal images have empty masks
  and are kept. Records are named CATEGORY/NAME.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold Dataset_BUSI_with_GT/ as published (Al-Dhabyani et al. 2020,
  https://scholar.cu.edu.eg/?q=afahmy/pages/dataset): benign/, malignant/ and normal/
  with NAME.png and NAME_mask.png (NAME_mask_1.png, ... for further lesions).
  """
  CLASSES = (("lesion", ("mask",)),)
  OFFICIAL_SPLITS = ()
  HOLDOUTS = splits_lib.holdouts("busi", validation=0.1, test=0.2)
  CATEGORIES = ("benign", "malignant", "normal")
  _MASK_SUFFIX = re.compile(r"_mask(_\d+)?$")

  def read_records(self, manual_dir, problems):
    files = [p for p in self.find(manual_dir, "*.png", problems)
             if p.parent.name in self.CATEGORIES]
    images = [p for p in files if not self._MASK_SUFFIX.search(p.stem)]
    masks_of = collections.defaultdict(list)
    for path in files:
      if self._MASK_SUFFIX.search(path.stem):
        masks_of[path.parent / self._MASK_SUFFIX.sub("", path.stem)].append(path)
    for owner in sorted(set(masks_of) - {p.parent / p.stem for p in images}):
      problems.add("train", str(masks_of[owner][0]), f"mask without an image {owner}.png")
    records = []
    for image in images:
      masks = sorted(masks_of.get(image.parent / image.stem, []))
      if not masks:
        problems.add("train", str(image), f"no mask {image.stem}_mask.png beside it")
        continue
      records.append(SegRecord(
          f"{image.parent.name}/{image.stem}", str(image),
          np.full(len(self.CLASSES), np.nan, np.float32), str(image),
          masks=(tuple(str(m) for m in masks),)))
    if not records and not problems.rows:
      problems.fatal(str(manual_dir), "no BUSI images found. "
                     f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    return splits_lib.split_by_group(records, self.HOLDOUTS)


class DriveVessels(SegmentationBuilder):
  """DRIVE retinal vessels: colour images, first observer's masks, camera FOV.

  Validation takes exactly VALIDATION_SHARE of the 20 official training images: a hash
  draw of 20 % (data/splits.py) is binomial, and over 20 images it gave one validation
  image, too few for early stopping to pick a checkpoint on. 4 images leave 16 to train
  on, one batch of the paper setting's 16.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold DRIVE as published (https://drive.grand-challenge.org/):
  training/{images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif}
  and test/{images/NN_test.tif, 1st_manual/NN_manual1.gif, mask/NN_test_mask.gif}.
  """
  CLASSES = (("vessels", ("1st_manual",)),)
  CHANNELS = 3
  HAS_FOV = True
  OFFICIAL_SPLITS = ("test",)
  VALIDATION_SHARE = 0.2
  VALIDATION_SALT = "drive:validation"
  VERSION = tfds.core.Version("3.1.0")
  RELEASE_NOTES = {
      **SegmentationBuilder.RELEASE_NOTES,
      "3.1.0": "Validation is exactly 4 of the 20 training images (the smallest salted "
               "hashes), not a 20 % hash draw that gave 1."}

  def _part(self, root: pathlib.Path, part: str, problems: Problems) -> list[SegRecord]:
    records = []
    for path in self.find(root, f"{part}/images/*_{part}.tif", problems):
      number, folder = path.stem.split("_")[0], path.parent.parent
      records.append(self.record(
          path.stem, path, {"1st_manual": folder / "1st_manual" / f"{number}_manual1.gif"},
          fov=folder / "mask" / f"{number}_{part}_mask.gif"))
    return records

  def read_records(self, manual_dir, problems):
    training = self._part(manual_dir, "training", problems)
    count = max(1, round(len(training) * self.VALIDATION_SHARE)) if len(training) > 1 else 0
    chosen = set(sorted((r.group for r in training),
                        key=lambda g: splits_lib.salted_hash(self.VALIDATION_SALT, g))[:count])
    return {"train": [r for r in training if r.group not in chosen],
            "validation": [r for r in training if r.group in chosen],
            "test": self._part(manual_dir, "test", problems)}


class SegmentationFolder(SegmentationBuilder):
  """Any binary segmentation set: images/NAME.ext + masks/NAME.ext (mask > 0 is inside)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold images/ and masks/ with one mask per image under the same name
  (extensions may differ: images/a.dcm + masks/a.png); any image format OpenCV reads,
  or DICOM.
  """
  CLASSES = (("foreground", ("mask",)),)
  OFFICIAL_SPLITS = ()
  HOLDOUTS = splits_lib.holdouts("segmentation_folder", validation=0.1, test=0.2)

  def read_records(self, manual_dir, problems):
    masks = {p.stem: p for p in (manual_dir / "masks").glob("*")}
    records = []
    for image in self.find(manual_dir, "images/*", problems):
      if image.stem not in masks:
        problems.add("train", str(image), f"no mask {manual_dir / 'masks' / image.stem}.*")
        continue
      records.append(self.record(image.stem, image, {"mask": masks[image.stem]}))
    return splits_lib.split_by_group(records, self.HOLDOUTS)


BUILDERS = {"drive": DriveVessels, "busi": Busi, "segmentation_folder": SegmentationFolder}
