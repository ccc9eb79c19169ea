"""python -m medbench_jax.convert end to end: a MoCo v2 checkpoint converted once, the
output accepted by weights.load (as --config.model.init), 1-channel adaptation."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from medbench_jax import config_lib
from medbench_jax import convert
from medbench_jax import models
from medbench_jax import weights
from medbench_jax.trainer import state
from tests import parity
from tests.helpers import REPO
from tests.publishers import moco


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  model = parity.calibrate_batch_norm(torchvision.models.resnet18(num_classes=4), 32,
                                      lambda m: m.endswith("bn2"))
  ckpt, dropped = moco(model, 2)
  path = tmp_path_factory.mktemp("moco") / "moco_v2_800ep_pretrain.pth.tar"
  torch.save(ckpt, path)
  return str(path), model, dropped


def test_cli_writes_what_runs_load(tmp_path, moco_checkpoint):
  src, model, dropped = moco_checkpoint
  dst = tmp_path / "resnet18_mocov2"
  result = subprocess.run(
      [sys.executable, "-m", "medbench_jax.convert", "--model=resnet18", f"--src={src}",
       f"--dst={dst}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "format moco" in out and "Re-initialised (0)" in out
  assert f"Dropped from the checkpoint ({len(dropped)})" in out
  assert "module.queue (16, 32)  [not part of the backbone]" in out
  info = json.loads((dst / "model.json").read_text())
  assert info["model"] == "resnet18" and info["format"] == "moco" and info["num_classes"] == 0

  # As --config.model.init=DST: the backbone as converted, the head drawn fresh.
  direct = weights.load("resnet18", src, num_classes=7, seed=1)
  config = config_lib.default_config()
  config.model.name, config.model.init = "resnet18", str(dst)
  via_dir = state.init_variables(config, models.create("resnet18", 7), 7, 32, seed=1)
  jax.tree.map(np.testing.assert_array_equal, via_dir, direct)
  with pytest.raises(ValueError, match="holds resnet18 weights"):
    weights.load("resnet34", str(dst), num_classes=7)


def test_keep_head_and_one_channel(tmp_path, moco_checkpoint):
  _, model, _ = moco_checkpoint
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
             tmp_path / "supervised.pth")
  with pytest.raises(ValueError, match="--keep_head needs --num_classes"):
    convert.convert("resnet18", str(tmp_path / "supervised.pth"), str(tmp_path / "x"),
                    keep_head=True)
  report = convert.convert("resnet18", str(tmp_path / "supervised.pth"), str(tmp_path / "gray"),
                           num_classes=4, keep_head=True, in_chans=1)
  assert not report.reinitialised and not report.dropped

  # Grayscale input through the summed kernel == the RGB model on the image repeated 3x.
  x = torch.randn(2, 1, 32, 32)
  with torch.no_grad():
    expected = model.eval()(x.repeat(1, 3, 1, 1)).numpy()
  variables = weights.load("resnet18", str(tmp_path / "gray"), num_classes=4, keep_head=True,
                           in_chans=1)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
  actual = np.asarray(jax.jit(models.create("resnet18", 4).apply)(variables, parity.to_nhwc(x)))
  assert np.abs(actual - expected).max() <= 1e-4
