"""MedMNIST v2 / MedMNIST+: the `.npz` files the medmnist package downloads."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import zipfile

import numpy as np

from medbench_jax.data.prepare.base import ClassificationBuilder
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.images import to_stored
from medbench_jax.data.prepare.parsing import Record


@dataclasses.dataclass(frozen=True)
class MedMnistSubset:
  labels: tuple[str, ...]
  task: str  # "multi-label", "multi-class" (one-hot), "binary" (positive = label 1)
  channels: int


_ORGAN = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
          "liver", "lung-left", "lung-right", "pancreas", "spleen")
MEDMNIST = {
    "pathmnist": MedMnistSubset(("adipose", "background", "debris", "lymphocytes", "mucus",
                                 "smooth muscle", "normal colon mucosa",
                                 "cancer-associated stroma",
                                 "colorectal adenocarcinoma epithelium"), "multi-class", 3),
    "chestmnist": MedMnistSubset(("atelectasis", "cardiomegaly", "effusion", "infiltration",
                                  "mass", "nodule", "pneumonia", "pneumothorax",
                                  "consolidation", "edema", "emphysema", "fibrosis",
                                  "pleural", "hernia"), "multi-label", 1),
    "dermamnist": MedMnistSubset(("actinic keratoses and intraepithelial carcinoma",
                                  "basal cell carcinoma", "benign keratosis-like lesions",
                                  "dermatofibroma", "melanoma", "melanocytic nevi",
                                  "vascular lesions"), "multi-class", 3),
    "octmnist": MedMnistSubset(("choroidal neovascularization", "diabetic macular edema",
                                "drusen", "normal"), "multi-class", 1),
    "pneumoniamnist": MedMnistSubset(("pneumonia",), "binary", 1),
    # Ordinal grades, trained as classes (MedMNIST's own baselines do the same).
    "retinamnist": MedMnistSubset(("0", "1", "2", "3", "4"), "multi-class", 3),
    # Label 1 is "normal, benign", label 0 "malignant".
    "breastmnist": MedMnistSubset(("normal, benign",), "binary", 1),
    "bloodmnist": MedMnistSubset(("basophil", "eosinophil", "erythroblast",
                                  "immature granulocytes", "lymphocyte", "monocyte",
                                  "neutrophil", "platelet"), "multi-class", 3),
    "tissuemnist": MedMnistSubset(("Collecting Duct, Connecting Tubule",
                                   "Distal Convoluted Tubule",
                                   "Glomerular endothelial cells",
                                   "Interstitial endothelial cells", "Leukocytes",
                                   "Podocytes", "Proximal Tubule Segments",
                                   "Thick Ascending Limb"), "multi-class", 1),
    "organamnist": MedMnistSubset(_ORGAN, "multi-class", 1),
    "organcmnist": MedMnistSubset(_ORGAN, "multi-class", 1),
    "organsmnist": MedMnistSubset(_ORGAN, "multi-class", 1),
}
MEDMNIST_SIZES = (28, 64, 128, 224)  # MedMNIST v2 is 28 px; MedMNIST+ adds _64/_128/_224


def _npz_member(archive: zipfile.ZipFile, key: str):
  """Opens `key` of an .npz as a stream: (file object, shape, dtype)."""
  f = archive.open(key + ".npy")
  version = np.lib.format.read_magic(f)
  reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = reader(f)
  if fortran:
    raise DataFormatError(f"{archive.filename}:{key}: Fortran-ordered arrays are not supported")
  return f, shape, dtype


class MedMnist(ClassificationBuilder, skip_registration=True):
  """A MedMNIST v2 / MedMNIST+ subset from the .npz the medmnist package downloads.

  `{flag}.npz` (28 px) or `{flag}_{64,128,224}.npz` with `{split}_images` (N, H, W[, 3])
  uint8 and `{split}_labels` (N, K) for ChestMNIST's 14 labels, else (N, 1) class
  indices. The file closest above the configured image size is used (the largest
  when none is). Multi-class labels are stored one-hot: training uses per-class
  sigmoid BCE for every task (one-vs-rest, as for the multi-label sets) and the
  metric is the mean one-vs-rest AUC, which is MedMNIST's own AUC definition.
  Images are streamed from the archive in chunks (no decode step: the arrays are
  already pixels), so memory stays flat even for tissuemnist_224.
  """

  FLAG = ""
  SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}
  CHUNK = 4096
  CAN_KEEP_ASPECT = False  # the arrays are square already
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  manual_dir must hold the subset's .npz as medmnist downloads it (e.g.
  ~/.medmnist/chestmnist.npz, chestmnist_224.npz; https://zenodo.org/records/10519652).
  """

  def npz_path(self, manual_dir: pathlib.Path, problems: Problems) -> pathlib.Path | None:
    available = {s: manual_dir / (f"{self.FLAG}.npz" if s == 28 else f"{self.FLAG}_{s}.npz")
                 for s in MEDMNIST_SIZES}
    available = {s: p for s, p in available.items() if p.exists()}
    if not available:
      problems.fatal(str(manual_dir / f"{self.FLAG}.npz"),
                     "not found (nor a _64/_128/_224 copy). "
                     + self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip())
      return None
    size = self.builder_config.image_size
    above = [s for s in available if s >= size]
    return available[min(above) if above else max(available)]

  def read_records(self, manual_dir, problems):
    path = self.npz_path(manual_dir, problems)
    if path is None:
      return {}
    self._npz = path
    num = len(self.LABELS)
    image_rank = 4 if self.CHANNELS == 3 else 3
    splits = {}
    with np.load(path) as archive:
      for split, key in self.SPLIT_KEYS.items():
        missing = [k for k in (f"{key}_images", f"{key}_labels") if k not in archive.files]
        if missing:
          problems.fatal(str(path), f"missing array(s) {missing}; it has {archive.files}")
          continue
        with zipfile.ZipFile(path) as z:
          f, shape, dtype = _npz_member(z, f"{key}_images")
          f.close()
        where = f"{path}:{key}_labels"
        raw = archive[f"{key}_labels"]
        if len(shape) != image_rank or dtype != np.uint8:
          problems.fatal(f"{path}:{key}_images", f"expected uint8 images of rank "
                         f"{image_rank}, got {dtype} {shape}")
        if raw.dtype.kind not in "iuf" or raw.ndim != 2 or len(raw) != shape[0]:
          problems.fatal(where, f"expected a numeric (N, K) array with N = {shape[0]} "
                         f"images, got {raw.dtype} {raw.shape}")
        if problems.fatal_errors:
          continue
        records = []
        for i, row in enumerate(raw):
          row_where = f"{where}[{i}]"
          if self.TASK == "multi-class":
            if row.shape != (1,) or not 0 <= row[0] < num or row[0] != int(row[0]):
              problems.add(split, row_where, f"expected one class index in [0, {num}), "
                           f"got {row.tolist()}")
              continue
            labels = np.eye(num, dtype=np.float32)[int(row[0])]
          else:
            if row.shape != (num,) or not np.isin(row, (0, 1)).all():
              problems.add(split, row_where, f"expected {num} labels of 0 or 1, got "
                           f"{row.tolist()}")
              continue
            labels = row.astype(np.float32)
          # path: the row of the images array this record's image is.
          records.append(Record(f"{path.stem}/{key}/{i}", str(i), labels, row_where))
        splits[split] = records
    return splits

  def stage_images(self, split, records, scratch, problems):
    del problems  # read_records checked shapes; the arrays are pixels already
    size, channels = self.builder_config.image_size, self.CHANNELS
    slot_of = {int(r.path): slot for slot, r in enumerate(records)}
    nbytes = size * size * channels
    with zipfile.ZipFile(self._npz) as archive, open(scratch, "wb") as out:
      out.truncate(len(records) * nbytes)
      f, shape, _ = _npz_member(archive, f"{self.SPLIT_KEYS[split]}_images")
      per_image = math.prod(shape[1:])
      with f:
        for start in range(0, shape[0], self.CHUNK):
          count = min(self.CHUNK, shape[0] - start)
          images = np.frombuffer(f.read(count * per_image), np.uint8).reshape(
              (count,) + tuple(shape[1:]))
          for i, image in enumerate(images, start=start):
            if i in slot_of:
              # MedMNIST stores RGB; to_stored expects OpenCV's BGR order.
              image = image[..., ::-1] if channels == 3 else image
              out.seek(slot_of[i] * nbytes)
              out.write(to_stored(image, size, channels).tobytes())


def _medmnist_builder(flag: str, subset: MedMnistSubset) -> type[MedMnist]:
  return type(f"Medmnist{flag.capitalize()}", (MedMnist,), {
      "FLAG": flag, "LABELS": subset.labels, "TASK": subset.task,
      "CHANNELS": subset.channels, "__module__": __name__,
      "__doc__": f"MedMNIST {flag} ({subset.task}, {len(subset.labels)} labels)."})


BUILDERS = {f"medmnist_{flag}": _medmnist_builder(flag, subset)
            for flag, subset in MEDMNIST.items()}
