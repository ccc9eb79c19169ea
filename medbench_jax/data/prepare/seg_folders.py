"""Segmentation sets that come as image and mask folders: DRIVE and any user folder.

Splits (data/splits.py: a salted hash per image):
  drive         test = the official test set; train/validation = 80/20 % of training
  segmentation_folder   70/10/20 % of images
"""

from __future__ import annotations

import pathlib

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare.base import SegmentationBuilder
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.masks import SegRecord


class DriveVessels(SegmentationBuilder):
  """DRIVE retinal vessels: colour images, first observer's masks, camera FOV."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold DRIVE as published (https://drive.grand-challenge.org/):
  training/{images/NN_training.tif, 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif}
  and test/{images/NN_test.tif, 1st_manual/NN_manual1.gif, mask/NN_test_mask.gif}.
  """
  CLASSES = (("vessels", ("1st_manual",)),)
  CHANNELS = 3
  HAS_FOV = True
  OFFICIAL_SPLITS = ("test",)
  HOLDOUTS = splits_lib.holdouts("drive", validation=0.2)

  def _part(self, root: pathlib.Path, part: str, problems: Problems) -> list[SegRecord]:
    records = []
    for path in self.find(root, f"{part}/images/*_{part}.tif", problems):
      number, folder = path.stem.split("_")[0], path.parent.parent
      records.append(self.record(
          path.stem, path, {"1st_manual": folder / "1st_manual" / f"{number}_manual1.gif"},
          fov=folder / "mask" / f"{number}_{part}_mask.gif"))
    return records

  def read_records(self, manual_dir, problems):
    result = splits_lib.split_by_group(self._part(manual_dir, "training", problems),
                                       self.HOLDOUTS)
    result["test"] = self._part(manual_dir, "test", problems)
    return result


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


BUILDERS = {"drive": DriveVessels, "segmentation_folder": SegmentationFolder}
