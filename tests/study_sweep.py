"""Writes a synthetic sweep in the trainer's and sweep runner's on-disk formats.

Metrics in results.json are computed here from the predictions with scikit-learn
(AUC) and numpy (Dice), so the report's recomputation is checked against them.
"""

import json
import pathlib

import numpy as np
from sklearn.metrics import roc_auc_score

CLASSES = ("Effusion", "Nodule", "Mass")
SEG_CLASSES = ("lung",)
BASELINE = ("resnet50", "imagenet")
MOCO = "/ckpt/moco_v2_800ep.pth"
MODELS = ("resnet50", "densenet121", "swin_tiny_patch4_window7_224")
INITS = ("random", "imagenet", MOCO)
# Signal strength of the synthetic scores per (model, init): distinct, so ranks exist.
QUALITY = {(m, i): 0.3 + 0.12 * a + 0.2 * b
           for a, m in enumerate(MODELS) for b, i in enumerate(INITS)}


def quality(dataset: str, model: str, init: str, fraction: float) -> float:
  """Signal of the scores: better with labels, shuffled a little per data set."""
  shuffle = np.random.default_rng([sum(map(ord, dataset + model + init))]).normal(0, 0.08)
  return (QUALITY[(model, init)] + shuffle) * (0.5 + fraction)


def _test_labels(dataset: str, num_examples: int) -> np.ndarray:
  rng = np.random.default_rng(sum(map(ord, dataset)))
  labels = (rng.uniform(size=(num_examples, len(CLASSES))) < [0.2, 0.35, 0.5])
  return labels.astype(np.float32)


def classification_trial(workdir: pathlib.Path, trial: int, seed: int, dataset: str,
                         quality: float, num_examples: int = 300,
                         save_predictions: bool = True) -> dict:
  labels = _test_labels(dataset, num_examples)
  rng = np.random.default_rng([seed, int(quality * 1000), sum(map(ord, dataset))])
  logits = quality * (2 * labels - 1) + rng.normal(size=labels.shape)
  probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
  test = {f"auc/{c}": float(roc_auc_score(labels[:, k], probs[:, k]))
          for k, c in enumerate(CLASSES)}
  test["mean_auc"] = float(np.mean(list(test.values())))
  test["loss"] = float(rng.uniform(0.2, 0.4))
  if save_predictions:
    (workdir / f"trial_{trial}").mkdir(parents=True, exist_ok=True)
    np.savez(workdir / f"trial_{trial}" / "test_predictions.npz", labels=labels, probs=probs,
             class_names=np.array(CLASSES))
  return {"seed": seed, "best_step": 100 + trial, "best_val_loss": 0.3, "test": test}


def segmentation_trial(workdir: pathlib.Path, trial: int, seed: int, quality: float,
                       num_examples: int = 40) -> dict:
  rng = np.random.default_rng([seed, int(quality * 1000)])
  target = rng.integers(0, 3000, size=(num_examples, 1))
  target[:3] = 0  # images without the structure
  prediction = np.maximum(0, target + rng.integers(-400, 400, size=target.shape) //
                          max(quality, 0.1)).astype(np.int64)
  prediction[0] = 0  # empty prediction of an empty target
  intersection = np.minimum(prediction, target) * rng.uniform(0.8, 1.0, target.shape)
  intersection = intersection.astype(np.int64)
  total = prediction + target
  per_image = np.where(total > 0, 2 * intersection / np.maximum(total, 1), 1.0)
  test = {"dice": float(2 * intersection.sum() / total.sum()),
          "mean_dice": float(per_image.mean()), "dice/lung": float(
              2 * intersection.sum() / total.sum()),
          "iou": float(intersection.sum() / (total.sum() - intersection.sum()))}
  (workdir / f"trial_{trial}").mkdir(parents=True, exist_ok=True)
  np.savez(workdir / f"trial_{trial}" / "test_predictions.npz", intersection=intersection,
           prediction_sum=prediction, target_sum=target, class_names=np.array(SEG_CLASSES))
  return {"seed": seed, "best_step": 50, "best_val_loss": 0.2, "test": test}


def write_results(workdir: pathlib.Path, *, task: str, dataset: str, model: str, init: str,
                  fraction: float, trials: list[dict], num_trials: int) -> None:
  metric = "mean_auc" if task == "classification" else "dice"
  values = np.array([t["test"][metric] for t in trials])
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps({
      "task": task, "metric": metric, "dataset": dataset, "model": model, "init": init,
      "label_fraction": fraction, "label_subset": {"fraction": fraction, "seed": 0},
      "class_names": list(CLASSES if task == "classification" else SEG_CLASSES),
      "skipped_examples": 0, "trials": trials,
      "summary": {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else
                  None, "std_paper": values.std(), "n": len(values)},
      "provenance": {}, "cost": {"wall_s": 1.0},
      "config": {"num_trials": num_trials, "model": {"name": model, "init": init}}}))


def write_sweep(root: pathlib.Path, *, fractions=(0.1, 0.5, 1.0), num_trials: int = 3,
                datasets=("chestxray14", "shenzhen_cxr", "vindr_cxr"),
                with_problems: bool = True, with_sweep_json: bool = True) -> list[dict]:
  """A sweep of MODELS x INITS over fractions (first data set) and data sets (full
  labels), a segmentation task, and -- with_problems -- one missing, one failed,
  one blocked and one incomplete run. Returns the sweep points."""
  points = []

  def point(name, workdir, depends_on=()):
    points.append({"name": name, "workdir": workdir, "num_trials": num_trials,
                   "depends_on": list(depends_on)})

  settings = [(datasets[0], f) for f in fractions] + [(d, 1.0) for d in datasets[1:]]
  for dataset, fraction in settings:
    for model in MODELS:
      for init in INITS:
        label = "moco" if init == MOCO else init
        name = f"data={dataset},model={model},init={label},fraction={fraction:g}"
        workdir = f"cls/{dataset}/{model}_{label}_f{fraction:g}"
        point(name, workdir)
        count = num_trials
        if with_problems and (dataset, model, init, fraction) == (
            datasets[0], "densenet121", "random", fractions[0]):
          count = num_trials - 1  # the incomplete run
        trials = [classification_trial(root / workdir, k, k, dataset,
                                       quality(dataset, model, init, fraction))
                  for k in range(count)]
        write_results(root / workdir, task="classification", dataset=dataset, model=model,
                      init=init, fraction=fraction, trials=trials, num_trials=num_trials)
  for init in ("random", "imagenet"):
    workdir = f"seg/montgomery/unet_resnet50_{init}"
    point(f"data=montgomery,model=unet_resnet50,init={init}", workdir)
    trials = [segmentation_trial(root / workdir, k, k, 1.0 + (init == "imagenet"))
              for k in range(num_trials)]
    write_results(root / workdir, task="segmentation", dataset="montgomery",
                  model="unet_resnet50", init=init, fraction=1.0, trials=trials,
                  num_trials=num_trials)
  if with_problems:
    point("model=vit_base_patch16_224,init=random", "cls/missing_vit")
    point("model=convnext_tiny,init=random", "cls/failed_convnext")
    failed = root / "cls/failed_convnext"
    failed.mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps(
        {"state": "failed", "reason": "NaN loss at step 12"}))
    point("model=convnext_tiny,init=run:failed", "cls/blocked_chain",
          depends_on=["model=convnext_tiny,init=random"])
    blocked = root / "cls/blocked_chain"
    blocked.mkdir(parents=True)
    (blocked / "status.json").write_text(json.dumps(
        {"state": "blocked", "reason": "depends on a failed run"}))
  if with_sweep_json:
    (root / "sweep.json").write_text(json.dumps({"sweep": "architectures", "points": points}))
  return points
