"""Miniature copies of publishers' layouts and helpers to prepare and read them back.

Every classification image is one flat grey level that identifies its example, so a
test can tell which stored image belongs to which labels.
"""

import csv
import gzip
import pathlib

import cv2
import numpy as np
import PIL.Image

from medbench_jax.data import prepare
from medbench_jax.data.prepare import chexpert
from medbench_jax.data.prepare import phantom


def prepare_layout(name, manual_dir, tmp_path, size=16, *, skip_bad=False, options=None,
                   workers=1):
  """Prepares `manual_dir` as data set `name` into tmp_path/tfds."""
  builder = prepare.get_builder(name, size, tmp_path / "tfds", options)
  return builder.prepare_once(manual_dir, skip_bad=skip_bad, workers=workers)


def image(path: pathlib.Path, value: int, shape=(40, 48)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))


def write_csv(path: pathlib.Path, header, rows, *, gz=False, trailing_comma=False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
    f.write(",".join(header) + ("," if trailing_comma else "") + "\n")
    csv.writer(f, lineterminator="\n").writerows(rows)


def read_split(builder, split):
  """name -> (grey level, labels) of a prepared split."""
  source = builder.as_data_source(split)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    out[ex["name"].decode()] = (int(round(float(ex["image"].mean()))), ex["labels"])
  return out


def assert_labels(got, expected):
  assert sorted(got) == sorted(expected)
  for name, (level, labels) in expected.items():
    assert abs(got[name][0] - level) <= 2, name
    np.testing.assert_array_equal(got[name][1], labels, err_msg=name)


def broken_phantom(tmp_path):
  """A phantom copy with one problem of every kind, each on a known line."""
  manual = tmp_path / "broken"
  phantom.generate(manual, seed=1, num_train=8, num_val=3, num_test=3, image_size=32)
  train = (manual / "phantom_train.txt").read_text().splitlines()
  names = [line.split()[0] for line in train]
  (manual / "images" / names[1]).unlink()  # line 2: missing
  data = (manual / "images" / names[2]).read_bytes()
  (manual / "images" / names[2]).write_bytes(data[:len(data) // 2])  # line 3: truncated
  (manual / "images" / names[3]).write_bytes(b"not an image at all")  # line 4
  train[4] = names[4] + " 0 1"  # line 5: too few fields
  train[5] = names[5] + " 0 1 x 0"  # line 6: not a number
  (manual / "phantom_train.txt").write_text("\n".join(train) + "\n")
  return manual


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(
    chexpert.CHEXPERT_LABELS)


def chexpert_layout(root: pathlib.Path, release="CheXpert-v1.0-small"):
  """train.csv: 40 patients x (frontal + lateral); valid.csv: 2 patients."""
  expected, rng = {}, np.random.default_rng(0)
  for csv_name, folder, patients in (("train.csv", "train", range(1, 41)),
                                     ("valid.csv", "valid", range(64541, 64543))):
    rows = []
    for p in patients:
      for view, kind in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
        path = f"{release}/{folder}/patient{p:05d}/study1/{view}.jpg"
        values = rng.choice(["1.0", "0.0", "-1.0", ""], size=14)
        rows.append([path, "Female", "68", kind, "AP" if kind == "Frontal" else ""]
                    + list(values))
        level = (len(expected) * 7) % 250
        image(root / release / folder / f"patient{p:05d}" / "study1" / f"{view}.jpg", level)
        expected[path] = (level, np.array([float(v) if v else np.nan for v in values],
                                          np.float32), kind == "Frontal")
    write_csv(root / release / csv_name, CHEXPERT_HEADER, rows)
  return expected


def csv_folder_rows(manual, *, patient_of=lambda i: f"P{i}"):
  """Nine images under manual/pics/ and their CSV rows (file, A, B, split, patient)."""
  rows, expected = [], {}
  for i in range(9):
    split = ("train", "val", "test")[i % 3]
    path = f"sub{i % 2}/img_{i}.png"
    labels = np.array([i % 2, (i // 2) % 2], np.float32)
    rows.append([path, str(labels[0]), str(int(labels[1])), split, patient_of(i)])
    image(manual / "pics" / path, 20 + 25 * i)
    expected.setdefault({"val": "validation"}.get(split, split), {})[path] = (
        20 + 25 * i, labels)
  return rows, expected


# ---------------------------------------------------------------- segmentation


def blocks(rng, size, scale, p=0.4):
  """A random (size, size) 0/1 pattern and its (size*scale)^2 upsampled copy.

  A nearest-neighbour resize to `size` returns exactly the pattern.
  """
  small = (rng.random((size, size)) < p).astype(np.uint8)
  return small, np.kron(small, np.ones((scale, scale), np.uint8))


def save_mask(path, mask, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(mask * 255).save(path, format=fmt)


def examples(builder, split):
  source = builder.as_data_source(split)
  return {source[i]["name"].decode(): source[i] for i in range(len(source))}


def all_examples(builder):
  return {n: e for s in ("train", "validation", "test") for n, e in examples(builder, s).items()}


def montgomery(root, rng, count=10, size=16, scale=2):
  drawn = {}
  for i in range(count):
    name = f"MCUCXR_{i:04d}_{i % 2}"
    pixels = rng.integers(0, 256, (size * scale, size * scale), dtype=np.uint8)
    (root / "MontgomerySet" / "CXR_png").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "MontgomerySet" / "CXR_png" / f"{name}.png"), pixels)
    left, left_up = blocks(rng, size, scale)
    right, right_up = blocks(rng, size, scale)
    save_mask(root / "MontgomerySet" / "ManualMask" / "leftMask" / f"{name}.png", left_up)
    save_mask(root / "MontgomerySet" / "ManualMask" / "rightMask" / f"{name}.png", right_up)
    drawn[name] = (pixels, left, right)
  return drawn


def mask2rle(mask):
  """SIIM-ACR's encoder: column-major runs, gaps relative to the last run's end."""
  flat = mask.T.flatten()
  padded = np.concatenate([[0], flat, [0]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  starts, ends = edges[0::2], edges[1::2]
  pairs, previous_end = [], 0
  for start, end in zip(starts, ends):
    pairs += [start - previous_end, end - start]
    previous_end = end
  return " ".join(str(v) for v in pairs)
