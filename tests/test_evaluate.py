"""evaluate.py: re-testing a finished run reproduces its test metrics exactly; external
validation scores the findings two data sets share, matched by name."""

import csv
import json

import pytest

from medbench_jax import evaluate
from tests import helpers

CXR14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
         "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
         "Pleural_Thickening", "Hernia")
CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
            "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
            "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
            "Support Devices")
VINDR_STUDY = ("PE", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases",
               "No finding")


def test_findings_are_matched_by_name_and_synonym():
  pairs = evaluate.match_classes(CXR14, CHEXPERT)
  named = {CXR14[i]: CHEXPERT[j] for i, j in pairs}
  assert named == {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
                   "Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
                   "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
                   "Edema": "Edema"}
  named = {CXR14[i]: VINDR_STUDY[j] for i, j in evaluate.match_classes(CXR14, VINDR_STUDY)}
  assert named == {"Effusion": "PE", "Pneumonia": "Pneumonia"}
  assert evaluate.match_classes(("pleural_thickening",), ("Pleural thickening",)) == [(0, 0)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phantom_dir):
  workdir = tmp_path_factory.mktemp("run")
  helpers.main(workdir, phantom_dir, f"--config={helpers.TINY}")
  return workdir


def _evaluate(workdir, *overrides):
  return helpers.run_module("medbench_jax.evaluate", f"--workdir={workdir}", *overrides)


@pytest.mark.e2e
def test_evaluate_reproduces_the_runs_own_test_metrics(finished_run):
  out = _evaluate(finished_run)
  run = json.loads((finished_run / "results.json").read_text())
  result = json.loads((finished_run / "eval" / "phantom_cxr.json").read_text())
  assert [t["test"] for t in result["trials"]] == [t["test"] for t in run["trials"]]
  assert result["summary"] == run["summary"]
  assert result["class_mapping"]["model_only"] == result["class_mapping"]["data_only"] == []
  assert json.loads(out.strip().splitlines()[-1])["mean"] == run["summary"]["mean"]


@pytest.mark.e2e
def test_external_validation_scores_the_shared_findings(finished_run, phantom_dir, tmp_path):
  """The phantom test images as another publisher might label them: other names, another
  order, a finding the run never learnt. Same images, so each shared finding's AUC is the
  run's own."""
  rows = [r.split() for r in (phantom_dir / "phantom_test.txt").read_text().splitlines()]
  train_rows = [r.split() for r in (phantom_dir / "phantom_train.txt").read_text().splitlines()]
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "split", "pneumothorax", "Pleural Effusion", "Fracture"])
    for split, source in (("train", train_rows[:8]), ("val", train_rows[8:12]),
                          ("test", rows)):
      for name, cardio, nodule, effusion, pneumothorax in source:
        del cardio, nodule
        writer.writerow([f"images/{name}", split, pneumothorax, effusion, "0"])
  (tmp_path / "images").symlink_to(phantom_dir / "images")
  _evaluate(finished_run, "--config.dataset.name=csv_folder",
            f"--config.dataset.manual_dir={tmp_path}",
            "--config.dataset.csv.labels=pneumothorax,Pleural Effusion,Fracture")
  run = json.loads((finished_run / "results.json").read_text())
  result = json.loads((finished_run / "eval" / "csv_folder.json").read_text())
  assert result["class_mapping"] == {
      "shared": [["Effusion", "Pleural Effusion"], ["Pneumothorax", "pneumothorax"]],
      "model_only": ["Cardiomegaly", "Nodule"], "data_only": ["Fracture"]}
  assert result["dataset"] == "csv_folder" and result["source_dataset"] == "phantom_cxr"
  for own, external in zip(run["trials"], result["trials"]):
    assert external["test"]["auc/Pleural Effusion"] == pytest.approx(
        own["test"]["auc/Effusion"], abs=1e-9)
    assert external["test"]["auc/pneumothorax"] == pytest.approx(
        own["test"]["auc/Pneumothorax"], abs=1e-9)
    assert "auc/Fracture" not in external["test"]
