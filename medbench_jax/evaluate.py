r"""Re-tests a finished run's best checkpoints, on its own test split or on another data set.

  python -m medbench_jax.evaluate --workdir=workdirs/swinb_cxr14
  python -m medbench_jax.evaluate --workdir=workdirs/swinb_cxr14 \
      --config.dataset.name=chexpert --config.dataset.manual_dir=/data/CheXpert-v1.0

Each trial's best checkpoint (WORKDIR/trial_K/ckpt/best) predicts the test split with the
run's own preprocessing and test-time augmentation; results go to
WORKDIR/eval/<dataset>.json in the results.json format (one entry per trial, summary).

External validation: when the data set is another one, the classes both share are matched
by name (case, spaces and underscores ignored, and the synonyms in SYNONYMS, e.g.
ChestX-ray14's "Effusion" is CheXpert's "Pleural Effusion"), the model's outputs for them
are scored against the other data set's labels, and the rest of either side is left out
(listed in the output's "class_mapping"). `--config.KEY=VALUE` overrides any key of the
run's config (e.g. the other data set's manual_dir, dataset.image_size, input.eval_batch_size).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from medbench_jax import config_checks
from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import runtime

# Finding names that differ between data sets for the same finding (as `_finding_key`s).
SYNONYMS = (
    ("effusion", "pleural effusion", "pe"),
    ("fibrosis", "pulmonary fibrosis"),
    ("pleural thickening", "pleural_thickening"),
    ("tuberculosis", "tb"),
)

_WORKDIR = flags.DEFINE_string("workdir", None,
                                "A finished run's workdir (a local folder or gs://...).")
_SHARED_DATA_DIR = flags.DEFINE_bool(
    "shared_data_dir", False, "Multi-process: the data set's data_dir is one folder every "
    "host sees; the lead prepares it once (default: each host prepares its own copy).")


def _finding_key(name: str) -> str:
  """The name a finding is matched by: lower case, single spaces, SYNONYMS merged."""
  name = " ".join(name.lower().replace("_", " ").split())
  return next((group[0] for group in SYNONYMS if name in group), name)


def match_classes(source: Sequence[str], target: Sequence[str]
                  ) -> list[tuple[int, int]]:
  """(source index, target index) of the classes two data sets share, by name."""
  index = {_finding_key(n): i for i, n in enumerate(target)}
  return [(i, index[_finding_key(n)]) for i, n in enumerate(source)
          if _finding_key(n) in index]


@dataclasses.dataclass
class SelectedClasses(Sequence):
  """A split whose labels (or mask channels) are reduced to the given columns (picklable)."""
  source: Sequence[dict]
  columns: tuple[int, ...]
  key: str

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    example = self.source[i]
    return {**example, self.key: np.asarray(example[self.key])[..., list(self.columns)]}


def best_variables(config: ml_collections.ConfigDict, workdir: str, trial: int,
                   num_outputs: int) -> dict:
  """Trial `trial`'s best checkpoint of the finished run in `workdir`, head included, as
  host arrays (the model's variables)."""
  from medbench_jax import weights
  return weights.load(config.model.name, f"run:{workdir}/trial_{trial}", num_outputs,
                      keep_head=True, **config.model.kw.to_dict())


def evaluate_run(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Tests every finished trial of the run in `workdir` on `config.dataset`'s test split."""
  from medbench_jax import tasks
  from medbench_jax.data import sources
  from medbench_jax.trainer import evaluation
  from medbench_jax.trainer import results as results_lib
  from medbench_jax.trainer import sharding
  from medbench_jax.trainer import state as state_lib
  start = time.perf_counter()
  run = paths.read_json(paths.as_path(workdir) / "results.json")
  splits = sources.open_splits(config.dataset)
  run_task = tasks.for_dataset(config, run_info(splits.info, run))
  pairs = match_classes(run["class_names"], splits.info.class_names)
  if not pairs:
    raise ValueError(f"The run's classes {run['class_names']} share none with "
                     f"{config.dataset.name}'s {list(splits.info.class_names)}.")
  model_columns, data_columns = (tuple(c) for c in zip(*pairs))
  if run["dataset_kind"] == "multi-class" and len(pairs) < len(run["class_names"]):
    raise ValueError(f"The run's classes are mutually exclusive (softmax over "
                     f"{run['class_names']}); {config.dataset.name} has only {len(pairs)} "
                     "of them, so its probabilities would not be the model's.")
  shared = tuple(splits.info.class_names[j] for j in data_columns)
  info = dataclasses.replace(
      splits.info, class_names=shared,
      eval_class_names=tuple(n for n in shared if n in splits.info.eval_class_names) or shared)
  task = tasks.for_dataset(config, info)
  key = "mask" if task.name == "segmentation" else "labels"
  test_split = SelectedClasses(splits.test, data_columns, key)

  mesh = sharding.make_mesh()
  model = state_lib.create_model(config, run_task.num_outputs)
  apply_fn = lambda variables, x, train: model.apply(variables, x, train=train)[
      ..., list(model_columns)]
  evaluator = evaluation.Evaluator.create(config, task, apply_fn, state_lib.normalizer(config),
                                          sharding.batch_sharding(mesh))

  trials = []
  for k, trial in enumerate(run["trials"]):
    variables = sharding.put_replicated(
        best_variables(config, workdir, k, run_task.num_outputs), mesh)
    metrics = task.metrics(evaluator.predict(variables, test_split, test=True))
    logging.info("trial %d on %s: %s", k, config.dataset.name, task.describe(metrics, True))
    trials.append(results_lib.trial_record(
        seed=trial["seed"], best_step=trial["best_step"],
        best_val_loss=trial["best_val_loss"],
        skipped_updates=trial.get("skipped_updates", 0), test_metrics=metrics, cost={}))
  resolved = config_lib.to_dict(config)
  result = results_lib.assemble(
      task_fields=task.results_fields(), config=resolved, trials=trials,
      subset=run["label_subset"], skipped_examples=splits.info.skipped_examples,
      provenance=results_lib.provenance(resolved, splits.info.split_hashes),
      wall_s=time.perf_counter() - start)
  result.update(
      label_fraction=run["label_fraction"], source_run=os.fspath(paths.as_path(workdir)),
      source_dataset=run["dataset"],
      class_mapping={"shared": [[run["class_names"][i], splits.info.class_names[j]]
                                for i, j in pairs],
                     "model_only": [n for i, n in enumerate(run["class_names"])
                                    if i not in model_columns],
                     "data_only": [n for j, n in enumerate(splits.info.class_names)
                                   if j not in data_columns]})
  return result


def run_info(info, run: dict):
  """The data-set description the run was trained with (its classes and kind)."""
  return dataclasses.replace(info, class_names=tuple(run["class_names"]),
                             eval_class_names=tuple(run.get("eval_class_names",
                                                            run["class_names"])),
                             task=run["dataset_kind"])


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The finished run's resolved config, on the current schema (new keys at defaults)."""
  saved = paths.read_json(paths.as_path(workdir) / "config.json")
  config = config_lib.default_config()
  config.unlock()
  config.update_from_flattened_dict(_flatten(saved))
  return config


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict) and k != "kw":
      flat.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(v, dict):
      flat[f"{prefix}{k}"] = ml_collections.ConfigDict(v)
    else:
      flat[f"{prefix}{k}"] = _tuples(v)
  return flat


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the schema holds."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def main(argv: Sequence[str]) -> None:
  del argv
  runtime.start()

  from medbench_jax.data import sources
  config = flags.FLAGS.config
  config_checks.validate(config)
  sources.prepare_for_run(config.dataset, shared=_SHARED_DATA_DIR.value,
                          barrier="evaluate_dataset_prepared")
  result = evaluate_run(_WORKDIR.value, config)
  out = paths.as_path(_WORKDIR.value) / "eval" / f"{config.dataset.name}.json"
  if runtime.is_lead():
    out.parent.mkdir(parents=True, exist_ok=True)
    paths.write_json(out, result)
  print(json.dumps({"eval": os.fspath(out), "metric": result["metric"],
                    **result["summary"]}))
  runtime.stop()


def _workdir_from_argv(argv: Sequence[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  raise app.UsageError("--workdir=RUN is required (a finished run's workdir).")


if __name__ == "__main__":
  # The run's own config is the base that --config.KEY=VALUE overrides, so it is read
  # before the flags are parsed.
  config_flags.DEFINE_config_dict("config", run_config(_workdir_from_argv(sys.argv)))
  app.run(main)
