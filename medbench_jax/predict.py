r"""Predicts new image files with a finished run's best checkpoints.

  python -m medbench_jax.predict --workdir=workdirs/swinb_cxr14 --inputs=scans/ \
      --out=predictions.csv
  python -m medbench_jax.predict --workdir=gs://bucket/run --inputs=list.csv \
      --out=gs://bucket/out/predictions.jsonl --trials=0 --tta

Inputs (`--inputs`, local files: the image readers open local files):
  a folder   every .png, .jpg, .jpeg, .dcm and .dicom file below it (recursively), sorted;
  a CSV      a file ending in .csv whose column `path` (or `image`, `file`, `filename`,
             `image_path`, `Path`; matched in that order, case ignored) names the files,
             relative to the CSV's folder unless absolute;
  a glob     e.g. 'scans/**/*.dcm' (`**` crosses folders); or a single file.
Each file is read as the run's data set was stored: PNG and JPEG through OpenCV, DICOM
(by its suffix) through the display pipeline (modality LUT, the file's VOI window,
MONOCHROME1 inverted, any bit depth), then resized to the stored size
(`config.dataset.image_size`, square or within it with `dataset.keep_aspect`), all by the
data package's own decoder (data/inputs.py, as explain reads them). Then the run's evaluation
preprocessing (`input.pp_eval`; `input.pp_test` with `--tta` where the run tested with
test-time augmentation) and normalisation run in the same jitted evaluation step as
`evaluate` and the trainer's test (trainer/evaluation.py), so a run's own stored test
images get the probabilities the run's test computed.

Output (`--out`, .csv or .jsonl, local or gs://), one row per file predicted:
  classification  `path`, `prob/<class>` per class, `label/<class>` (0/1) per class;
  segmentation    `path`, `mask/<class>` (a 0/255 PNG per class at the file's own size)
                  and `overlay` (the prediction in red over the image, PNG), both in the
                  folder OUT_masks/ beside the output, and `fraction/<class>`, the
                  predicted foreground fraction of the image.
Beside it: OUT_problems.csv (`path`, `reason`: files that could not be read, which never
stop the others) and OUT_summary.json (run, trials, thresholds and where each came from,
counts).

Trials and thresholds: `--trials=all` (default) averages the probabilities of every trial
(an ensemble); `--trials=K` (or `K,L,...`) uses those trials. A label is 1 where the
probability is at least the class's threshold: the one each trial chose on validation
(`thresholds.per_class` of trial_K/result.json, Youden's J unless configured otherwise);
for several trials the mean of the trials' thresholds, over the trials that chose one. A
class no trial chose a threshold for, or a run whose results have none, gets 0.5, and the
log and OUT_summary.json say so. Segmentation masks are the study's: sigmoid
probabilities at 0.5 (softmax runs: the most probable class), after the probability map
is resized back to the file's own size (bilinear).

Exit status: 0 when at least one file was predicted; 1 when none was (no input matched,
or every file was unreadable: the problems file says why).
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

# evaluate defines --workdir (a finished run), which predict shares.
from medbench_jax import evaluate
from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tool_flags
from medbench_jax.data import inputs as inputs_lib

# --inputs, --out and --batch_size are tool_flags', which explain and export share.
_INPUTS, _OUT, _BATCH_SIZE = tool_flags.INPUTS, tool_flags.OUT, tool_flags.BATCH_SIZE
flags.declare_key_flag("inputs")
flags.declare_key_flag("out")
flags.declare_key_flag("batch_size")
_TRIALS = flags.DEFINE_string("trials", "all", "'all' (the trials' mean probability) or "
                              "trial indices, e.g. '0' or '0,2'.")
_TTA = flags.DEFINE_bool("tta", False, "Test-time augmentation as the run tested "
                         "(input.pp_test where train.test_tta).")

DEFAULT_THRESHOLD = 0.5
# Batches decoded and predicted at a time; progress is logged after each such chunk.
BATCHES_PER_CHUNK = 8


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Predictor:
  """A finished run's chosen trials, ready to predict decoded images."""
  workdir: str
  config: ml_collections.ConfigDict
  task: Any  # tasks.base.Task
  evaluator: Any  # trainer.evaluation.Evaluator
  trials: tuple[int, ...]
  variables: list[dict]
  # A file as the data set stored it: inputs_lib.read_stored's size, channels and keep_aspect.
  image_size: int
  channels: int
  keep_aspect: bool
  thresholds: np.ndarray  # (K,) float
  threshold_sources: list[str]  # per class: where its threshold came from
  step: Any = None  # segmentation: the jitted (variables, batch) -> {"probs"} step

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.task.class_names

  @property
  def segmentation(self) -> bool:
    return self.task.name == "segmentation"

  @classmethod
  def load(cls, workdir: str, trials: str = "all", batch_size: int = 0) -> Predictor:
    """The run in `workdir` (its results.json, config.json and best checkpoints)."""
    import jax

    from medbench_jax import tasks
    from medbench_jax.data import prepare
    from medbench_jax.data import sources
    from medbench_jax.trainer import evaluation
    from medbench_jax.trainer import sharding
    from medbench_jax.trainer import state as state_lib
    results = paths.as_path(workdir) / "results.json"
    if not results.exists():
      raise FileNotFoundError(f"{results} does not exist: --workdir must be a finished run.")
    run = paths.read_json(results)
    config = evaluate.run_config(workdir)
    if batch_size:
      config.input.eval_batch_size = batch_size
    if config.input.eval_batch_size % jax.device_count():
      raise ValueError(f"--batch_size={config.input.eval_batch_size} is not a multiple of "
                       f"the {jax.device_count()} devices.")
    chosen = _choose_trials(trials, len(run["trials"]))
    d = config.dataset
    info = evaluate.run_info(sources.dataset_info(d, prepare.builder_for(d)), run)
    task = tasks.for_dataset(config, info)
    mesh = sharding.make_mesh()
    model = state_lib.create_model(config, task.num_outputs)
    apply_fn = lambda variables, x, train: model.apply(variables, x, train=train)
    normalize = state_lib.normalizer(config)
    evaluator = evaluation.Evaluator.create(config, task, apply_fn, normalize,
                                            sharding.batch_sharding(mesh))
    variables = [sharding.put_replicated(
        evaluate.best_variables(config, workdir, k, task.num_outputs), mesh) for k in chosen]
    if task.name == "segmentation":
      thresholds = np.full(len(task.class_names), DEFAULT_THRESHOLD)
      origins = ["segmentation: 0.5 (the study's)"] * len(task.class_names)
      step = jax.jit(_probability_step(task, apply_fn, normalize),
                     out_shardings=evaluator.data_sharding)
    else:
      per_trial = [_trial_thresholds(workdir, k) for k in chosen]
      thresholds, origins = combine_thresholds(per_trial, task.class_names)
      step = None
    return cls(workdir, config, task, evaluator, chosen, variables, d.image_size,
               info.channels, d.keep_aspect and task.name != "segmentation", thresholds,
               origins, step)

  def read(self, path: str) -> dict[str, np.ndarray]:
    """A file as the run's data set stored it, with the placeholders of the task's other
    example arrays (labels, masks: unused by the predictions); DataFormatError naming the
    file if it cannot be read."""
    stored = inputs_lib.read_stored(path, self.image_size, self.channels, self.keep_aspect)
    example = {"image": stored}
    for key in self.task.keys:
      if key == "labels":
        example[key] = np.zeros(len(self.class_names), np.float32)
      elif key == "mask":
        example[key] = np.zeros(stored.shape[:2] + (len(self.class_names),), np.uint8)
      elif key == "fov":
        example[key] = np.ones(stored.shape[:2] + (1,), np.uint8)
    return example

  def probabilities(self, examples: Sequence[dict], tta: bool = False) -> np.ndarray:
    """The mean over the chosen trials of each example's probabilities: (N, K) for
    classification, (N, S, S, K) maps at the model's input size for segmentation."""
    from medbench_jax.trainer import evaluation
    total = None
    for variables in self.variables:
      if self.segmentation:
        dataset = self.evaluator.dataset(examples, pp_spec=self.task.pp_eval(tta), seed=0)
        probs = evaluation.predict(self.step, variables, dataset,
                                   self.evaluator.data_sharding)["probs"]
      else:
        probs = self.evaluator.predict(variables, examples, test=tta)["probs"]
      probs = np.asarray(probs, np.float64)
      total = probs if total is None else total + probs
    return (total / len(self.variables)).astype(np.float32)


def _choose_trials(spec: str, count: int) -> tuple[int, ...]:
  if spec.strip().lower() == "all":
    return tuple(range(count))
  try:
    chosen = tuple(int(k) for k in spec.split(","))
  except ValueError:
    chosen = ()
  if not chosen or any(not 0 <= k < count for k in chosen):
    raise ValueError(f"--trials={spec}: 'all' or trial indices 0..{count - 1}, e.g. '0,2'.")
  return chosen


def _probability_step(task: Any, apply_fn: Any, normalize: Any) -> Any:
  """Segmentation: (variables, batch) -> {"probs": (N, S, S, K)} at the model's input
  size, from the task's own prediction function (the batch's placeholder masks have the
  input's size, so the logits are not resized)."""
  import jax
  predict = task.make_predict(apply_fn, normalize)

  def step(variables: dict, batch: dict) -> dict:
    logits, _ = predict(variables, batch)
    if task.softmax:  # background first: the classes' probabilities, summing to <= 1
      return {"probs": jax.nn.softmax(logits)[..., 1:]}
    return {"probs": jax.nn.sigmoid(logits)}

  return step


def _trial_thresholds(workdir: str, k: int) -> dict[str, Any] | None:
  """Trial k's thresholds chosen on validation (result.json's `thresholds`: `rule` and
  `per_class`, a float or null per class), or None where its results hold none."""
  record = paths.read_json(paths.as_path(workdir) / f"trial_{k}" / "result.json")
  chosen = record.get("thresholds") or {}
  return chosen if chosen.get("per_class") else None


def combine_thresholds(per_trial: Sequence[dict[str, Any] | None],
                       class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
  """Each class's threshold: the mean of the trials' (those that chose one), else 0.5;
  and, per class, where it came from."""
  values, origins = [], []
  for name in class_names:
    chosen = [t for t in per_trial
              if t is not None and t["per_class"].get(name) is not None]
    if chosen:
      values.append(float(np.mean([t["per_class"][name] for t in chosen])))
      rules = sorted({str(t.get("rule", "?")) for t in chosen})
      origins.append(f"validation ({', '.join(rules)})" + (
          f": mean of {len(chosen)} trials" if len(chosen) > 1 else ""))
    else:
      values.append(DEFAULT_THRESHOLD)
      origins.append("default 0.5: no trial chose one")
  return np.array(values, np.float64), origins


# ---------------------------------------------------------------- predicting files


def _beside(out: str, suffix: str) -> Any:
  """OUT_<suffix> beside the output file (an epath.Path)."""
  target = paths.as_path(out)
  return target.parent / f"{target.stem}_{suffix}"


def _write_png(path: Any, image: np.ndarray) -> None:
  import cv2
  if image.ndim == 3 and image.shape[2] == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  ok, data = cv2.imencode(".png", image)
  if not ok:
    raise OSError(f"cannot encode {path}")
  path.write_bytes(data.tobytes())


def _decode(predictor: Predictor, path: str) -> tuple[dict | None, str | None]:
  """(example, None) or (None, why the file cannot be read)."""
  from medbench_jax.data.prepare.errors import DataFormatError
  try:
    return predictor.read(path), None
  except DataFormatError as e:  # the readers' own message names the file and the fault
    return None, str(e)


def _segmentation_rows(predictor: Predictor, files: Sequence[str], probs: np.ndarray,
                       mask_dir: Any, first_index: int) -> list[dict[str, Any]]:
  """Masks and overlays at each file's own size, and the CSV rows naming them."""
  import cv2

  from medbench_jax.tasks import segmentation
  rows = []
  for i, (path, prob) in enumerate(zip(files, probs)):
    shown = inputs_lib.read_original(path, 3)
    height, width = shown.shape[:2]
    resized = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    resized = resized.reshape(height, width, -1)
    if predictor.task.softmax:
      background = 1.0 - resized.sum(axis=-1, keepdims=True)
      winner = np.argmax(np.concatenate([background, resized], axis=-1), axis=-1)
      masks = np.stack([winner == c + 1 for c in range(resized.shape[-1])], axis=-1)
    else:
      masks = resized > predictor.thresholds[:resized.shape[-1]]
    stem = f"{first_index + i:06d}_{os.path.splitext(os.path.basename(path))[0]}"
    row: dict[str, Any] = {"path": path}
    for c, name in enumerate(predictor.class_names):
      target = mask_dir / f"{stem}_{_safe(name)}.png"
      _write_png(target, masks[..., c].astype(np.uint8) * 255)
      row[f"mask/{name}"] = os.fspath(target)
    overlay = mask_dir / f"{stem}_overlay.png"
    _write_png(overlay, segmentation.overlay(shown[None], np.zeros_like(masks[None]),
                                             masks[None])[0])
    row["overlay"] = os.fspath(overlay)
    row.update({f"fraction/{name}": float(masks[..., c].mean())
                for c, name in enumerate(predictor.class_names)})
    rows.append(row)
  return rows


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def predict_files(predictor: Predictor, files: Sequence[str], *, tta: bool = False,
                  mask_dir: Any = None) -> tuple[list[dict[str, Any]], list[inputs_lib.Problem]]:
  """One row per readable file (module docstring), and the files that were not."""
  chunk = predictor.config.input.eval_batch_size * BATCHES_PER_CHUNK
  rows, problems = [], []
  start = time.perf_counter()
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for first in range(0, len(files), chunk):
      part = files[first:first + chunk]
      good, examples = [], []
      for path, (example, reason) in zip(part, pool.map(
          lambda p: _decode(predictor, p), part)):
        if example is None:
          problems.append(inputs_lib.Problem(path, reason))
          logging.warning("predict: skipping %s: %s", path, reason)
        else:
          good.append(path)
          examples.append(example)
      if examples:
        probs = predictor.probabilities(examples, tta)
        if predictor.segmentation:
          rows += _segmentation_rows(predictor, good, probs, mask_dir, len(rows))
        else:
          rows += _classification_rows(predictor, good, probs)
      done = first + len(part)
      logging.info("predict: %d/%d files (%d predicted, %d problems), %.1f files/s", done,
                   len(files), len(rows), len(problems), done / (time.perf_counter() - start))
  return rows, problems


def _classification_rows(predictor: Predictor, files: Sequence[str], probs: np.ndarray
                         ) -> list[dict[str, Any]]:
  names = predictor.class_names
  labels = (probs >= predictor.thresholds).astype(int)
  return [{"path": path, **{f"prob/{n}": float(p[c]) for c, n in enumerate(names)},
           **{f"label/{n}": int(y[c]) for c, n in enumerate(names)}}
          for path, p, y in zip(files, probs, labels)]


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], jsonl: bool) -> str:
  if jsonl:
    return "".join(json.dumps(row) + "\n" for row in rows)
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return text.getvalue()


def columns(predictor: Predictor) -> list[str]:
  """The output's columns, in order."""
  names = predictor.class_names
  if predictor.segmentation:
    return (["path"] + [f"mask/{n}" for n in names] + ["overlay"]
            + [f"fraction/{n}" for n in names])
  return ["path"] + [f"prob/{n}" for n in names] + [f"label/{n}" for n in names]


def predict(workdir: str, inputs: str, out: str, *, trials: str = "all", tta: bool = False,
            batch_size: int = 0) -> dict[str, Any]:
  """Predicts the files `inputs` names and writes `out` and the files beside it; returns
  the summary (also OUT_summary.json)."""
  suffix = os.path.splitext(out)[1].lower()
  if suffix not in (".csv", ".jsonl"):
    raise ValueError(f"--out={out}: a .csv or .jsonl file.")
  files, problems = inputs_lib.list_inputs(inputs)
  predictor = Predictor.load(workdir, trials, batch_size)
  for name, value, origin in zip(predictor.class_names, predictor.thresholds,
                                 predictor.threshold_sources):
    logging.info("predict: threshold of %s: %.4f (%s)", name, value, origin)
  if any(o.startswith("default") for o in predictor.threshold_sources):
    logging.warning("predict: no threshold chosen on validation for %s: their labels use "
                    "%.1f.", [n for n, o in zip(predictor.class_names,
                                                predictor.threshold_sources)
                              if o.startswith("default")], DEFAULT_THRESHOLD)
  paths.as_path(out).parent.mkdir(parents=True, exist_ok=True)
  mask_dir = None
  if predictor.segmentation:
    mask_dir = _beside(out, "masks")
    mask_dir.mkdir(parents=True, exist_ok=True)
  rows, bad = predict_files(predictor, files, tta=tta, mask_dir=mask_dir)
  problems += bad
  paths.write_atomic(out, _table(rows, columns(predictor), suffix == ".jsonl"))
  problems_file = _beside(out, "problems.csv")
  paths.write_atomic(problems_file, _table([dataclasses.asdict(p) for p in problems],
                                           ("path", "reason"), jsonl=False))
  if problems:
    logging.warning("predict: %d file(s) could not be predicted; see %s", len(problems),
                    problems_file)
  summary = {
      "out": os.fspath(paths.as_path(out)), "run": os.fspath(paths.as_path(workdir)),
      "task": predictor.task.name, "class_names": list(predictor.class_names),
      "trials": list(predictor.trials), "tta": tta, "inputs": len(files),
      "predicted": len(rows), "problems": len(problems),
      "problems_file": os.fspath(problems_file),
      "thresholds": {n: {"value": float(v), "source": o} for n, v, o in zip(
          predictor.class_names, predictor.thresholds, predictor.threshold_sources)}}
  if mask_dir is not None:
    summary["masks"] = os.fspath(mask_dir)
  paths.write_json(_beside(out, "summary.json"), summary)
  return summary


def main(argv: Sequence[str]) -> None:
  del argv
  if not flags.FLAGS.workdir or not _INPUTS.value or not _OUT.value:
    raise app.UsageError("--workdir=RUN, --inputs=DIR|CSV|GLOB and --out=FILE are required.")
  runtime.start()
  try:
    summary = predict(flags.FLAGS.workdir, _INPUTS.value, _OUT.value, trials=_TRIALS.value,
                      tta=_TTA.value, batch_size=_BATCH_SIZE.value or 0)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"predict: {e}") from None
  print(json.dumps({k: summary[k] for k in ("out", "predicted", "problems",
                                            "problems_file")}))
  if not summary["predicted"]:
    raise SystemExit(f"predict: nothing predicted ({summary['inputs']} input file(s), "
                     f"{summary['problems']} problem(s): see {summary['problems_file']}).")


if __name__ == "__main__":
  app.run(main)
