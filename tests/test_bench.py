"""`python -m medbench_jax.bench input`: both pipelines measured, usage errors."""

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


@pytest.mark.parametrize("argv", [["bench"], ["bench", "train"], ["bench", "input", "x"]])
def test_usage_error_says_train_is_not_implemented(argv):
  with pytest.raises(app.UsageError, match="`train` is not"):
    bench.main(argv)
