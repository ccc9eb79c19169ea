r"""Class activation maps of a finished classification run on new images.

  python -m medbench_jax.explain --workdir=workdirs/demo --inputs=scans/ --out=cams/
  python -m medbench_jax.explain --workdir=RUN --inputs='scans/**/*.dcm' --out=DIR \
      --method=gradcam++ --classes=Effusion,Nodule --trial=1

--inputs: a folder, a CSV (a `path` column, or the first) or a glob of PNG, JPEG or DICOM
files, read as the run's data set stores images (data/inputs.py) and preprocessed with the
run's evaluation preprocessing (config.input.pp_eval), with trial K's best checkpoint.
--method: gradcam, gradcam++ or occlusion (models/cam.py: target layers per family).
--classes: class names or indices, comma-separated; default each image's top class.

Writes to --out:
  maps.npz        one float32 array per readable input file, keyed by its path as listed:
                  (classes, H, W) in [0, 1] at the file's own resolution (the map of the
                  evaluation crop, placed where the crop lies; 0 outside it)
  overlays/       NNNNN_<file stem>_<class>.png: each map over the file's image
  explain.json    method, trial, class names, per file its classes and overlays, and
                  `problems`: the files that could not be read, with why (they do not stop
                  the batch)
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

# evaluate defines --workdir (a finished run), which explain shares.
from medbench_jax import evaluate
from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tool_flags

# --inputs, --out, --trial and --batch_size are tool_flags', which predict and export share.
_INPUTS, _OUT = tool_flags.INPUTS, tool_flags.OUT
_TRIAL, _BATCH_SIZE = tool_flags.TRIAL, tool_flags.BATCH_SIZE
flags.declare_key_flag("inputs")
flags.declare_key_flag("out")
flags.declare_key_flag("trial")
flags.declare_key_flag("batch_size")
_METHOD = flags.DEFINE_enum("method", "gradcam", ["gradcam", "gradcam++", "occlusion"],
                            "Map method.")
_CLASSES = flags.DEFINE_string("classes", "", "Class names or indices, comma-separated "
                               "(default: each image's top class).")
_ALPHA = flags.DEFINE_float("alpha", 0.4, "Weight of the map's colours over the image.")


def parse_classes(spec: str, class_names: Sequence[str]) -> list[int] | None:
  """`--classes` -> class indices (None: each image's top class); names or indices."""
  if not spec.strip():
    return None
  index = {name: i for i, name in enumerate(class_names)}
  chosen = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    if item in index:
      chosen.append(index[item])
    elif item.isdigit() and int(item) < len(class_names):
      chosen.append(int(item))
    else:
      raise app.UsageError(f"--classes: {item!r} is neither a class of the run "
                           f"{list(class_names)} nor an index below {len(class_names)}.")
  return chosen


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An input as the network sees it, and where that lies in the file's frame."""
  path: str
  image: np.ndarray  # uint8 (h, w, C): after pp_eval
  original: np.ndarray  # uint8 (H, W, C)
  # (top, left, height, width) of the network's input in the stored image, whose shape
  # is `stored_shape`.
  box: tuple[int, int, int, int]
  stored_shape: tuple[int, int]


def prepare(image, pp_op) -> Prepared:
  """Applies the evaluation preprocessing to an inputs.InputImage, and finds where its
  output lies in the stored image by taking each stored pixel's coordinates through the
  same ops (as a mask: nearest-neighbour resizing, the same crops)."""
  h, w = image.stored.shape[:2]
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
  out = pp_op({"image": image.stored, "mask": coords.astype(np.float32)},
              np.random.default_rng(0))
  net, where = out["image"], out["mask"]
  if where.shape[:2] != net.shape[:2]:  # the spec keeps its ops off masks: assume no crop
    box = (0, 0, h, w)
  else:
    top, left = (int(v) for v in where.reshape(-1, 2).min(0))
    bottom, right = (int(v) + 1 for v in where.reshape(-1, 2).max(0))
    box = (top, left, bottom - top, right - left)
  return Prepared(image.path, net, image.original, box, (h, w))


def to_input_resolution(maps: np.ndarray, item: Prepared) -> np.ndarray:
  """(n, h, w) maps of the network's input -> (n, H, W) over the file's own pixels."""
  import cv2
  top, left, height, width = item.box
  frame = np.zeros((len(maps), *item.stored_shape), np.float32)
  for i, m in enumerate(maps):
    frame[i, top:top + height, left:left + width] = cv2.resize(
        m.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
  size = item.original.shape[1::-1]
  return np.clip(np.stack([cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)
                           for f in frame]), 0.0, 1.0)


def explain_files(workdir: str, inputs_spec: str, out_dir: str, *, method: str = "gradcam",
                  classes: str = "", trial: int = 0, batch_size: int = 8, alpha: float = 0.4
                  ) -> dict:
  """Writes maps.npz, overlays/ and explain.json (module docstring); returns the latter."""
  import jax
  import jax.numpy as jnp
  from PIL import Image

  from medbench_jax.data import inputs
  from medbench_jax.data import transforms
  from medbench_jax.data.prepare import registry
  from medbench_jax.data.prepare.errors import DataFormatError
  from medbench_jax.models import cam
  from medbench_jax.trainer import state as state_lib

  run = paths.read_json(paths.as_path(workdir) / "results.json")
  if run["task"] != "classification":
    raise app.UsageError(f"{workdir} is a {run['task']} run; explain maps classifiers.")
  config: ml_collections.ConfigDict = evaluate.run_config(workdir)
  class_names = list(run["class_names"])
  chosen = parse_classes(classes, class_names)
  model = state_lib.create_model(config, len(class_names))
  variables = evaluate.best_variables(config, workdir, trial, len(class_names))
  normalize = state_lib.normalizer(config)
  cam_fn = cam.make_cam_fn(model, normalize, method)
  top_class = jax.jit(lambda v, x: jnp.argmax(model.apply(v, normalize(x), train=False), -1))
  # Classification evaluates with pp_eval (tasks/classification.py, test=False).
  pp_op = transforms.parse(config.input.pp_eval)
  channels = registry.get(config.dataset.name).CHANNELS

  out = pathlib.Path(out_dir)
  (out / "overlays").mkdir(parents=True, exist_ok=True)
  files, problems = inputs.list_inputs(inputs_spec)
  logging.info("explain: %d files, %s, trial %d", len(files), method, trial)
  prepared = []
  for path in files:
    try:
      image = inputs.read_input(path, config.dataset.image_size, channels,
                                config.dataset.keep_aspect)
      prepared.append(prepare(image, pp_op))
    except DataFormatError as e:
      problems.append(inputs.Problem(path, str(e)))
      logging.warning("explain: %s", e)

  maps, record = {}, {}
  for start in range(0, len(prepared), batch_size):
    batch = prepared[start:start + batch_size]
    images = np.stack([p.image for p in batch])
    pad = batch_size - len(batch)  # one compiled shape for every batch
    images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
    if chosen is None:
      per_class = [np.asarray(top_class(variables, images))]
    else:
      per_class = [np.full(batch_size, c) for c in chosen]
    batch_maps = np.stack([np.asarray(cam_fn(variables, images, jnp.asarray(c)))
                           for c in per_class], 1)
    for j, item in enumerate(batch):
      index = start + j
      full = to_input_resolution(batch_maps[j], item)
      maps[item.path] = full
      names = [class_names[int(c[j])] for c in per_class]
      overlays = []
      for name, m in zip(names, full):
        png = f"overlays/{index:05d}_{pathlib.Path(item.path).stem}_{name}.png"
        Image.fromarray(cam.overlay(item.original, m, alpha)).save(out / png)
        overlays.append(png)
      record[item.path] = {"classes": names, "overlays": overlays}
  np.savez_compressed(out / "maps.npz", **maps)
  summary = {"workdir": os.fspath(workdir), "method": method, "trial": trial,
             "class_names": class_names, "files": record,
             "problems": [dataclasses.asdict(p) for p in problems]}
  paths.write_json(out / "explain.json", summary)
  return summary


def main(argv: Sequence[str]) -> None:
  del argv
  for name in ("workdir", "inputs", "out"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required.")
  runtime.start()
  summary = explain_files(flags.FLAGS.workdir, _INPUTS.value, _OUT.value, method=_METHOD.value,
                          classes=_CLASSES.value, trial=_TRIAL.value or 0,
                          batch_size=_BATCH_SIZE.value or 8, alpha=_ALPHA.value)
  print(json.dumps({"out": _OUT.value, "explained": len(summary["files"]),
                    "problems": len(summary["problems"])}))
  runtime.stop()


if __name__ == "__main__":
  app.run(main)
