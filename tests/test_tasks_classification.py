"""tasks/classification.py: losses, evaluation steps and metrics against PyTorch and
scikit-learn, for multi-label, binary and multi-class (one-hot) data sets."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score
from sklearn.metrics import roc_auc_score
import torch

from medbench_jax import config_lib
from medbench_jax.tasks import classification

CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
            "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
            "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
            "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _task(kind, names, eval_names=None):
  info = types.SimpleNamespace(name="x", task=kind, class_names=names,
                               eval_class_names=eval_names or names)
  return classification.Classification(config_lib.default_config(), info)


def _one_hot(n, k, seed=0):
  return np.eye(k, dtype=np.float32)[np.random.default_rng(seed).integers(0, k, n)]


def _identity_model(variables, images, train):
  """'Model' whose logits are the mean of each image channel times a weight per class."""
  del train
  return images.mean(axis=(1, 2))[:, :1] * variables["params"]["w"]


def test_multi_class_trains_with_softmax_cross_entropy_as_torch():
  task = _task("multi-class", ("a", "b", "c"))
  logits = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  labels = _one_hot(8, 3)
  expected = torch.nn.functional.cross_entropy(torch.tensor(logits),
                                               torch.tensor(labels.argmax(1)))
  got = task.loss(jnp.asarray(logits), {"labels": jnp.asarray(labels)})
  assert abs(float(got) - float(expected)) < 1e-6


def test_multi_label_and_binary_train_with_sigmoid_bce_as_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 4)).astype(np.float32)
  labels = (rng.random((8, 4)) < 0.3).astype(np.float32)
  expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits),
                                                                  torch.tensor(labels))
  for kind in ("multi-label", "binary"):
    got = _task(kind, tuple("abcd")).loss(jnp.asarray(logits), {"labels": jnp.asarray(labels)})
    assert abs(float(got) - float(expected)) < 1e-6


@pytest.mark.parametrize("kind", ["multi-class", "multi-label"])
def test_ten_crop_averages_probabilities_after_the_activation(kind):
  k = 3
  task = _task(kind, ("a", "b", "c"))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 255, size=(4, 10, 8, 8, 1)).astype(np.uint8)
  labels = _one_hot(4, k) if kind == "multi-class" else (rng.random((4, k)) < .5).astype(
      np.float32)
  variables = {"params": {"w": jnp.asarray([1.0, -2.0, 3.0])}}
  normalize = lambda x: x.astype(jnp.float32) / 255.0
  step = jax.jit(task.make_eval_step(_identity_model, normalize))
  out = step(variables, {"image": images, "labels": labels})

  logits = images.reshape(40, 8, 8, 1).astype(np.float64).mean(axis=(1, 2)) / 255.0 * [
      1.0, -2.0, 3.0]
  logits = torch.tensor(logits.reshape(4, 10, k))
  if kind == "multi-class":
    probs = torch.softmax(logits, -1).mean(1).numpy()
    loss = -(labels * np.log(probs)).sum(-1)
  else:
    probs = torch.sigmoid(logits).mean(1).numpy()
    loss = -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)).mean(-1)
  np.testing.assert_allclose(out["probs"], probs, atol=1e-6)
  np.testing.assert_allclose(out["loss"], loss, atol=1e-5)

  # One crop: the loss comes from the logits (exact), the same value as from probabilities.
  single = step(variables, {"image": images[:, 0], "labels": labels})
  one = logits[:, 0]
  probs_1 = torch.softmax(one, -1) if kind == "multi-class" else torch.sigmoid(one)
  np.testing.assert_allclose(single["probs"], probs_1.numpy(), atol=1e-6)


def test_multi_class_metrics_are_medmnists_auc_and_accuracy():
  """MedMNIST's evaluator: mean one-vs-rest AUC of the softmax scores, arg-max accuracy."""
  task = _task("multi-class", ("a", "b", "c", "d"))
  rng = np.random.default_rng(3)
  labels = _one_hot(300, 4, seed=4)
  probs = np.asarray(jax.nn.softmax(labels * 1.5 + rng.normal(size=(300, 4)), axis=-1))
  result = task.metrics({"labels": labels, "probs": probs, "loss": np.ones(300)})
  aucs = [roc_auc_score(labels[:, c], probs[:, c]) for c in range(4)]
  for c, name in enumerate("abcd"):
    assert abs(result[f"auc/{name}"] - aucs[c]) < 1e-9
  assert abs(result["mean_auc"] - np.mean(aucs)) < 1e-9
  assert result["accuracy"] == pytest.approx(
      accuracy_score(labels.argmax(1), probs.argmax(1)), abs=1e-12)
  assert 0.4 < result["accuracy"] < 1.0  # a real classifier, not a constant


def test_binary_accuracy_thresholds_at_one_half():
  task = _task("binary", ("tb",))
  labels = np.array([[1], [0], [1], [0], [1]], np.float32)
  probs = np.array([[0.9], [0.6], [0.4], [0.1], [0.7]], np.float32)
  result = task.metrics({"labels": labels, "probs": probs, "loss": np.zeros(5)})
  assert result["accuracy"] == pytest.approx(accuracy_score(labels[:, 0], probs[:, 0] > 0.5))
  assert result["mean_auc"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))


def test_chexpert_mean_auc_covers_the_five_competition_findings():
  task = _task("multi-label", CHEXPERT, COMPETITION)
  rng = np.random.default_rng(5)
  labels = (rng.random((400, 14)) < 0.3).astype(np.float32)
  probs = np.clip(labels * 0.2 + rng.random((400, 14)), 0, 1)
  result = task.metrics({"labels": labels, "probs": probs, "loss": np.zeros(400)})
  aucs = {n: roc_auc_score(labels[:, c], probs[:, c]) for c, n in enumerate(CHEXPERT)}
  assert {k for k in result if k.startswith("auc/")} == {f"auc/{n}" for n in CHEXPERT}
  assert abs(result["mean_auc"] - np.mean([aucs[n] for n in COMPETITION])) < 1e-9
  assert abs(result["mean_auc"] - np.mean(list(aucs.values()))) > 1e-4  # not all 14
  assert task.results_fields()["eval_class_names"] == list(COMPETITION)
