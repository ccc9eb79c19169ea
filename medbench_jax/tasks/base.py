"""The Task interface: everything that differs between classification and segmentation.

The training loop (trainer/) owns steps, evaluation cadence, checkpoints, early stopping
and trials; a Task owns what the model's output means: the head size, the loss, what an
evaluation step predicts (and how test-time augmentation averages), the metrics and the
headline metric, the example keys a batch carries, what TensorBoard shows, and the
task's part of results.json.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

# (variables, batch) -> per-example arrays, gathered over devices and hosts.
EvalStep = Callable[[dict, dict], dict]
# Raw uint8 NHWC images -> what the model takes (normalized float, 3 channels).
Normalize = Callable[[jnp.ndarray], jnp.ndarray]


class Task(abc.ABC):
  """One kind of prediction problem over a prepared data set (sources.DatasetInfo)."""

  name: str  # "classification" | "segmentation": results.json's "task"
  metric: str  # the headline metric of results.json ("mean_auc", "dice")
  keys: tuple[str, ...]  # the example arrays a batch carries
  # Validation examples shown in TensorBoard at every evaluation (eval_images).
  num_eval_images = 0

  def __init__(self, config: ml_collections.ConfigDict, info: Any):
    self.config = config
    self.info = info

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.info.class_names)

  @property
  def num_outputs(self) -> int:
    """Size of the model's head (channels of the segmentation head)."""
    return len(self.class_names)

  # ------------------------------------------------------------ input
  @abc.abstractmethod
  def pp_train(self) -> str:
    """Preprocessing spec of training examples (data/transforms.py ops)."""

  @abc.abstractmethod
  def pp_eval(self, test: bool) -> str:
    """Preprocessing spec of validation (test=False) or test examples."""

  # ------------------------------------------------------------ model outputs
  @abc.abstractmethod
  def loss(self, outputs: Any, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """Scalar float32 training loss of the model's train-mode outputs on a batch."""

  @abc.abstractmethod
  def make_eval_step(self, apply_fn: Callable, normalize: Normalize) -> EvalStep:
    """A jittable step returning per-example predictions, "loss" among them."""

  def make_test_step(self, apply_fn: Callable, normalize: Normalize) -> EvalStep:
    """The step of the test split: `make_eval_step`'s outputs and whatever else
    `post_hoc` reads (segmentation: the masks); validation keeps the cheaper step."""
    return self.make_eval_step(apply_fn, normalize)

  # ------------------------------------------------------------ metrics and reporting
  @abc.abstractmethod
  def metrics(self, predictions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Metrics of a whole split's gathered predictions; includes "loss" and `metric`."""

  def post_hoc(self, validation: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
    """What a trial adds to its result.json after its test, from the best checkpoint's
    predictions of the validation split (`make_eval_step`) and of the test split
    (`make_test_step`): top-level keys of the trial record, JSON-ready."""
    del validation, test
    return {}

  def describe(self, metrics: Mapping[str, float], per_class: bool = False) -> str:
    """A log line's account of `metrics`: the headline, and each class where asked."""
    text = f"{self.metric} {metrics[self.metric]:.4f}"
    if per_class:
      text += " | " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" in k)
    return text

  def test_predictions(self, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What test_predictions.npz keeps so statistics can be recomputed without a rerun."""
    return {"class_names": np.array(self.class_names), **predictions}

  def input_images(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TensorBoard images of a (host) training batch, logged once per trial."""
    return {"train/augmented_inputs": image_grid(batch["image"][:32])[None]}

  def make_predict(self, apply_fn: Callable, normalize: Normalize) -> Callable:
    """(variables, batch) -> (raw outputs, predictions) for `eval_images`; tasks with
    num_eval_images > 0 implement it."""
    raise NotImplementedError(f"{type(self).__name__} shows no evaluation images")

  def eval_images(self, batch: Mapping[str, np.ndarray], predicted: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """TensorBoard images of the fixed validation examples and their predictions."""
    del batch, predicted
    return {}

  def results_fields(self) -> dict[str, Any]:
    """The task's part of results.json."""
    return {"task": self.name, "metric": self.metric, "dataset_kind": self.info.task,
            "class_names": list(self.class_names)}


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) uint8 mosaic for TensorBoard."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def flatten_crops(images: jnp.ndarray) -> tuple[jnp.ndarray, int]:
  """(B, crops, H, W, C) ten-crop stacks or (B, H, W, C) -> (B * crops, H, W, C), crops."""
  crops = images.shape[1] if images.ndim == 5 else 1
  return images.reshape((-1,) + images.shape[-3:]), crops


def mean_over_crops(values: jnp.ndarray, batch: int, crops: int) -> jnp.ndarray:
  """(B * crops, ...) -> (B, ...): test-time augmentation averages per image."""
  return values.reshape((batch, crops) + values.shape[1:]).mean(axis=1)

