"""tasks/classification.py: losses, evaluation steps, metrics, and the post-hoc operating
points and calibration against PyTorch and scikit-learn, for multi-label, binary and
multi-class (one-hot) data sets."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score
from sklearn.metrics import average_precision_score
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import brier_score_loss
from sklearn.metrics import confusion_matrix
from sklearn.metrics import f1_score
from sklearn.metrics import log_loss
from sklearn.metrics import precision_recall_curve
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve
import torch

from medbench_jax import config_lib
from medbench_jax.tasks import classification
from medbench_jax.trainer import results as results_lib

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


# ------------------------------------------------------------------ post_hoc
def _overconfident(n, k, seed, multi_class=False, sharpen=2.5):
  """Labels drawn from true probabilities; predictions sharpened (overconfident)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1.5, size=(n, k))
  if multi_class:
    truth = scipy.special.softmax(logits, axis=-1)
    labels = np.eye(k, dtype=np.float32)[[rng.choice(k, p=p) for p in truth]]
    return labels, scipy.special.softmax(sharpen * logits, axis=-1)
  labels = (rng.uniform(size=logits.shape) < 1 / (1 + np.exp(-logits))).astype(np.float32)
  return labels, 1 / (1 + np.exp(-sharpen * logits))


def _post_hoc(kind, rule="youden", resamples=200, n=(400, 600), k=3, seed=0):
  task = _task(kind, tuple("abcdefgh"[:k]))
  task.config.eval.threshold_rule = rule
  task.config.eval.bootstrap_resamples = resamples
  multi = kind == "multi-class"
  val = dict(zip(("labels", "probs"), _overconfident(n[0], k, seed, multi)))
  test = dict(zip(("labels", "probs"), _overconfident(n[1], k, seed + 1, multi)))
  return task, val, test, task.post_hoc(val, test)


def test_post_hoc_is_json_and_thresholds_have_the_predict_shape():
  task, val, _, out = _post_hoc("multi-label")
  assert set(out) == {"thresholds", "operating_points", "calibration"}
  text = json.dumps(out, allow_nan=False)  # result.json refuses NaN
  assert len(text) < 20_000  # compact: 3 classes, reliability bins included
  thresholds = json.loads(text)["thresholds"]
  assert thresholds["rule"] == "youden" and list(thresholds["per_class"]) == ["a", "b", "c"]
  assert all(isinstance(t, float) for t in thresholds["per_class"].values())
  # A class whose validation labels take one value has no threshold: null.
  val["labels"][:, 1] = 0
  out = task.post_hoc(val, _post_hoc("multi-label")[2])
  assert json.loads(json.dumps(out, allow_nan=False))["thresholds"]["per_class"]["b"] is None
  assert out["operating_points"]["classes"]["b"]["sensitivity"]["value"] is None


@pytest.mark.parametrize("kind", ["multi-label", "multi-class"])
def test_youden_thresholds_and_test_metrics_equal_sklearn(kind):
  task, val, test, out = _post_hoc(kind, k=3 if kind == "multi-label" else 4)
  for c, name in enumerate(task.class_names):
    # Youden's J is the best point of scikit-learn's ROC curve on validation.
    fpr, tpr, thresholds = roc_curve(val["labels"][:, c], val["probs"][:, c],
                                     drop_intermediate=False)
    threshold = out["thresholds"]["per_class"][name]
    assert threshold == thresholds[np.argmax(tpr - fpr)]
    y = test["labels"][:, c].astype(int)
    called = (test["probs"][:, c] >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, called, labels=[0, 1]).ravel()
    expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn), "f1": f1_score(y, called),
                "balanced_accuracy": balanced_accuracy_score(y, called),
                "auprc": average_precision_score(y, test["probs"][:, c])}
    record = out["operating_points"]["classes"][name]
    assert (record["tp"], record["fp"], record["tn"], record["fn"]) == (tp, fp, tn, fn)
    for metric, value in expected.items():
      assert record[metric]["value"] == pytest.approx(value, abs=1e-12), (name, metric)
      assert record[metric]["ci_low"] <= value <= record[metric]["ci_high"], (name, metric)
      assert record[metric]["ci_high"] - record[metric]["ci_low"] > 1e-3  # resampled
  assert out["operating_points"]["resamples"] == 200


def test_other_rules_pick_their_thresholds_on_validation():
  _, val, _, out = _post_hoc("multi-label", rule="f1", resamples=0)
  for c, name in enumerate("abc"):
    precision, recall, thresholds = precision_recall_curve(val["labels"][:, c],
                                                           val["probs"][:, c])
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = thresholds[np.argmax(f1[:-1])]
    assert out["thresholds"]["per_class"][name] == pytest.approx(best, rel=1e-12)
    assert out["operating_points"]["classes"][name]["f1"]["ci_low"] is None  # no resamples
  for rule, target in (("sensitivity:0.9", 0.9), ("specificity:0.8", 0.8)):
    _, val, _, out = _post_hoc("multi-label", rule=rule, resamples=0)
    assert out["thresholds"]["rule"] == rule
    for c, name in enumerate("abc"):
      y, p = val["labels"][:, c] >= 0.5, val["probs"][:, c]
      t = out["thresholds"]["per_class"][name]
      if rule.startswith("sensitivity"):
        assert np.mean(p[y] >= t) >= target
        assert np.mean(p[y] >= np.min(p[p > t])) < target  # the next score up misses it
      else:
        assert np.mean(p[~y] < t) >= target
        assert np.mean(p[~y] < np.max(p[p < t])) < target


def test_rule_and_resamples_are_checked():
  config = config_lib.default_config()
  for rule in ("youden", "f1", "sensitivity:0.95", "specificity:1"):
    config.eval.threshold_rule = rule
    classification.validate(config)
  for rule in ("youdens", "sensitivity", "specificity:1.5", "f1:0.9", "sensitivity:x"):
    config.eval.threshold_rule = rule
    with pytest.raises(ValueError, match=r"config.eval.threshold_rule=.*sensitivity:T"):
      classification.validate(config)
  config.eval.threshold_rule = "youden"
  config.eval.bootstrap_resamples = -1
  with pytest.raises(ValueError, match="config.eval.bootstrap_resamples"):
    classification.validate(config)


def _logit(p):
  return np.log(p) - np.log1p(-p)


def _floats(values):
  """A result.json list of numbers (None where undefined) as floats (NaN)."""
  return np.array([np.nan if v is None else v for v in values], np.float64)


def test_calibration_equals_calibration_curve_and_brier_score_loss_multi_label():
  _, val, test, out = _post_hoc("multi-label", resamples=0)
  calibrated = out["calibration"]
  t = calibrated["temperature"]
  assert 1.5 < t < 4  # predictions were sharpened 2.5 times
  nll = lambda temp: np.mean([log_loss(val["labels"][:, c], 1 / (1 + np.exp(
      -_logit(np.clip(val["probs"][:, c], 1e-7, 1 - 1e-7)) / temp)), labels=[0, 1])
                              for c in range(3)])
  assert nll(t) <= min(nll(t * 0.99), nll(t * 1.01))  # the validation NLL's minimum
  scaled = 1 / (1 + np.exp(-_logit(np.clip(test["probs"], 1e-7, 1 - 1e-7)) / t))
  edges = np.linspace(0, 1, 16)
  for when, probs in (("before", test["probs"]), ("after", scaled)):
    eces = []
    for c, name in enumerate("abc"):
      y, p = test["labels"][:, c], probs[:, c]
      assert calibrated[when][f"brier/{name}"] == pytest.approx(brier_score_loss(y, p),
                                                                abs=1e-12)
      prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy="uniform")
      bins = calibrated["reliability"][when][name]
      filled = np.array(bins["count"]) > 0
      np.testing.assert_allclose(_floats(bins["fraction_positive"])[filled], prob_true,
                                 atol=1e-6)
      np.testing.assert_allclose(_floats(bins["mean_predicted"])[filled], prob_pred,
                                 atol=1e-6)
      assert all(v is None for v in np.array(bins["mean_predicted"], object)[~filled])
      counts = np.histogram(p, edges)[0]  # numpy puts edge values in the upper bin
      ece = np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / len(p)
      assert calibrated[when][f"ece_uniform/{name}"] == pytest.approx(ece, abs=1e-9)
      quantile_true, quantile_pred = calibration_curve(y, p, n_bins=15, strategy="quantile")
      assert calibrated[when][f"ece_quantile/{name}"] == pytest.approx(
          np.mean(np.abs(quantile_true - quantile_pred)), abs=0.01)  # about equal masses
      eces.append(calibrated[when][f"ece_uniform/{name}"])
    assert calibrated[when]["ece_uniform"] == pytest.approx(np.mean(eces), abs=1e-12)
    assert calibrated[when]["brier"] == pytest.approx(
        np.mean([brier_score_loss(test["labels"][:, c], probs[:, c]) for c in range(3)]))
  assert calibrated["after"]["ece_uniform"] < 0.5 * calibrated["before"]["ece_uniform"]
  assert calibrated["after"]["brier"] < calibrated["before"]["brier"]


def test_calibration_of_multi_class_sets_uses_the_top_label():
  task, _, test, out = _post_hoc("multi-class", k=4, resamples=0)
  calibrated = out["calibration"]
  top = test["probs"].argmax(1) == test["labels"].argmax(1)
  prob_true, prob_pred = calibration_curve(top, test["probs"].max(1), n_bins=15)
  bins = calibrated["reliability"]["before"]["top_label"]
  filled = np.array(bins["count"]) > 0
  np.testing.assert_allclose(_floats(bins["fraction_positive"])[filled], prob_true, atol=1e-6)
  np.testing.assert_allclose(_floats(bins["mean_predicted"])[filled], prob_pred, atol=1e-6)
  assert calibrated["before"]["ece_uniform"] == calibrated["before"]["ece_uniform/top_label"]
  assert calibrated["before"]["brier"] == pytest.approx(
      brier_score_loss(test["labels"].argmax(1), test["probs"]), abs=1e-12)
  assert set(calibrated["reliability"]["after"]) == {"top_label", *task.class_names}
  assert calibrated["after"]["ece_uniform"] < calibrated["before"]["ece_uniform"]


def test_run_summary_of_post_hoc_records():
  records = []
  for seed in range(3):
    _, _, _, out = _post_hoc("multi-label", resamples=0, seed=10 * seed)
    records.append({"seed": seed, "test": {"mean_auc": 0.8}, **out})
  records.append({"seed": 3, "test": {"mean_auc": 0.8}})  # a trial without the records
  summary = results_lib.post_hoc_summary(records)["post_hoc"]
  sensitivity = [r["operating_points"]["classes"]["b"]["sensitivity"]["value"]
                 for r in records[:3]]
  assert summary["operating_points"]["rule"] == "youden"
  got = summary["operating_points"]["classes"]["b"]["sensitivity"]
  assert got["n"] == 3 and got["mean"] == pytest.approx(np.mean(sensitivity))
  assert got["std"] == pytest.approx(np.std(sensitivity, ddof=1))
  temperatures = [r["calibration"]["temperature"] for r in records[:3]]
  assert summary["calibration"]["temperature"]["mean"] == pytest.approx(np.mean(temperatures))
  assert summary["calibration"]["after"]["brier"]["n"] == 3
  assert "surface" not in summary
  assert results_lib.post_hoc_summary(records[3:]) == {}  # runs from before: no key
  json.dumps(summary, allow_nan=False)
