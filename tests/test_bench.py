"""`python -m medbench_jax.bench`: the input pipelines measured, the train and eval steps'
figures, usage errors."""

import json
import subprocess
import sys

import pytest
from absl import app

from medbench_jax import bench
from tests.configs import tiny


def test_input_bench_reports_ours_and_the_torch_reference(tmp_path):
  config = tiny.get_config()
  config.dataset.manual_dir = str(tmp_path / "phantom")
  config.dataset.data_dir = str(tmp_path / "tfds")
  lines = bench.bench_input(config, "tests/configs/tiny.py", steps=3, warmup=1,
                            torch_ref=True)
  assert [line["bench"] for line in lines] == ["input", "input_torch_reference"]
  for line in lines:
    assert line["images_per_s"] > 0
    assert (line["batch_size"], line["workers"], line["crop_size"]) == (16, 0, 64)
  assert lines[0]["speedup_vs_torch_reference"] == pytest.approx(
      lines[0]["images_per_s"] / lines[1]["images_per_s"], rel=0.01)


def test_reference_dataset_opens_pngs_as_rgb_like_the_reference_code(tmp_path):
  # torch stays out of this process (bench runs it in a fresh one): a plain transform.
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.png"))
    cv2.imwrite(paths[-1], np.full((40, 50), 60 * i, np.uint8))
  dataset = bench.PngDataset(paths, np.eye(3, dtype=np.float32), np.asarray)
  assert len(dataset) == 3
  image, labels = dataset[2]
  assert image.shape == (40, 50, 3) and (image == 120).all()
  np.testing.assert_array_equal(labels, [0, 0, 1])


_STEP_FIELDS = {"bench", "model", "framework", "batch_size", "image_size", "dtype", "steps",
                "trace_s", "compile_s", "first_step_s", "step_s", "step_cpu_s", "step_s_min",
                "step_s_max", "images_per_s", "peak_rss_mb", "device", "compilation_cache"}


def test_train_bench_prints_a_json_line_per_framework():
  result = subprocess.run(
      [sys.executable, "-m", "medbench_jax.bench", "train", "--model=resnet18", "--batch=2",
       "--image_size=32", "--steps=2"], capture_output=True, text=True, timeout=600,
      check=True)
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(lines) == 1
  line = lines[0]
  assert set(line) == _STEP_FIELDS, set(line) ^ _STEP_FIELDS
  assert (line["bench"], line["model"], line["framework"], line["batch_size"],
          line["image_size"], line["dtype"], line["steps"]) == (
              "train", "resnet18", "jax", 2, 32, "float32", 2)
  assert line["first_step_s"] >= line["trace_s"] + line["compile_s"]
  assert line["step_s_min"] <= line["step_s"] <= line["step_s_max"]
  assert line["images_per_s"] == pytest.approx(2 / line["step_s"])
  assert line["peak_rss_mb"] > 0
  # The table on stderr has a row for it.
  assert "first_step_s" in result.stderr and "jax" in result.stderr


def test_eval_bench_with_ten_crops_against_torch():
  lines = bench.bench_step("eval", "resnet18", batch_size=2, image_size=32, dtype="float32",
                           steps=2, compare_torch=True, ten_crop=True)
  assert [line["framework"] for line in lines] == ["jax", "torch"]
  for line in lines:
    assert (line["bench"], line["ten_crop"], line["batch_size"]) == ("eval", True, 2)
    assert line["images_per_s"] == pytest.approx(2 / line["step_s"])
  assert "torch_version" in lines[1] and "compile_s" not in lines[1]
  assert lines[0]["speed_vs_torch"] == pytest.approx(lines[1]["step_s"] / lines[0]["step_s"])


def test_ten_crop_is_an_eval_option():
  with pytest.raises(ValueError, match="eval step only"):
    bench.bench_step("train", "resnet18", batch_size=2, image_size=32, dtype="float32",
                     steps=1, compare_torch=False, ten_crop=True)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "fit"], ["bench", "input", "x"]])
def test_usage_error_lists_the_benchmarks(argv):
  with pytest.raises(app.UsageError, match="input,train,eval"):
    bench.main(argv)
