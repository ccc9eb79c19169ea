"""evaluate.py: re-testing a finished run reproduces its test metrics exactly; external
validation scores the findings two data sets share, matched by name; a trial's variables
reach the devices of several processes without comparing them across processes."""

import csv
import json
import subprocess
import sys
import textwrap

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


# ---------------------------------------------------------------- placing the variables

_PLACE = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from medbench_jax import runtime
    from medbench_jax.trainer import sharding

    runtime.join(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
    compared = []
    assert_equal = multihost_utils.assert_equal
    multihost_utils.assert_equal = lambda *a, **k: (compared.append(1), assert_equal(*a, **k))
    rng = np.random.default_rng(0)  # the same in both processes, like one weights file
    variables = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype("f4")},
                            "fc": {"bias": np.arange(5, dtype=np.float32)}},
                 "batch_stats": {"bn": {"mean": np.ones(4, np.float32)}}}
    mesh = sharding.make_mesh()
    placed = sharding.put_replicated(variables, mesh)
    by_put_replicated = len(compared)
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(variables)):
      assert got.sharding == sharding.replicated(mesh) and not got.is_fully_addressable
      assert got.shape == want.shape and got.dtype == want.dtype
      for shard in got.addressable_shards:
        np.testing.assert_array_equal(shard.data, want)
    jax.device_put(variables, sharding.replicated(mesh))
    print(json.dumps({"devices": jax.device_count(), "put_replicated": by_put_replicated,
                      "device_put": len(compared) - by_put_replicated}))
""")


@pytest.mark.timeout(180)
def test_variables_are_replicated_over_two_processes_without_comparing_them():
  """sharding.put_replicated (evaluate.py and study/probe.py place each trial's or
  candidate's variables with it) in two loopback processes of 2 devices each: every
  device holds the variables, and no leaf is compared across processes, where
  jax.device_put compares each (multihost assert_equal, counted)."""
  port = str(helpers.free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _PLACE, port, str(i)], cwd=helpers.REPO,
                            env=helpers.subprocess_env(2, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=150)[0] for p in procs]
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts == {"devices": 4, "put_replicated": 0, "device_put": 3}, counts
