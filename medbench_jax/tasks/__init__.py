"""Tasks: what differs between kinds of prediction problem (see base.Task).

`for_dataset` picks the task from the prepared data set's own kind, so a run never
has to be told that MedMNIST's PathMNIST is multi-class or that DRIVE is segmentation.
"""

from __future__ import annotations

import ml_collections

from medbench_jax.tasks.base import Task
from medbench_jax.tasks.classification import Classification
from medbench_jax.tasks.segmentation import Segmentation

# Data-set kind (its builder's TASK) -> task.
_BY_DATASET_KIND: dict[str, type[Task]] = {
    "multi-label": Classification,
    "binary": Classification,
    "multi-class": Classification,
    "segmentation": Segmentation,
}


def for_dataset(config: ml_collections.ConfigDict, info) -> Task:
  """The task of a prepared data set (`info`: data.sources.DatasetInfo)."""
  if info.task not in _BY_DATASET_KIND:
    raise ValueError(f"Data set {info.name!r} is of kind {info.task!r}, which no task "
                     f"trains; known kinds: {sorted(_BY_DATASET_KIND)}")
  return _BY_DATASET_KIND[info.task](config, info)
