"""A run: `config.num_trials` trials, one after another (trials.py) or packed into
programs of train.pack_trials (packed.py), then results.json.

Resumable at every level: a finished workdir prints its results, a finished trial is
skipped, an unfinished trial resumes from its latest checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
import jax
import ml_collections

from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import runtime
from medbench_jax import tasks
from medbench_jax.data import sources
from medbench_jax.trainer import packed
from medbench_jax.trainer import results as results_lib
from medbench_jax.trainer import sharding
from medbench_jax.trainer import trials as trials_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs all trials of `config` in `workdir` (data already prepared); returns results.json."""
  start = time.perf_counter()
  workdir = paths.as_path(workdir)  # local (made absolute) or a bucket URL
  results_path = workdir / "results.json"
  if results_path.exists():
    results = paths.read_json(results_path)
    logging.info("%s is finished; not retraining. Test %s: %s", workdir, results["metric"],
                 results["summary"])
    return results
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = config_lib.to_dict(config)
  if runtime.is_lead():
    paths.write_json(workdir / "config.json", resolved)
  logging.info("Devices: %d (%s) over %d process(es)", jax.device_count(),
               jax.devices()[0].platform, jax.process_count())

  splits = sources.open_splits(config.dataset)
  trials_lib.check_splits(config, splits)
  task = tasks.for_dataset(config, splits.info)
  if config.train.pack_trials == 1:
    mesh = sharding.make_mesh(config.mesh.fsdp)
    trials = [trials_lib.run_trial(config, workdir, trial, splits, task, mesh)
              for trial in range(config.num_trials)]
  else:
    trials = _packed_trials(config, workdir, splits, task)

  wall_s = time.perf_counter() - start
  results = results_lib.assemble(
      task_fields=task.results_fields(), config=resolved, trials=trials, subset=splits.subset,
      skipped_examples=splits.info.skipped_examples,
      provenance=results_lib.provenance(resolved, splits.info.split_hashes),
      wall_s=wall_s, efficiency=_efficiency(config, trials, wall_s))
  if runtime.is_lead():
    paths.write_json(results_path, results)
  logging.info("Test %s over %d trial(s): %s", results["metric"], len(trials),
               results["summary"])
  return results


def _efficiency(config: ml_collections.ConfigDict, trials: list[dict], wall_s: float
                ) -> dict[str, Any]:
  """Runs per device-hour and MFU of the run's training programs. A packed program's
  steps, seconds and FLOPs are in each of its N trials' records: counted once."""
  steps = seconds = flops = 0.0
  for trial in trials:
    cost = trial.get("cost", {})
    share = 1 / cost.get("packed_trials", 1)
    steps += share * cost.get("train_steps", 0)
    seconds += share * cost.get("train_seconds", 0.0)
    flops += share * cost.get("train_steps", 0) * (cost.get("flops_per_step") or 0.0)
  return results_lib.efficiency(
      flops_per_step=flops / steps if steps and flops else None, train_steps=int(steps),
      train_seconds=seconds, wall_s=wall_s, device_kind=jax.devices()[0].device_kind,
      num_devices=jax.device_count(), trials=len(trials), dtype=config.model.dtype)


def _packed_trials(config: ml_collections.ConfigDict, workdir, splits: sources.Splits,
                   task: tasks.Task) -> list[dict]:
  """Every trial's record: finished ones read back, the others trained packed."""
  records = {}
  for trial in range(config.num_trials):
    result = trials_lib.TrialFiles.of(workdir, trial).result
    if result.exists():
      logging.info("Trial %d already finished: %s", trial, result)
      records[trial] = paths.read_json(result)
  unfinished = [t for t in range(config.num_trials) if t not in records]
  if unfinished:
    records.update(zip(unfinished, packed.run_packed(config, workdir, splits, task,
                                                     unfinished)))
  return [records[t] for t in range(config.num_trials)]
