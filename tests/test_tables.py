"""Readable init labels and Markdown tables."""

import math

import numpy as np
import pandas as pd
import pytest

from medbench_jax.study import tables


def test_readable_inits_are_short_and_distinct():
  labels = tables.readable_inits([
      "random", "imagenet", "timm:resnet50.a1_in1k", "/ckpt/moco_v2_800ep.pth",
      "byol:/w/pretrain_res50x1.pkl", "run:/sweeps/chain/resnet50_moco/trial_0",
      "/a/x/model.pth", "/b/x/model.pth", "/ckpt/resnet50_mocov2/"])
  assert labels == {
      "random": "random", "imagenet": "imagenet", "timm:resnet50.a1_in1k": "timm:resnet50.a1_in1k",
      "/ckpt/moco_v2_800ep.pth": "moco_v2_800ep.pth",
      "byol:/w/pretrain_res50x1.pkl": "byol:pretrain_res50x1.pkl",
      "run:/sweeps/chain/resnet50_moco/trial_0": "run:resnet50_moco/trial_0",
      "/a/x/model.pth": "a/x/model.pth", "/b/x/model.pth": "b/x/model.pth",
      "/ckpt/resnet50_mocov2/": "resnet50_mocov2"}
  assert len(set(labels.values())) == len(labels)


def test_cells_and_p_values():
  row = pd.Series({"mean": 0.81234, "std": 0.00456, "n": 2, "asked": 3.0})
  assert tables.format_cell(row) == "0.8123 ± 0.0046 (2/3)"
  assert tables.format_cell(row.copy().replace({3.0: 2.0})) == "0.8123 ± 0.0046 (2)"
  assert tables.format_cell(pd.Series({"mean": 0.8, "std": math.nan, "n": 1})) == "0.8000 (1)"
  # The paper's convention (np.std, ddof=0) in brackets, where the summary has it.
  values = np.array([0.80, 0.81, 0.83])
  row = pd.Series({"mean": values.mean(), "std": values.std(ddof=1),
                   "std_paper": values.std(ddof=0), "n": 3})
  assert tables.format_cell(row) == "0.8133 ± 0.0153 [0.0125] (3)"
  assert tables.format_cell(pd.Series({"mean": 0.8, "std": math.nan, "std_paper": 0.0,
                                       "n": 1})) == "0.8000 (1)"
  assert tables.format_p(0.0123) == "0.012" and tables.format_p(2.5e-5) == "2.50e-05"
  assert tables.format_p(math.nan) == "—"
  assert tables.format_fraction(0.01) == "1%" and tables.format_fraction(1.0) == "100%"


def test_markdown_table_escapes_pipes():
  expected = "| a | b |\n| --- | --- |\n| x\\|y | 1 |"
  assert tables.markdown_table(["a", "b"], [["x|y", 1]]) == expected


def _setting():
  rows = []
  for model, init, mean, p in [("resnet50", "imagenet", 0.80, math.nan),
                               ("resnet50", "random", 0.70, 0.001),
                               ("swin", "imagenet", 0.83, 0.04),
                               ("swin", "random", 0.79, 0.5)]:
    rows.append({"task": "classification", "dataset": "d", "model": model, "init": init,
                 "init_label": init, "label_fraction": 1.0, "metric": "mean_auc",
                 "mean": mean, "std": 0.01, "n": 3, "asked": 3, "p_value": p})
  return pd.DataFrame(rows)


def test_models_by_inits_marks_what_survives_correction():
  setting = _setting()
  text, tests = tables.models_by_inits(setting, setting, ("resnet50", "imagenet"), alpha=0.05)
  lines = text.splitlines()
  assert lines[0] == ("| model \\ init: mean ± std (ddof=1) [std (ddof=0), as the paper] (n) "
                      "| imagenet | random |")
  assert lines[2] == "| resnet50 | **0.8000 ± 0.0100 (3)** | 0.7000 ± 0.0100 (3) *†‡ |"
  # p = 0.04 survives neither Holm (0.08) nor BH (0.06) over these three tests.
  assert lines[3] == "| swin | 0.8300 ± 0.0100 (3) * | 0.7900 ± 0.0100 (3) |"
  assert tests.set_index("init_label").loc["random"].iloc[0]["delta"] == pytest.approx(-0.1)
  assert "| swin | imagenet | +0.0300 | 0.040 | 0.080 | 0.060 |" in text
