"""The sweep report end to end, against numpy/scipy/statsmodels/scikit-learn on the same
files; trials with and without post-hoc records (operating points, calibration, surfaces)."""

import json
import math
import pathlib
import subprocess
import sys
import types

from matplotlib import image as mpl_image
import numpy as np
import pandas as pd
import pytest
import scipy.special
import scipy.stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from medbench_jax import config_lib
from medbench_jax.study import post_hoc
from medbench_jax.study import report
from medbench_jax.study import runs
from medbench_jax.study import tables
from medbench_jax.tasks import classification
from medbench_jax.tasks import segmentation
from tests import study_sweep

KEY = ["task", "dataset", "model", "init", "label_fraction"]
BASELINE = "resnet50/imagenet"


def _expected_groups(root: pathlib.Path) -> dict:
  """(task, dataset, model, init, fraction) -> {seed: value}, read straight from the files."""
  groups = {}
  for path in root.rglob("results.json"):
    results = json.loads(path.read_text())
    key = tuple(results[k] for k in KEY)
    for trial in results["trials"]:
      groups.setdefault(key, {})[trial["seed"]] = trial["test"][results["metric"]]
  return groups


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  study_sweep.write_sweep(root)
  out = tmp_path_factory.mktemp("report")
  result = report.build(root, out, baseline=BASELINE, num_resamples=200, seed=0)
  return root, out, result


def test_summary_equals_numpy_and_scipy(sweep):
  root, out, _ = sweep
  summary = pd.read_csv(out / "summary.csv")
  assert list(summary.columns)[:10] == [*KEY, "metric", "mean", "std", "n", "p_value"]
  assert list(summary.columns)[10:] == ["std_paper"]
  groups = _expected_groups(root)
  assert len(summary) == len(groups) == 47
  for _, row in summary.iterrows():
    key = tuple(row[k] for k in KEY)
    values = np.array(list(groups[key].values()))
    assert row["n"] == len(values)
    assert row["mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert row["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert row["std_paper"] == pytest.approx(values.std(ddof=0), abs=1e-12)
    base_key = (row["task"], row["dataset"], "resnet50", "imagenet", row["label_fraction"])
    if (row["model"], row["init"]) == ("resnet50", "imagenet") or base_key not in groups:
      assert math.isnan(row["p_value"]), key
    else:
      expected = scipy.stats.ttest_ind(values, list(groups[base_key].values())).pvalue
      assert row["p_value"] == pytest.approx(expected, rel=1e-9), key
  # The segmentation task has no resnet50/imagenet run: no p-values there.
  assert summary.loc[summary["task"] == "segmentation", "p_value"].isna().all()
  assert summary["p_value"].notna().sum() == 5 * 8


def test_corrections_equal_statsmodels_per_table(sweep):
  _, out, _ = sweep
  tests = pd.read_csv(out / "tests.csv")
  summary = pd.read_csv(out / "summary.csv").set_index(KEY)
  tables = tests.groupby("table")
  # 5 settings x models-by-inits + 1 data set across label fractions + segmentation.
  assert tables.ngroups == 7
  for name, table in tables:
    tested = table.dropna(subset=["p_value"])
    if name.startswith("models x inits: montgomery"):
      assert tested.empty
      continue
    assert len(tested) == (24 if name.startswith("label fractions") else 8), name
    np.testing.assert_allclose(tested["p_value"],
                               summary.loc[list(map(tuple, tested[KEY].to_numpy())),
                                           "p_value"], rtol=1e-12)
    for method, column in (("holm", "p_holm"), ("fdr_bh", "p_bh")):
      expected = multipletests(tested["p_value"], method=method)[1]
      np.testing.assert_allclose(tested[column], expected, rtol=1e-12, err_msg=name)


def test_markers_follow_the_corrected_p_values(sweep):
  _, out, _ = sweep
  text = (out / "report.md").read_text()
  tests = pd.read_csv(out / "tests.csv")
  table = tests[tests["table"] == "models x inits: chestxray14 (classification), 10% labels"]
  section = text.split("### 10% labels: models × inits")[1].split("Tests against")[0]
  for _, row in table.dropna(subset=["p_value"]).iterrows():
    label = "moco_v2_800ep.pth" if row["init"] == study_sweep.MOCO else row["init"]
    marks = ("*" if row["p_value"] < 0.05 else "") + ("†" if row["p_holm"] < 0.05 else "") + (
        "‡" if row["p_bh"] < 0.05 else "")
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {row['model']} |"))
    header = next(ln for ln in section.splitlines() if ln.startswith("| model \\ init"))
    column = [c.strip() for c in header.split("|")].index(label)
    cell = [c.strip() for c in line.split("|")][column]
    assert cell.startswith(f"{row['mean']:.4f} ± ")
    assert cell.endswith(f") {marks}" if marks else ")"), (cell, marks)
    # Beside the sample std, the paper's np.std (ddof=0) of the same trials.
    summary = pd.read_csv(out / "summary.csv").set_index([*KEY])
    std_paper = summary.loc[tuple(row[k] for k in KEY), "std_paper"]
    assert f"[{std_paper:.4f}]" in cell, (cell, std_paper)
  assert "ddof=0" in header
  assert "**" in section  # the baseline's cell


def test_problem_runs_are_listed(sweep):
  _, out, result = sweep
  problems = pd.read_csv(out / "problems.csv")
  kinds = dict(zip(problems["run"], problems["kind"]))
  assert kinds == {
      "data=chestxray14,model=densenet121,init=random,fraction=0.1": "incomplete",
      "model=vit_base_patch16_224,init=random": "missing",
      "model=convnext_tiny,init=random": "failed",
      "model=convnext_tiny,init=run:failed": "blocked"}
  assert len(result.problems) == 4
  text = (out / "report.md").read_text()
  assert "## Runs not used as asked (4)" in text
  for run in kinds:
    assert run in text
  assert "NaN loss at step 12" in text and "2 of 3 trials" in text
  assert "0.0000 (2/3)" not in text and "(2/3)" in text  # the incomplete cell says so


def test_all_plots_exist_and_show_something(sweep):
  _, out, result = sweep
  expected = {f"bars_classification_chestxray14_{f}.png" for f in ("0.1", "0.5", "1")}
  expected |= {f"trials_classification_chestxray14_{f}.png" for f in ("0.1", "0.5", "1")}
  for dataset in ("shenzhen_cxr", "vindr_cxr"):
    expected |= {f"bars_classification_{dataset}_1.png", f"trials_classification_{dataset}_1.png"}
  expected |= {"bars_segmentation_montgomery_1.png", "trials_segmentation_montgomery_1.png",
               "efficiency_classification_chestxray14.png", "ranks_classification_1_cd.png"}
  assert {p.name for p in result.plots} == expected
  text = (out / "report.md").read_text()
  for name in expected:
    path = out / "plots" / name
    assert path.stat().st_size > 10_000, name
    pixels = mpl_image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400, name
    assert pixels[..., :3].std() > 0.05, name  # not a blank canvas
    assert f"(plots/{name})" in text


def test_ranks_and_friedman(sweep):
  root, out, _ = sweep
  text = (out / "report.md").read_text()
  groups = _expected_groups(root)
  datasets = ("chestxray14", "shenzhen_cxr", "vindr_cxr")
  candidates = [(m, i) for m in study_sweep.MODELS for i in study_sweep.INITS]
  means = np.array([[np.mean(list(groups[("classification", d, m, i, 1.0)].values()))
                     for m, i in candidates] for d in datasets])
  expected = scipy.stats.friedmanchisquare(*means.T)
  assert f"Friedman χ² = {expected.statistic:.3f}" in text
  nemenyi = pd.read_csv(out / "ranks_classification_1_nemenyi.csv", index_col=0)
  assert nemenyi.shape == (9, 9)
  assert (np.diag(nemenyi) == 1).all()
  assert "### classification, 10% labels\n\nNot tested: 9 candidate(s) over 1 data set" in text


def test_bootstrap_intervals_and_delong(sweep):
  root, out, _ = sweep
  intervals = pd.read_csv(out / "bootstrap.csv")
  groups = _expected_groups(root)
  assert len(intervals) == sum(map(len, groups.values()))
  for _, row in intervals.iterrows():
    value = groups[tuple(row[k] for k in KEY)][row["seed"]]
    assert row["value"] == pytest.approx(value, abs=1e-9)  # recomputed from predictions
    assert row["ci_low"] < row["value"] < row["ci_high"]
  assert (intervals["resamples"] == 200).all()
  delong = pd.read_csv(out / "delong.csv")
  # 8 candidates x 3 seeds x 3 classes per classification setting; the incomplete
  # run lacks seed 2.
  assert len(delong) == 5 * 8 * 3 * 3 - 3
  row = delong.iloc[0]
  workdir = next(p.parent for p in root.rglob("results.json")
                 if json.loads(p.read_text())["model"] == row["model"] and
                 json.loads(p.read_text())["init"] == row["init"] and
                 json.loads(p.read_text())["dataset"] == row["dataset"] and
                 json.loads(p.read_text())["label_fraction"] == row["label_fraction"])
  predictions = np.load(workdir / f"trial_{row['seed']}" / "test_predictions.npz")
  column = list(predictions["class_names"]).index(row["class"])
  assert row["auc"] == pytest.approx(
      roc_auc_score(predictions["labels"][:, column], predictions["probs"][:, column]))
  assert delong["p_value"].between(0, 1).all()
  for _, table in delong.groupby(["dataset", "label_fraction"]):
    np.testing.assert_allclose(table["p_holm"],
                               multipletests(table["p_value"], method="holm")[1])


@pytest.mark.parametrize("test", ["welch", "paired"])
def test_other_tests_equal_scipy(sweep, tmp_path, test):
  root, _, _ = sweep
  result = report.build(root, tmp_path, baseline=BASELINE, test=test, num_resamples=0,
                        with_plots=False)
  summary = pd.read_csv(tmp_path / "summary.csv")
  groups = _expected_groups(root)
  for _, row in summary.dropna(subset=["p_value"]).iterrows():
    own = groups[tuple(row[k] for k in KEY)]
    base = groups[(row["task"], row["dataset"], "resnet50", "imagenet", row["label_fraction"])]
    if test == "welch":
      expected = scipy.stats.ttest_ind(list(own.values()), list(base.values()),
                                       equal_var=False).pvalue
    else:
      seeds = sorted(set(own) & set(base))
      expected = scipy.stats.ttest_rel([own[s] for s in seeds], [base[s] for s in seeds]).pvalue
    assert row["p_value"] == pytest.approx(expected, rel=1e-9)
  unpaired = [p for p in result.problems if p.kind == "unpaired_seeds"]
  assert len(unpaired) == (1 if test == "paired" else 0)
  assert not (tmp_path / "bootstrap.csv").exists()
  assert not result.plots and not (tmp_path / "plots").exists()
  assert "![" not in (tmp_path / "report.md").read_text()


def test_probe_scores_beside_fine_tuned_means(sweep, tmp_path):
  root, _, _ = sweep
  groups = _expected_groups(root)
  lines, logme, fine_tuned = [], [], []
  rng = np.random.default_rng(0)
  for model in study_sweep.MODELS:
    for init in study_sweep.INITS:
      mean = np.mean(list(groups[("classification", "chestxray14", model, init, 1.0)].values()))
      logme.append(mean + rng.normal(0, 0.02))
      fine_tuned.append(mean)
      lines.append({"task": "classification", "dataset": "chestxray14", "model": model,
                    "init": init, "label_fraction": 1.0, "logme": logme[-1],
                    "linear_probe": None})
  lines.append({"task": "classification", "dataset": "chestxray14", "model": "vit_base_patch16_224",
                "init": "random", "label_fraction": 1.0, "logme": -1.2, "linear_probe": 0.6})
  probe = tmp_path / "probe.jsonl"
  probe.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  report.build(root, tmp_path / "out", baseline=BASELINE, probe=probe, num_resamples=0,
               with_plots=False)
  correlations = pd.read_csv(tmp_path / "out" / "probe_correlations.csv")
  assert len(correlations) == 1  # linear_probe is null for every run with a mean
  row = correlations.iloc[0]
  assert row["score"] == "logme" and row["candidates"] == 9
  assert row["spearman"] == pytest.approx(scipy.stats.spearmanr(logme, fine_tuned).statistic)
  assert row["weighted_tau"] == pytest.approx(
      scipy.stats.weightedtau(logme, fine_tuned).statistic)
  text = (tmp_path / "out" / "report.md").read_text()
  assert "| vit_base_patch16_224 | random | -1.2000 | 0.6000 | — (no run) |" in text
  assert "linear_probe: 0 candidate(s) with a score and a fine-tuned mean" in text


def test_cli_without_sweep_json_and_baseline_by_label(tmp_path):
  root = tmp_path / "runs"
  study_sweep.write_sweep(root, fractions=(1.0,), datasets=("chestxray14",),
                          with_sweep_json=False)
  out = tmp_path / "out"
  completed = subprocess.run(
      [sys.executable, "-m", "medbench_jax.report", f"--runs={root}", f"--out={out}",
       "--baseline=resnet50/moco_v2_800ep.pth", "--bootstrap_resamples=50"],
      capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr
  assert "Wrote" in completed.stdout
  summary = pd.read_csv(out / "summary.csv")
  baseline_rows = (summary["model"] == "resnet50") & (summary["init"] == study_sweep.MOCO)
  assert summary.loc[baseline_rows, "p_value"].isna().all()
  assert summary.loc[~baseline_rows & (summary["task"] == "classification"),
                     "p_value"].notna().all()
  # Without sweep.json only what is on disk is known: the failed and blocked runs'
  # status.json and the run short of config.num_trials.
  problems = pd.read_csv(out / "problems.csv")
  assert sorted(problems["kind"]) == ["blocked", "failed", "incomplete"]
  assert "cls/chestxray14/densenet121_random_f1" in set(problems["workdir"])
  failed = subprocess.run(
      [sys.executable, "-m", "medbench_jax.report", f"--runs={root}", f"--out={out}",
       "--baseline=resnet50/in21k", "--noplots"],
      capture_output=True, text=True, timeout=600, check=False)
  assert failed.returncode == 1
  assert failed.stderr.strip().endswith(
      "report: --baseline=resnet50/in21k: no finished run has it. Available: "
      "densenet121/imagenet, densenet121/moco_v2_800ep.pth, densenet121/random, "
      "resnet50/imagenet, resnet50/moco_v2_800ep.pth, resnet50/random, "
      "swin_tiny_patch4_window7_224/imagenet, swin_tiny_patch4_window7_224/moco_v2_800ep.pth, "
      "swin_tiny_patch4_window7_224/random, unet_resnet50/imagenet, unet_resnet50/random")


def test_unknown_baseline_lists_the_candidates(sweep, tmp_path):
  root, _, _ = sweep
  with pytest.raises(ValueError, match=r"no finished run has it.*resnet50/moco_v2_800ep.pth"):
    report.build(root, tmp_path, baseline="resnet50/in21k", num_resamples=0)
  with pytest.raises(ValueError, match="MODEL/INIT"):
    report.build(root, tmp_path, baseline="resnet50", num_resamples=0)


# ------------------------------------------------------------------ post-hoc records
def _classification_records(kind, seeds, quality):
  """Trial records with Classification.post_hoc's keys, and each trial's test arrays."""
  config = config_lib.default_config()
  config.eval.bootstrap_resamples = 100
  info = types.SimpleNamespace(name="x", task=kind, class_names=study_sweep.CLASSES,
                               eval_class_names=study_sweep.CLASSES)
  task = classification.Classification(config, info)
  records, tests = [], []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    splits = []
    for n in (150, 200):
      if kind == "multi-class":
        labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
        probs = scipy.special.softmax(quality * 4 * labels + rng.normal(size=labels.shape), 1)
      else:
        labels = (rng.uniform(size=(n, 3)) < 0.3).astype(np.float32)
        probs = 1 / (1 + np.exp(-quality * 1.5 * (2 * labels - 1) - rng.normal(size=(n, 3))))
      splits.append({"labels": labels, "probs": probs, "loss": np.zeros(n)})
    validation, test = splits
    records.append({"seed": seed, "best_step": 1, "best_val_loss": 0.3,
                    "test": task.metrics(test), **task.post_hoc(validation, test)})
    tests.append(test)
  return records, tests


def _segmentation_records(seeds):
  config = config_lib.default_config()
  info = types.SimpleNamespace(name="montgomery", task="segmentation",
                               class_names=study_sweep.SEG_CLASSES,
                               eval_class_names=study_sweep.SEG_CLASSES, has_fov=False)
  task = segmentation.Segmentation(config, info)
  records = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    truth = np.zeros((5, 24, 24, 1), np.uint8)
    pred = np.zeros_like(truth)
    for i in range(5):
      r, c = rng.integers(2, 12, 2)
      truth[i, r:r + 8, c:c + 9] = 1
      pred[i, r + rng.integers(-2, 3):r + 8, c:c + 9 + rng.integers(-2, 3)] = 1
    pred[4] = 0  # a missed structure: the diagonal
    counts = {"intersection": (truth * pred).sum((1, 2)), "prediction_sum": pred.sum((1, 2)),
              "target_sum": truth.sum((1, 2))}
    test = segmentation.overlap_metrics(**counts)
    records.append({"seed": seed, "best_step": 1, "best_val_loss": 0.2, "test": test,
                    **task.post_hoc({}, {"predicted_mask": pred, "true_mask": truth})})
  return records


@pytest.fixture(scope="module")
def post_hoc_sweep(tmp_path_factory):
  """Runs with post-hoc records beside runs finished before trials recorded them."""
  root = tmp_path_factory.mktemp("post_hoc_sweep")
  recorded, tests = _classification_records("multi-label", (0, 1), quality=1.0)
  study_sweep.write_results(root / "cls/cxr/resnet50_imagenet", task="classification",
                            dataset="chestxray14", model="resnet50", init="imagenet",
                            fraction=1.0, trials=recorded, num_trials=2)
  old = [study_sweep.classification_trial(root / "cls/cxr/resnet50_random", k, k,
                                          "chestxray14", 0.5) for k in range(2)]
  study_sweep.write_results(root / "cls/cxr/resnet50_random", task="classification",
                            dataset="chestxray14", model="resnet50", init="random",
                            fraction=1.0, trials=old, num_trials=2)
  multi, _ = _classification_records("multi-class", (0,), quality=0.7)
  study_sweep.write_results(root / "cls/path/resnet50_imagenet", task="classification",
                            dataset="pathmnist", model="resnet50", init="imagenet",
                            fraction=1.0, trials=multi, num_trials=1)
  surfaces = _segmentation_records((0, 2))
  study_sweep.write_results(root / "seg/unet_imagenet", task="segmentation",
                            dataset="montgomery", model="unet_resnet50", init="imagenet",
                            fraction=1.0, trials=surfaces, num_trials=2)
  old = [study_sweep.segmentation_trial(root / "seg/unet_random", k, k, 1.0) for k in range(2)]
  study_sweep.write_results(root / "seg/unet_random", task="segmentation",
                            dataset="montgomery", model="unet_resnet50", init="random",
                            fraction=1.0, trials=old, num_trials=2)
  out = tmp_path_factory.mktemp("post_hoc_report")
  result = report.build(root, out, num_resamples=0)
  return root, out, result, {"recorded": recorded, "tests": tests, "multi": multi,
                             "surfaces": surfaces}


def test_operating_points_table_is_the_trials_mean(post_hoc_sweep):
  _, out, _, made = post_hoc_sweep
  frame = pd.read_csv(out / "operating_points.csv")
  assert len(frame) == 2 * 3 + 3  # two multi-label trials and one multi-class, 3 classes
  text = (out / "report.md").read_text()
  section = text.split("## Operating points at thresholds chosen on validation")[1].split(
      "\n## ")[0]
  for name in study_sweep.CLASSES:
    records = [r["operating_points"]["classes"][name] for r in made["recorded"]]
    rows = frame[(frame["dataset"] == "chestxray14") & (frame["class"] == name)]
    np.testing.assert_allclose(rows["sensitivity"], [r["sensitivity"]["value"] for r in records])
    np.testing.assert_allclose(rows["threshold"],
                               [r["thresholds"]["per_class"][name] for r in made["recorded"]])
    cells = [tables.format_interval(*(np.mean([r[m][k] for r in records])
                                      for k in ("value", "ci_low", "ci_high")), 3)
             for m in ("sensitivity", "specificity", "ppv", "npv", "f1",
                       "balanced_accuracy", "auprc")]
    threshold = np.mean([r["threshold"] for r in records])
    assert (f"| resnet50 | imagenet | {name} | youden | {threshold:.4f} | "
            + " | ".join(cells) + " | 2 |") in section
  assert "[" in cells[0]  # intervals shown
  assert ("- resnet50 / random, chestxray14 (classification), 100% labels: not recorded"
          in section)
  assert "pathmnist" in section and "resnet50 / imagenet, pathmnist" not in section


def test_calibration_table_and_reliability_diagrams(post_hoc_sweep):
  root, out, result, made = post_hoc_sweep
  text = (out / "report.md").read_text()
  section = text.split("## Calibration: a temperature fitted on validation")[1].split(
      "\n## ")[0]
  calibrations = [r["calibration"] for r in made["recorded"]]
  temperatures = [c["temperature"] for c in calibrations]
  ece = [tables.format_value(np.mean([c[w]["ece_uniform"] for c in calibrations]))
         for w in ("before", "after")]
  brier = [tables.format_value(np.mean([c[w]["brier"] for c in calibrations]))
           for w in ("before", "after")]
  line = next(ln for ln in section.splitlines() if ln.startswith("| resnet50 | imagenet |")
              and "→" in ln)
  assert f"{np.mean(temperatures):.3f} ± {np.std(temperatures, ddof=1):.3f}" in line
  assert f"{ece[0]} → {ece[1]}" in line and f"{brier[0]} → {brier[1]}" in line
  assert "- resnet50 / random, chestxray14 (classification), 100% labels: not recorded" in section
  # The diagram pools every trial's and class's equal-width bins: the diagram of all those
  # test predictions together (scikit-learn's calibration_curve).
  collection = runs.collect(root)
  found = post_hoc.collect(collection, runs.trials_frame(collection))
  diagram = found.reliability[("classification", "chestxray14", "resnet50", "imagenet", 1.0)]
  assert diagram["what"] == "all classes pooled" and diagram["trials"] == 2
  labels = np.concatenate([t["labels"].ravel() for t in made["tests"]])
  probs = np.concatenate([t["probs"].ravel() for t in made["tests"]])
  prob_true, prob_pred = calibration_curve(labels, probs, n_bins=15)
  filled = diagram["before"]["count"] > 0
  np.testing.assert_allclose(diagram["before"]["fraction_positive"][filled], prob_true,
                             atol=1e-5)
  np.testing.assert_allclose(diagram["before"]["mean_predicted"][filled], prob_pred, atol=1e-5)
  assert diagram["before"]["count"].sum() == len(labels)
  multi = found.reliability[("classification", "pathmnist", "resnet50", "imagenet", 1.0)]
  assert multi["what"] == "top label" and multi["before"]["count"].sum() == 200
  names = {p.name for p in result.plots}
  for name in ("reliability_classification_chestxray14_1.png",
               "reliability_classification_pathmnist_1.png"):
    assert name in names and f"(plots/{name})" in text
    pixels = mpl_image.imread(out / "plots" / name)
    assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05, name
  frame = pd.read_csv(out / "calibration.csv")
  assert len(frame) == 3
  np.testing.assert_allclose(frame.loc[frame["dataset"] == "chestxray14", "temperature"],
                             temperatures)


def test_surface_distances_table(post_hoc_sweep):
  _, out, _, made = post_hoc_sweep
  text = (out / "report.md").read_text()
  section = text.split("## Surface distances (segmentation)")[1].split("\n## ")[0]
  values = {k: [r["surface"][k] for r in made["surfaces"]]
            for k in ("hd95", "assd", "mean_hd95", "mean_assd")}
  dice = [r["test"]["dice"] for r in made["surfaces"]]
  line = next(ln for ln in section.splitlines() if ln.startswith("| unet_resnet50 | imagenet"))
  expected = [tables.format_spread(v) for v in (dice, *values.values())]
  assert line == ("| unet_resnet50 | imagenet | " + " | ".join(expected) + " | 2 | 2 |")
  # The missed image's border pixels, all at the diagonal, are over 5% of the pooled ones.
  np.testing.assert_allclose(values["hd95"], np.hypot(23, 23))
  assert 0 < np.mean(values["mean_hd95"]) < np.hypot(23, 23) / 2
  assert "- unet_resnet50 / random, montgomery (segmentation), 100% labels: not recorded" in (
      section)
  assert len(pd.read_csv(out / "surface.csv")) == 2


def test_runs_from_before_post_hoc_records_say_not_recorded(sweep):
  _, out, _ = sweep
  text = (out / "report.md").read_text()
  for line in ("Operating points: not recorded (trials finished before they recorded it), "
               "for every classification run.",
               "Calibration: not recorded (trials finished before they recorded it), for "
               "every classification run.",
               "Surface distances: not recorded (trials finished before they recorded it), "
               "for every segmentation run."):
    assert line in text
  for name in ("operating_points", "calibration", "surface"):
    assert pd.read_csv(out / f"{name}.csv").empty
