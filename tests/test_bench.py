"""`python -m medbench_jax.bench`: the input pipelines measured, the train and eval steps'
figures (from a config, overridden by flags; on its real input), usage errors."""

import json
import os
import subprocess
import sys

import pytest

from medbench_jax.benchmarks import input_speed
from medbench_jax.benchmarks import train_speed
from tests.configs import tiny


def _tiny_config(tmp_path):
  config = tiny.get_config()
  config.dataset.manual_dir = str(tmp_path / "phantom")
  config.dataset.data_dir = str(tmp_path / "tfds")
  return config


def _run_bench(cache, *args: str) -> tuple[list[dict], str]:
  """Runs the bench CLI; its results are recorded in `cache`, not in the user's cache."""
  env = dict(os.environ, MEDBENCH_CACHE=str(cache))
  result = subprocess.run([sys.executable, "-m", "medbench_jax.bench", *args], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
  return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_input_bench_reports_ours_and_the_torch_reference(tmp_path):
  config = _tiny_config(tmp_path)
  lines = input_speed.bench_input(config, "tests/configs/tiny.py", steps=3, warmup=1,
                            torch_ref=True)
  assert [line["bench"] for line in lines] == ["input", "input_torch_reference"]
  for line in lines:
    assert line["images_per_s"] > 0
    assert (line["batch_size"], line["workers"], line["crop_size"]) == (16, 0, 64)
  assert lines[0]["speedup_vs_torch_reference"] == pytest.approx(
      lines[0]["images_per_s"] / lines[1]["images_per_s"], rel=0.01)


def test_reference_dataset_opens_pngs_as_rgb_like_the_reference_code(tmp_path):
  # torch stays out of this process (bench runs it in a fresh one): a plain transform.
  import cv2
  import numpy as np
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.png"))
    cv2.imwrite(paths[-1], np.full((40, 50), 60 * i, np.uint8))
  dataset = input_speed.PngDataset(paths, np.eye(3, dtype=np.float32), np.asarray)
  assert len(dataset) == 3
  image, labels = dataset[2]
  assert image.shape == (40, 50, 3) and (image == 120).all()
  np.testing.assert_array_equal(labels, [0, 0, 1])


_STEP_FIELDS = {"bench", "model", "framework", "batch_size", "image_size", "dtype",
                "num_outputs", "steps", "trace_s", "compile_s", "first_step_s", "step_s",
                "step_cpu_s", "step_s_min", "step_s_max", "images_per_s", "input_wait",
                "flops_per_step", "mfu", "peak_rss_mb", "peak_device_memory_mb", "device",
                "compilation_cache"}


@pytest.mark.e2e
def test_train_bench_prints_a_json_line_per_framework(tmp_path):
  lines, stderr = _run_bench(tmp_path / "cache", "train", "--model=resnet18", "--batch=2",
                             "--image_size=32", "--steps=2", "--peak_tflops=0.5")
  assert len(lines) == 1
  line = lines[0]
  assert set(line) == _STEP_FIELDS, set(line) ^ _STEP_FIELDS
  assert (line["bench"], line["model"], line["framework"], line["batch_size"],
          line["image_size"], line["dtype"], line["num_outputs"], line["steps"]) == (
              "train", "resnet18", "jax", 2, 32, "float32", 14, 2)
  assert line["first_step_s"] >= line["trace_s"] + line["compile_s"]
  assert line["step_s_min"] <= line["step_s"] <= line["step_s_max"]
  assert line["images_per_s"] == pytest.approx(2 / line["step_s"])
  assert line["peak_rss_mb"] > 0
  assert line["input_wait"] is None  # Random batches: nothing waited for.
  # A ResNet-18 forward is 1.8 G multiply-adds at 224 px, so 37 M at 32 px per image;
  # the train step (forward, backward, Adam) of 2 images counts more than twice that.
  assert line["flops_per_step"] > 2 * 2 * 30e6
  assert line["mfu"] == pytest.approx(line["flops_per_step"] / line["step_s"] / 0.5e12,
                                      rel=1e-9)
  if line["device"] == "cpu":  # The CPU backend reports no memory statistics.
    assert line["peak_device_memory_mb"] is None
  # The table on stderr has a row for it.
  assert "first_step_s" in stderr and "jax" in stderr
  # The line is recorded per device kind, where the sweep planner reads step times.
  (recorded,) = list((tmp_path / "cache" / "bench").iterdir())
  (stamped,) = [json.loads(x) for x in recorded.read_text().splitlines()]
  assert stamped.pop("time") and stamped == line


def test_step_settings_are_the_trainers(tmp_path):
  config = _tiny_config(tmp_path)
  config.input.eval_batch_size = 8
  config.input.pp_eval = "resize(72)|center_crop(48)"
  config.model.dtype = "bfloat16"
  train, evaluate = (train_speed.step_settings(config, step) for step in ("train", "eval"))
  assert train == {"model": "swin_demo_patch4_window4_128", "batch_size": 16,
                   "image_size": 48, "dtype": "bfloat16", "num_outputs": 4,
                   "model_kw": config.model.kw.to_dict()}
  assert evaluate == {**train, "batch_size": 8}
  # The data set was only described, not prepared.
  assert not (tmp_path / "phantom").exists()


@pytest.mark.e2e
def test_config_sets_the_step_and_flags_override_it(tmp_path):
  config = ["--config=tests/configs/tiny.py",
            f"--config.dataset.manual_dir={tmp_path / 'phantom'}",
            f"--config.dataset.data_dir={tmp_path / 'tfds'}"]
  (line,), _ = _run_bench(tmp_path / "cache", "eval", *config, "--batch=4",
                          "--dtype=bfloat16", "--steps=1")
  assert (line["model"], line["batch_size"], line["image_size"], line["dtype"],
          line["num_outputs"], line["config"]) == (
              "swin_demo_patch4_window4_128", 4, 64, "bfloat16", 4, "tests/configs/tiny.py")
  assert line["mfu"] is None and line["flops_per_step"] > 0
  # Another model is built with its own defaults, not the config's Swin sizes.
  (line,), _ = _run_bench(tmp_path / "cache", "train", *config, "--model=resnet18",
                          "--image_size=32", "--steps=1")
  assert (line["model"], line["batch_size"], line["image_size"], line["dtype"],
          line["num_outputs"]) == ("resnet18", 16, 32, "float32", 4)


@pytest.mark.e2e
def test_train_bench_on_the_configs_input_pipeline(tmp_path):
  (line,) = train_speed.bench_step("train", "swin_demo_patch4_window4_128", batch_size=8,
                             image_size=64, dtype="float32", steps=2, compare_torch=False,
                             num_outputs=4, model_kw=tiny.get_config().model.kw.to_dict(),
                             input_config=_tiny_config(tmp_path))
  assert 0 <= line["input_wait"] <= 1
  # Timed as the trainer times it: a window of steps, not each one.
  assert "step_s_min" not in line and line["step_s"] > 0
  assert (line["batch_size"], line["image_size"], line["num_outputs"]) == (8, 64, 4)
  assert line["images_per_s"] == pytest.approx(8 / line["step_s"])


@pytest.mark.e2e
@pytest.mark.parametrize("model,model_kw", [
    ("unet_resnet18", dict(decoder_channels=(32, 16, 16, 8, 8))),
    # Built at 96 px, measured at 64: the input size reaches the Swin encoder.
    ("upernet_swin_demo_patch4_window4_96", dict(decoder_channels=16, embed_dim=16,
                                                 depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))),
])
def test_train_bench_steps_segmentation_models(model, model_kw):
  result = train_speed.jax_train_speed(model, batch_size=2, image_size=64, dtype="float32",
                                       steps=1, num_outputs=1, model_kw=model_kw)
  assert result["image_size"] == 64 and result["step_s"] > 0
  # More than the forward pass of the 1x1 head alone over 2 x 64 x 64 pixels.
  assert result["flops_per_step"] > 2 * 64 * 64 * 2 * 8


@pytest.mark.e2e
def test_eval_bench_with_ten_crops_against_torch():
  lines = train_speed.bench_step("eval", "resnet18", batch_size=2, image_size=32, dtype="float32",
                           steps=2, compare_torch=True, ten_crop=True)
  assert [line["framework"] for line in lines] == ["jax", "torch"]
  for line in lines:
    assert (line["bench"], line["ten_crop"], line["batch_size"]) == ("eval", True, 2)
    assert line["images_per_s"] == pytest.approx(2 / line["step_s"])
  assert "torch_version" in lines[1] and "compile_s" not in lines[1]
  assert lines[0]["speed_vs_torch"] == pytest.approx(lines[1]["step_s"] / lines[0]["step_s"])


def test_ten_crop_is_an_eval_option():
  with pytest.raises(ValueError, match="eval step only"):
    train_speed.bench_step("train", "resnet18", batch_size=2, image_size=32, dtype="float32",
                     steps=1, compare_torch=False, ten_crop=True)


def test_torch_comparison_refuses_model_keyword_arguments():
  with pytest.raises(ValueError, match="no timm counterpart"):
    train_speed.bench_step("train", "resnet18", batch_size=2, image_size=32, dtype="float32",
                     steps=1, compare_torch=True, model_kw={"drop_rate": 0.5})


def test_real_input_feeds_our_train_step_only(tmp_path):
  with pytest.raises(ValueError, match="train step only"):
    train_speed.bench_step("eval", "resnet18", batch_size=2, image_size=32, dtype="float32",
                     steps=1, compare_torch=False, input_config=_tiny_config(tmp_path))


@pytest.mark.parametrize("argv", [[], ["fit"], ["input", "x"]])
def test_usage_error_lists_the_benchmarks(argv):
  # The CLI runs apart: its flags (--model, --workdir, ...) share names with other CLIs'.
  result = subprocess.run([sys.executable, "-m", "medbench_jax.bench", *argv],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "input,train,eval,lower,soak" in result.stderr
