"""Transferability estimates before fine-tuning: frozen features of candidate models on a
task's training split, scored with LogME and a linear probe (transferability.py).

A candidate is a model and an init (anything --config.model.init takes: random, a
checkpoint file, FORMAT:PATH, a convert folder, run:WORKDIR, timm:NAME.TAG). Each is
built and initialised by the trainer's own code (trainer/state.py) from the config with
the model fields replaced, so a random candidate has exactly the backbone trial 0 of a
fine-tuning run would start from. The config's `model.kw` are architecture fields of
the config's own model: they apply to candidates of that model only, the others are
built with their default architecture.

Features are extracted from the training split (the label-fraction subset the run would
train on; `max_examples` caps it with a `config.seed`-seeded random choice, the same for
every candidate) with the deterministic evaluation preprocessing (`input.pp_eval`) and the
run's normalization, in batches of `input.eval_batch_size` over all devices:
  classification  the pooled features (models.create(name, 0)); targets the label
                  columns (multi-label as given, one-hot classes of multi-class sets);
  segmentation    features at `pixels_per_image` sampled pixels per image: the stride-8
                  and stride-16 maps (`feature_maps=True`), upsampled bilinearly to the
                  mask's resolution and read at those pixels, concatenated; the pixels
                  are drawn with a seeded generator, half where any class is present and
                  half where none is (inside the field of view where there is one);
                  targets the mask value of each class at those pixels.
Scores: LogME (mean over target columns), and the linear probe's mean ROC AUC over
target columns on a seeded 25% holdout (for segmentation a pixel-level AUC, holding out
whole images so no image has pixels on both sides).

Each candidate gives one JSON line in the format the report reads (`--probe=FILE`):
{"task", "dataset", "model", "init", "label_fraction", "logme", "linear_probe"}, plus
what it cost and measured: "seconds" {load, features, logme, linear_probe, total},
"examples", "rows" (examples, or sampled pixels), "feature_dim",
"linear_probe_metric" ("auc" or "pixel_auc") and, for segmentation, "pixels_per_image".
Feature seconds include compiling the feature step, which candidates of one architecture
share (the first of them pays for it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbench_jax import config_checks
from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tasks
from medbench_jax.data import pipeline
from medbench_jax.data import sources
from medbench_jax.study import runs
from medbench_jax.study import transferability
from medbench_jax.trainer import evaluation
from medbench_jax.trainer import results as results_lib
from medbench_jax.trainer import sharding
from medbench_jax.trainer import state as state_lib
from medbench_jax.trainer import trials

# Indices into a model's `feature_maps=True` output (strides 4, 8, 16, 32; ViT's four
# blocks share one stride): the stride-8 and stride-16 maps, fine enough to place a pixel
# and deep enough to be pretrained features, as segmentation decoders tap them.
PIXEL_MAPS = (1, 2)
HOLDOUT = 0.25


# ---------------------------------------------------------------- candidates


@dataclasses.dataclass(frozen=True)
class Candidate:
  model: str
  init: str

  def __str__(self) -> str:
    return f"{self.model}/{self.init}"


def parse_candidate(text: str, where: str = "--candidates") -> Candidate:
  """MODEL/INIT; the first "/" ends the model name (model names have none), so an absolute
  checkpoint path reads resnet50//ckpt/moco.pth."""
  model, sep, init = text.strip().partition("/")
  if not sep or not model or not init:
    raise ValueError(f"{where}: {text.strip()!r} is not MODEL/INIT (e.g. resnet50/random, "
                     "resnet50//ckpt/moco_v2.pth, resnet50/run:workdirs/pretrain)")
  return Candidate(model, init)


def parse_candidates(text: str) -> list[Candidate]:
  """Comma-separated MODEL/INIT candidates."""
  return _unique([parse_candidate(part) for part in text.split(",") if part.strip()],
                 "--candidates")


def read_candidates_file(path: str | os.PathLike) -> list[Candidate]:
  """One MODEL/INIT per line; blank lines and lines starting with # are ignored."""
  found = []
  for number, line in enumerate(paths.as_path(path).read_text().splitlines(), start=1):
    if line.strip() and not line.lstrip().startswith("#"):
      found.append(parse_candidate(line, f"{path}:{number}"))
  return _unique(found, str(path))


def _unique(candidates: list[Candidate], where: str) -> list[Candidate]:
  if not candidates:
    raise ValueError(f"{where}: no candidates given")
  repeated = sorted({str(c) for c in candidates if candidates.count(c) > 1})
  if repeated:
    raise ValueError(f"{where}: candidate(s) listed twice: {', '.join(repeated)}")
  return candidates


def candidate_config(config: ml_collections.ConfigDict, candidate: Candidate
                     ) -> ml_collections.ConfigDict:
  """`config` with the candidate's model and init (model.kw kept for the config's own
  model only), checked like a run's config except that a classifier's encoder may score
  a segmentation task (its features at pixels)."""
  result = copy.deepcopy(config)
  result.model.name = candidate.model
  result.model.init = candidate.init
  if candidate.model != config.model.name:
    result.model.kw = ml_collections.ConfigDict()
  config_checks.validate(result, model_fits_task=False)
  return result


# ---------------------------------------------------------------- pixels


def sample_pixels(masks: np.ndarray, count: int, rng: np.random.Generator,
                  fov: np.ndarray | None = None) -> np.ndarray:
  """(B, count, 2) (row, column) of pixels per image of (B, H, W, K) masks.

  Half are drawn where any class is present, half where none is (all from one side
  when the other is empty), only inside the field of view `fov` (B, H, W, 1) where
  given; without replacement unless a side has fewer pixels than it is asked for.
  """
  batch, height, width, _ = masks.shape
  foreground = (masks > 0).any(axis=-1).reshape(batch, -1)
  inside = (np.ones_like(foreground) if fov is None
            else (fov[..., 0] > 0).reshape(batch, -1))
  coords = np.zeros((batch, count, 2), np.int32)
  for b in range(batch):
    sides = [np.flatnonzero(foreground[b] & inside[b]),
             np.flatnonzero(~foreground[b] & inside[b])]
    sides = [s for s in sides if s.size] or [np.arange(height * width)]
    sizes = [count // len(sides) + (i < count % len(sides)) for i in range(len(sides))]
    chosen = np.concatenate([rng.choice(side, size, replace=side.size < size)
                             for side, size in zip(sides, sizes)])
    coords[b] = np.stack(np.divmod(chosen, width), axis=-1)
  return coords


@dataclasses.dataclass(frozen=True)
class PixelSampler:
  """Host step between the input pipeline and the device: a batch of images and masks ->
  images, sampled pixel positions and the masks' values there (grain random_map)."""
  pixels_per_image: int

  def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    if "mask" not in batch:
      raise ValueError(f"The input pipeline's batches hold {sorted(batch)}, no 'mask': "
                       "segmentation probing needs the masks beside the images.")
    masks = batch["mask"]
    coords = sample_pixels(masks, self.pixels_per_image, rng, batch.get("fov"))
    rows = np.arange(len(masks))[:, None]
    # Pixel centres as fractions of the mask's extent: the image the model sees may
    # have another resolution than the mask, but covers the same extent.
    points = (coords + 0.5) / np.array(masks.shape[1:3], np.float32)
    return {"image": batch["image"], "points": points.astype(np.float32),
            "targets": masks[rows, coords[..., 0], coords[..., 1]], "valid": batch["valid"]}


def features_at(maps: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
  """(B, P, C) values of (B, h, w, C) maps at (B, P, 2) points (fractions of the extent),
  bilinear with edge clamping: what upsampling the maps bilinearly to any resolution
  (jax.image.resize) gives at those pixel centres, without materialising it."""
  height, width = maps.shape[1:3]

  def one_image(fmap, rows, columns):
    read = functools.partial(jax.scipy.ndimage.map_coordinates, coordinates=[rows, columns],
                             order=1, mode="nearest")
    return jax.vmap(read, in_axes=-1, out_axes=-1)(fmap)

  return jax.vmap(one_image)(maps.astype(jnp.float32), points[..., 0] * height - 0.5,
                             points[..., 1] * width - 0.5)


# ---------------------------------------------------------------- features


def feature_step(apply_fn: Callable, normalize: Callable, segmentation: bool) -> Callable:
  """(variables, batch) -> {"features", "targets"}: pooled features per image, or with
  `segmentation` the features at each image's sampled points (PixelSampler's batch)."""

  def step(variables: dict, batch: dict) -> dict:
    images = normalize(batch["image"])
    if segmentation:
      maps = apply_fn(variables, images, train=False, feature_maps=True)
      features = jnp.concatenate([features_at(maps[i], batch["points"]) for i in PIXEL_MAPS],
                                 axis=-1)
      return {"features": features, "targets": batch["targets"]}
    features = apply_fn(variables, images, train=False).astype(jnp.float32)
    return {"features": features, "targets": batch["labels"]}

  return step


@dataclasses.dataclass
class Features:
  features: np.ndarray  # (rows, D) float32
  targets: np.ndarray  # (rows, K)
  groups: np.ndarray  # (rows,) the example each row comes from
  examples: int


@functools.cache
def compiled_step(model: nn.Module, normalization: tuple[tuple[float, ...], ...],
                  segmentation: bool, mesh: jax.sharding.Mesh) -> Callable:
  """feature_step jitted over `mesh`, once per architecture (Flax modules compare by
  their fields): candidates that differ only in their init share its compilations.
  `normalization` is (mean, std)."""
  mean, std = normalization
  normalize = functools.partial(pipeline.normalize, mean=mean, std=std)
  data_sharding = sharding.batch_sharding(mesh)
  return jax.jit(feature_step(model.apply, normalize, segmentation),
                 in_shardings=(sharding.replicated(mesh), data_sharding),
                 out_shardings=data_sharding)


def extract(step: Callable, variables: dict, batches: grain.IterDataset,
            mesh: jax.sharding.Mesh) -> Features:
  """Runs the jitted feature step (compiled_step) over every batch, padding dropped."""
  out = evaluation.predict(step, sharding.put_replicated(variables, mesh),
                           batches, sharding.batch_sharding(mesh))
  features, targets = out["features"], out["targets"]
  examples = len(features)
  # Pixel features (N, P, C) become P rows per example.
  per_example = features.shape[1] if features.ndim == 3 else 1
  return Features(features=features.reshape(-1, features.shape[-1]),
                  targets=targets.reshape(-1, targets.shape[-1]),
                  groups=np.repeat(np.arange(examples), per_example), examples=examples)


@dataclasses.dataclass(frozen=True)
class _Selection(Sequence):
  """The examples of `source` at `indices` (picklable for grain workers)."""
  source: Sequence[dict]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.indices[i])]


def probe_examples(train: Sequence[dict], max_examples: int, seed: int) -> Sequence[dict]:
  """The training examples features are taken from: all, or `max_examples` of them
  chosen at random (seeded; kept in source order)."""
  if not max_examples or max_examples >= len(train):
    return train
  chosen = np.sort(np.random.default_rng(seed).choice(len(train), max_examples,
                                                      replace=False))
  return _Selection(train, chosen)


def input_batches(config: ml_collections.ConfigDict, task: tasks.Task,
                  examples: Sequence[dict], pixels_per_image: int) -> grain.IterDataset:
  """Evaluation batches of `examples` for the feature step (pixels sampled for
  segmentation: seeded by config.seed and the batch's position)."""
  sharding.check_batch_size(config.input.eval_batch_size, "input.eval_batch_size")
  batches = pipeline.eval_dataset(
      examples, pp_spec=task.pp_eval(test=False), keys=task.keys,
      local_batch_size=config.input.eval_batch_size // jax.process_count(),
      num_threads=config.input.num_workers, process_index=jax.process_index(),
      process_count=jax.process_count())
  if task.name == "segmentation":
    batches = batches.random_map(PixelSampler(pixels_per_image), seed=config.seed)
  return batches


# ---------------------------------------------------------------- scores


def score(features: Features, seed: int) -> tuple[dict[str, float], dict[str, float]]:
  """({"logme", "linear_probe"}, seconds each) of extracted features."""
  start = time.perf_counter()
  logme = transferability.logme(features.features, features.targets)
  logme_s = time.perf_counter() - start
  start = time.perf_counter()
  probe = transferability.linear_probe_holdout(
      features.features, features.targets, holdout=HOLDOUT, seed=seed,
      groups=features.groups)
  return ({"logme": logme, "linear_probe": probe},
          {"logme": logme_s, "linear_probe": time.perf_counter() - start})


def probe_candidate(config: ml_collections.ConfigDict, candidate: Candidate,
                    splits: Any, task: tasks.Task, mesh: jax.sharding.Mesh, *,
                    max_examples: int = 0, pixels_per_image: int = 64) -> dict[str, Any]:
  """The probe-file record of one candidate (module docstring)."""
  start = time.perf_counter()
  config = candidate_config(config, candidate)
  segmentation = task.name == "segmentation"
  size = trials.input_size(config, task, splits.info.channels)
  model = state_lib.create_model(config, 0)
  variables = state_lib.init_variables(config, model, 0, size, config.seed)
  load_s = time.perf_counter() - start

  start = time.perf_counter()
  normalization = config_lib.normalization(config)
  step = compiled_step(model, (normalization["mean"], normalization["std"]), segmentation,
                       mesh)
  examples = probe_examples(splits.train, max_examples, config.seed)
  features = extract(step, variables, input_batches(config, task, examples,
                                                    pixels_per_image), mesh)
  features_s = time.perf_counter() - start
  logging.info("%s: %d x %d features of %d training examples in %.1f s", candidate,
               *features.features.shape, features.examples, features_s)

  scores, seconds = score(features, config.seed)
  seconds = {"load": load_s, "features": features_s, **seconds}
  seconds["total"] = sum(seconds.values())
  record = {
      "task": task.name, "dataset": config.dataset.name, "model": candidate.model,
      "init": candidate.init, "label_fraction": float(config.dataset.label_fraction),
      **{k: results_lib.json_number(v) for k, v in scores.items()},
      "linear_probe_metric": "pixel_auc" if segmentation else "auc",
      "seconds": {k: round(v, 3) for k, v in seconds.items()},
      "examples": features.examples, "rows": len(features.features),
      "feature_dim": int(features.features.shape[1]),
  }
  if segmentation:
    record["pixels_per_image"] = pixels_per_image
  return record


# ---------------------------------------------------------------- all candidates


def _scored_keys(out: epath.Path | None) -> set[tuple]:
  if out is None or not out.exists():
    return set()
  table = transferability.read_probe_file(out)
  return {tuple(row) for row in table[list(runs.KEY_COLUMNS)].itertuples(index=False)}


def run(config: ml_collections.ConfigDict, candidates: Sequence[Candidate], *,
        out: str | os.PathLike | None = None, max_examples: int = 0,
        pixels_per_image: int = 64) -> list[dict[str, Any]]:
  """Probes every candidate on the prepared data set of `config`; returns the records.

  With `out`, each record is appended to that probe file as soon as it is computed, and
  candidates the file already holds for this task, data set and label fraction are
  skipped (delete their lines to recompute them).
  """
  for candidate in candidates:  # unknown models fail before any work
    candidate_config(config, candidate)
  if pixels_per_image <= 0:
    raise ValueError(f"--pixels_per_image={pixels_per_image} must be positive")
  if max_examples < 0:
    raise ValueError(f"--max_examples={max_examples} must be >= 0 (0: all)")
  out = paths.as_path(out) if out else None  # a local file or gs://...
  splits = sources.open_splits(config.dataset)
  task = tasks.for_dataset(config, splits.info)
  mesh = sharding.make_mesh()
  done = _scored_keys(out)
  records = []
  for candidate in candidates:
    key = (task.name, config.dataset.name, candidate.model, candidate.init,
           float(config.dataset.label_fraction))
    if key in done:
      logging.info("%s is in %s already; skipped.", candidate, out)
      continue
    record = probe_candidate(config, candidate, splits, task, mesh,
                             max_examples=max_examples, pixels_per_image=pixels_per_image)
    logging.info("%s: LogME %s, linear probe %s %s, %.1f s", candidate, record["logme"],
                 record["linear_probe_metric"], record["linear_probe"],
                 record["seconds"]["total"])
    if out is not None and runtime.is_lead():
      line = json.dumps(record) + "\n"
      if paths.is_remote(out):  # a bucket object cannot be appended to: rewritten whole
        paths.write_atomic(out, (out.read_text() if out.exists() else "") + line)
      else:
        with open(out, "a") as f:
          f.write(line)
    records.append(record)
  return records


def format_summary(records: Sequence[dict[str, Any]]) -> str:
  """One line per candidate: scores and seconds, best LogME first."""
  order = sorted(records, key=lambda r: -math.inf if r["logme"] is None else r["logme"],
                 reverse=True)
  return "\n".join(
      f"{r['model']}/{r['init']}: LogME {_number(r['logme'])}, linear probe "
      f"{r['linear_probe_metric']} {_number(r['linear_probe'])} ({r['rows']} rows x "
      f"{r['feature_dim']}, {r['seconds']['total']:.1f} s)" for r in order)


def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"
