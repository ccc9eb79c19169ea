"""Data-set names -> their builders, without importing them.

A leaf module: it imports nothing of the package, and listing names or tasks loads
neither TFDS nor OpenCV, so a config is checked before any data code loads. `get`
imports the family module that holds the builder. A new data set: its builder class
in a family module under data/prepare/ (in that module's BUILDERS), and a row here.
"""

from __future__ import annotations

import importlib

TASKS = ("multi-label", "multi-class", "binary", "segmentation")

_PACKAGE = "medbench_jax.data.prepare"
_MEDMNIST = {
    "pathmnist": "multi-class", "chestmnist": "multi-label", "dermamnist": "multi-class",
    "octmnist": "multi-class", "pneumoniamnist": "binary", "retinamnist": "multi-class",
    "breastmnist": "binary", "bloodmnist": "multi-class", "tissuemnist": "multi-class",
    "organamnist": "multi-class", "organcmnist": "multi-class", "organsmnist": "multi-class",
}
# name -> (family module, task)
_DATASETS: dict[str, tuple[str, str]] = {
    "phantom_cxr": ("cxr_lists", "multi-label"),
    "chestxray14": ("cxr_lists", "multi-label"),
    "chestxray14_nih": ("cxr_lists", "multi-label"),
    "shenzhen_cxr": ("cxr_lists", "binary"),
    "csv_folder": ("csv_folder", "multi-label"),
    "chexpert": ("chexpert", "multi-label"),
    "mimic_cxr_jpg": ("chexpert", "multi-label"),
    "vindr_cxr": ("dicom_sets", "multi-label"),
    "vindr_cxr_any": ("dicom_sets", "multi-label"),
    "vindr_cxr_all": ("dicom_sets", "multi-label"),
    "rsna_pneumonia": ("dicom_sets", "multi-class"),
    "rsna_pneumonia_binary": ("dicom_sets", "binary"),
    **{f"medmnist_{flag}": ("medmnist", task) for flag, task in _MEDMNIST.items()},
    "montgomery": ("seg_cxr", "segmentation"),
    "montgomery_lr": ("seg_cxr", "segmentation"),
    "jsrt_lungs": ("seg_cxr", "segmentation"),
    "jsrt_heart": ("seg_cxr", "segmentation"),
    "jsrt_clavicles": ("seg_cxr", "segmentation"),
    "jsrt_scr": ("seg_cxr", "segmentation"),
    "siim_acr_pneumothorax": ("seg_cxr", "segmentation"),
    "phantom_cxr_seg": ("seg_cxr", "segmentation"),
    "phantom_cxr_lungs": ("seg_cxr", "segmentation"),
    "drive": ("seg_folders", "segmentation"),
    "segmentation_folder": ("seg_folders", "segmentation"),
}


def names() -> list[str]:
  """Every data-set name, sorted."""
  return sorted(_DATASETS)


def _entry(name: str) -> tuple[str, str]:
  if name not in _DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; available: {names()}")
  return _DATASETS[name]


def task_of(name: str) -> str:
  """"multi-label", "multi-class" (one-hot labels), "binary" or "segmentation"."""
  return _entry(name)[1]


def get(name: str) -> type:
  """The builder class (a data/prepare/base.py PreparedBuilder) of a data set."""
  module, _ = _entry(name)
  return importlib.import_module(f"{_PACKAGE}.{module}").BUILDERS[name]
