"""Chest X-ray segmentation sets: Montgomery, JSRT + SCR, SIIM-ACR and the phantom.

Splits the publishers do not give (data/splits.py: a salted hash per patient where
ids exist, per image otherwise; every variant of a set has the same splits):
  montgomery*   70/10/20 % of patients (MCUCXR_0001 of MCUCXR_0001_0.png)
  jsrt_*        test = SCR fold2 (official); train/validation = 80/20 % of SCR fold1
  siim_acr_*    70/10/20 % of patients (DICOM PatientID) with a row in train-rle.csv
  phantom_cxr_seg   the phantom's split lists (phantom_cxr_lungs: both lungs as one class)
"""

from __future__ import annotations

import collections

import numpy as np

from medbench_jax.data import splits as splits_lib
from medbench_jax.data.prepare import dicom
from medbench_jax.data.prepare import phantom
from medbench_jax.data.prepare.base import SegmentationBuilder
from medbench_jax.data.prepare.cxr_lists import PhantomCxr
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.masks import SegRecord
from medbench_jax.data.prepare.parsing import read_csv
from medbench_jax.data.prepare.parsing import read_label_list


class _Montgomery(SegmentationBuilder, skip_registration=True):
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold NLM's Montgomery County set (NLM-MontgomeryCXRSet.zip,
  https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets)
  extracted: CXR_png/*.png and ManualMask/leftMask/*.png, ManualMask/rightMask/*.png
  (the zip's MontgomerySet/ folder above them is fine).
  """
  OFFICIAL_SPLITS = ()
  HOLDOUTS = splits_lib.holdouts("montgomery", validation=0.1, test=0.2)

  def read_records(self, manual_dir, problems):
    records = []
    for path in self.find(manual_dir, "CXR_png/*.png", problems):
      masks = path.parent.parent / "ManualMask"
      # MCUCXR_0001_0.png: patient 0001, TB label 0.
      records.append(self.record(path.stem, path, {
          s: masks / s / path.name for s in ("leftMask", "rightMask")},
          patient=path.stem.rsplit("_", 1)[0]))
    return splits_lib.split_by_group(records, self.HOLDOUTS)


class MontgomeryLungs(_Montgomery):
  """Montgomery County CXR: both lungs as one class."""
  CLASSES = (("lungs", ("leftMask", "rightMask")),)


class MontgomeryLeftRight(_Montgomery):
  """Montgomery County CXR: the patient's left and right lung as two classes."""
  CLASSES = (("left_lung", ("leftMask",)), ("right_lung", ("rightMask",)))


SCR_STRUCTURES = ("left lung", "right lung", "heart", "left clavicle", "right clavicle")


class _JsrtScr(SegmentationBuilder, skip_registration=True):
  """JSRT radiographs with the SCR database's manual masks."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the JSRT images (JPCLN001.IMG ... JPCNN093.IMG, 2048x2048
  12-bit big-endian raw, http://db.jsrt.or.jp/eng.php) anywhere below it, and the SCR
  masks as SCR publishes them (https://www.isi.uu.nl/Research/Databases/SCR/):
  scratch/fold1/masks/{left lung,right lung,heart,left clavicle,right clavicle}/*.gif
  and the same under fold2 (1024x1024 GIFs).
  """
  IMAGE_FORMAT = "jsrt"
  MASK_SCALE = 0.5  # SCR drew its masks on 1024x1024 copies of the 2048x2048 images
  OFFICIAL_SPLITS = ("test",)
  HOLDOUTS = splits_lib.holdouts("jsrt", validation=0.2)

  def read_records(self, manual_dir, problems):
    images = {p.stem: p for p in manual_dir.rglob("*.IMG")}
    masks, fold = collections.defaultdict(dict), {}
    for gif in self.find(manual_dir, "masks/*/*.gif", problems):
      if gif.parent.name in SCR_STRUCTURES:
        masks[gif.stem][gif.parent.name] = gif
        fold[gif.stem] = gif.parent.parent.parent.name  # fold1/masks/heart/X.gif
    bad_folds = sorted(set(fold.values()) - {"fold1", "fold2"})
    if bad_folds:
      problems.fatal(str(manual_dir), f"SCR masks must lie in fold1/masks/ and "
                     f"fold2/masks/, found {bad_folds}")
    by_fold = {"fold1": [], "fold2": []}
    for name in sorted(masks):
      split = "test" if fold[name] == "fold2" else "train"
      where = str(next(iter(masks[name].values())))
      if name not in images:
        problems.add(split, where, f"its JSRT image {name}.IMG is not under {manual_dir}")
        continue
      missing = [s for s in SCR_STRUCTURES if s not in masks[name]]
      if missing:
        problems.add(split, where, f"{name} has no SCR mask for {missing}")
        continue
      if fold[name] in by_fold:
        by_fold[fold[name]].append(self.record(name, images[name], masks[name]))
    result = splits_lib.split_by_group(by_fold["fold1"], self.HOLDOUTS)
    result["test"] = by_fold["fold2"]
    return result


class JsrtLungs(_JsrtScr):
  CLASSES = (("lungs", ("left lung", "right lung")),)


class JsrtHeart(_JsrtScr):
  CLASSES = (("heart", ("heart",)),)


class JsrtClavicles(_JsrtScr):
  CLASSES = (("clavicles", ("left clavicle", "right clavicle")),)


class JsrtScr(_JsrtScr):
  """All five SCR structures, one channel each (they overlap)."""
  CLASSES = tuple((s.replace(" ", "_"), (s,)) for s in SCR_STRUCTURES)


class SiimAcrPneumothorax(SegmentationBuilder):
  """SIIM-ACR Pneumothorax Segmentation (2019), the competition's first-stage release."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the competition's dicom-images-train/ (nested study/series
  folders of <ImageId>.dcm) and train-rle.csv (ImageId, EncodedPixels; several rows
  per image are unioned, -1 is an empty mask). Images without a row (the unlabelled
  test images) are not used.
  """
  CLASSES = (("pneumothorax", ("pneumothorax",)),)
  OFFICIAL_SPLITS = ()
  HOLDOUTS = splits_lib.holdouts("siim_acr_pneumothorax", validation=0.1, test=0.2)

  def read_records(self, manual_dir, problems):
    found = self.find(manual_dir, "train-rle.csv", problems)
    if len(found) > 1:
      problems.fatal(str(manual_dir), f"several train-rle.csv files, keep one: {found}")
    if problems.fatal_errors:
      return {}
    rows = collections.defaultdict(list)
    for where, row in read_csv(found[0], "train", problems, ("ImageId", "EncodedPixels")):
      rows[row["ImageId"].strip()].append((row["EncodedPixels"], where))
    files = {p.stem: p for p in manual_dir.rglob("*.dcm")}
    records = []
    for name, encoded in rows.items():
      if name not in files:
        problems.add("train", encoded[0][1], f"image {name}.dcm is not under {manual_dir}")
        continue
      try:
        patient = dicom.patient_id(files[name]) or ""
      except DataFormatError as e:
        problems.add("train", encoded[0][1], str(e))
        continue
      records.append(SegRecord(name, str(files[name]), np.full(1, np.nan, np.float32),
                               encoded[0][1], patient, rle=tuple(encoded)))
    return splits_lib.split_by_group(records, self.HOLDOUTS)


class PhantomCxrSeg(SegmentationBuilder):
  """The embedded phantom set's anatomy masks (phantom.MASK_CLASSES), its split lists."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = PhantomCxr.MANUAL_DOWNLOAD_INSTRUCTIONS
  CLASSES = tuple((c, (c,)) for c in phantom.MASK_CLASSES)

  def read_records(self, manual_dir, problems):
    result = {}
    for split, list_file in PhantomCxr.SPLIT_FILES.items():
      if not (manual_dir / list_file).exists():
        problems.fatal(str(manual_dir / list_file), "missing split list. "
                       + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        continue
      result[split] = [
          self.record(e.name, manual_dir / "images" / e.name,
                      {c: manual_dir / "masks" / c / e.name for c in phantom.MASK_CLASSES})
          for e in read_label_list(manual_dir / list_file, len(phantom.FINDINGS), problems,
                                   split)]
    return result


class PhantomCxrLungs(PhantomCxrSeg):
  """The phantom's two lungs as one class, like Montgomery's: the segmentation demo."""

  CLASSES = (("lungs", ("left_lung", "right_lung")),)


BUILDERS = {
    "montgomery": MontgomeryLungs,
    "montgomery_lr": MontgomeryLeftRight,
    "jsrt_lungs": JsrtLungs,
    "jsrt_heart": JsrtHeart,
    "jsrt_clavicles": JsrtClavicles,
    "jsrt_scr": JsrtScr,
    "siim_acr_pneumothorax": SiimAcrPneumothorax,
    "phantom_cxr_seg": PhantomCxrSeg,
    "phantom_cxr_lungs": PhantomCxrLungs,
}
